"""Calibration data and layer-by-layer activation capture.

`LayerwiseRunner` never holds more than one decoder layer's weights: the model skeleton lives on
the meta device, each layer is materialised from the lazy tensor reader, run on the calibration
hidden states, and sent back to meta. One forward pass with every layer replaced by a
passthrough records the arguments Transformers gives each layer (rotary embeddings, masks,
per-layer sliding-window variants), so the runner works for any decoder that keeps its layers in
a ModuleList, without re-implementing the model's forward.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers.cache_utils import Cache

from .adapters import AttentionAdapter
from .errors import ConversionError
from .meta import meta_model
from .sources import CheckpointSource
from .text import read_texts

log = logging.getLogger("kvslim")
DEFAULT_CALIB_DATASET = "Salesforce/wikitext:wikitext-2-raw-v1:train"


def start_token(tokenizer) -> int | None:
    """The token every sequence starts with: BOS for decoders, [CLS] for BERT-style encoders."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None else getattr(tokenizer, "cls_token_id", None)


def end_token(tokenizer) -> int | None:
    """The token BERT-style encoders end every sequence with ([SEP]); None for decoders."""
    if getattr(tokenizer, "bos_token_id", None) is None and getattr(tokenizer, "cls_token_id", None) is not None:
        return getattr(tokenizer, "sep_token_id", None)
    return None


def token_windows(
    texts: list[str], tokenizer, num: int, seq_len: int, bos_token_id: int | None, min_num: int = 1,
    seed: int = 0, eos_token_id: int | None = None,
) -> torch.Tensor:
    """`num` windows of `seq_len` tokens (BOS first when the model has one, `eos_token_id` last,
    e.g. an encoder's [CLS] ... [SEP]), spread over the corpus."""
    body = seq_len - (bos_token_id is not None) - (eos_token_id is not None)
    ids: list[int] = []
    needed = num * body
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= needed * 4:  # enough to spread the windows; no need to tokenise everything
            break
    available = len(ids) // body
    if available < min_num:
        raise ConversionError(
            f"Calibration data is too short: {len(ids)} tokens make {available} windows of "
            f"{seq_len} tokens, at least {min_num} are needed. Give more text or lower --calib-seq-len."
        )
    num = min(num, available)
    starts = torch.linspace(0, (available - 1) * body, num).long().tolist()
    rows = [ids[s:s + body] for s in starts]
    out = torch.tensor(rows, dtype=torch.long)
    if bos_token_id is not None:
        out = torch.cat([torch.full((num, 1), bos_token_id, dtype=torch.long), out], dim=1)
    if eos_token_id is not None:
        out = torch.cat([out, torch.full((num, 1), eos_token_id, dtype=torch.long)], dim=1)
    return out


def calibration_windows(source: CheckpointSource, spec: str | None, num: int, seq_len: int) -> tuple[torch.Tensor, dict]:
    """The calibration token windows of a conversion (`spec` None: the default dataset), and what
    the conversion record says about them."""
    spec = spec or DEFAULT_CALIB_DATASET
    tokenizer = source.load_tokenizer()
    ids = token_windows(read_texts(spec), tokenizer, num, seq_len, start_token(tokenizer), min_num=min(8, num),
                        eos_token_id=end_token(tokenizer))
    return ids, {"data": spec, "samples": int(ids.shape[0]), "seq_len": seq_len, "tokens": int(ids.numel())}


class _Passthrough(nn.Module):
    """Stands in for a decoder layer; records the arguments the model gives that layer."""

    def __init__(self, wrapped: nn.Module, sink: list):
        super().__init__()
        self.wrapped = wrapped
        self._sink = sink

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("wrapped"), name)

    def forward(self, hidden_states, *args, **kwargs):
        # positional arguments (GPT-2 passes its mask that way) are recorded by name
        signature = inspect.signature(self.wrapped.forward)
        named = dict(signature.bind_partial(hidden_states, *args, **kwargs).arguments)
        named.pop(next(iter(signature.parameters)))  # the hidden states themselves
        for p in signature.parameters.values():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                named.update(named.pop(p.name, {}))
        self._sink.append((hidden_states, named))
        return hidden_states


class _StopForward(Exception):
    pass


class MetaRead(RuntimeError):
    """A layer computed with weights that were not loaded (see `LayerwiseRunner.loaded_on_call`)."""


class _NoMetaReads(TorchDispatchMode):
    """Raises MetaRead on any operation that reads a meta tensor, except while paused (loading)."""

    def __init__(self):
        super().__init__()
        self.active = True

    @contextlib.contextmanager
    def paused(self):
        self.active = False
        try:
            yield
        finally:
            self.active = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active and any(isinstance(t, torch.Tensor) and t.is_meta for t in tree_leaves((args, kwargs))):
            raise MetaRead(f"{func} read a tensor that is not loaded")
        return func(*args, **(kwargs or {}))


BATCH_TOKENS = 4096


class _ReplayMismatch(Exception):
    """A replayed attention was called with other inputs than its outputs belong to."""


class _Replay(nn.Module):
    """Stands in for a layer's attention: returns the outputs already computed for the same inputs,
    batch after batch, and raises _ReplayMismatch on any other input. The lists are emptied as
    they are used."""

    def __init__(self, inputs: list[torch.Tensor], outputs: list):
        super().__init__()
        self.inputs, self.outputs, self.calls = inputs, outputs, 0

    def forward(self, *args, **kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        k, self.calls = self.calls, self.calls + 1
        if k >= len(self.inputs) or self.inputs[k] is None or not torch.equal(x, self.inputs[k]):
            raise _ReplayMismatch
        # each batch is let go once used (a fallback computes from the stream, not from these)
        out, self.inputs[k], self.outputs[k] = self.outputs[k], None, None
        return out


class LayerwiseRunner:
    """Runs calibration tokens through a model one decoder layer at a time."""

    def __init__(self, source: CheckpointSource, input_ids: torch.Tensor, device: str = "cpu", adapter=None):
        adapter = adapter or AttentionAdapter("llama", ())
        self.source = source
        self.device = torch.device(device)
        # about BATCH_TOKENS tokens per forward whatever the window length (8 windows of 512)
        self.batch_size = max(1, BATCH_TOKENS // input_ids.shape[1])
        self.model = meta_model(source.config, adapter.model_kind)
        self.model_kind = adapter.model_kind
        self._converted_weights: dict[str, torch.Tensor] | None = None
        self.base = self.model.get_submodule(adapter.base_path)
        self.layers_path = adapter.layers_path
        self.layers: nn.ModuleList = self.model.get_submodule(adapter.layers_path)
        self.prefix = f"{adapter.base_path}." if adapter.base_path else ""
        layers_name = adapter.layers_path[len(self.prefix):]
        # Plain lookup tables stay in the checkpoint's dtype and their outputs are cast: the same
        # float32 values as a float32 table, which would be 2 GiB at a 128K vocabulary (subclasses,
        # e.g. a scaled embedding that multiplies in the weight's dtype, are loaded in float32)
        lookups = {name for name, m in self.base.named_modules()
                   if type(m) is nn.Embedding and not name.startswith(layers_name + ".")}
        self._materialise(self.base, exclude=layers_name, stored_dtype={f"{n}.weight" for n in lookups})
        casts = [self.base.get_submodule(n).register_forward_hook(lambda m, args, out: out.float()) for n in lookups]
        # what the model gives each layer (masks, positions), and layer 0's input: the embeddings,
        # learned positions included, for every calibration batch
        try:
            self.layer_kwargs, self.hidden = self._capture_layer_inputs(input_ids)
        finally:
            for handle in casts:
                handle.remove()
        # only the capture needs the embeddings (250 MiB in float32 at 1.1B): their weights go back
        # to the meta device; buffers (rotary frequencies) stay
        from accelerate.utils import set_module_tensor_to_device

        for name, _ in list(self.base.named_parameters()):
            if not name.startswith(adapter.layers_path[len(self.prefix):] + "."):
                set_module_tensor_to_device(self.base, name, "meta")

    def _materialise(self, module: nn.Module, exclude: str | None = None, prefix: str | None = None,
                     overrides: dict[str, torch.Tensor] | None = None, recurse: bool = True,
                     stored_dtype: set[str] = frozenset()) -> None:
        """Load `module`'s parameters (from `overrides`, else the checkpoint) in float32, those named
        in `stored_dtype` (read-only ones) as the checkpoint stores them."""
        from accelerate.utils import set_module_tensor_to_device

        prefix = self.prefix if prefix is None else prefix
        overrides = overrides or {}
        for name, param in list(module.named_parameters(recurse=recurse)):
            if exclude and name.startswith(exclude + "."):
                continue
            key = prefix + name
            value = overrides[key] if key in overrides else self._weight(key)
            if name in stored_dtype:
                set_module_tensor_to_device(module, name, self.device, value=value, dtype=value.dtype)
                continue
            # always a copy: refinement updates the loaded weights in place, and neither the caller's
            # tensors nor cached checkpoint weights may change with them
            set_module_tensor_to_device(module, name, self.device, value=value.to(torch.float32, copy=True))
        for name, _ in list(module.named_buffers(recurse=recurse)):  # e.g. the kept RoPE pairs of a hosted MLA layer
            if prefix + name in overrides:
                value = overrides[prefix + name]
                value = value.to(torch.float32, copy=True) if value.is_floating_point() else value
                set_module_tensor_to_device(module, name, self.device, value=value)

    def _weight(self, key: str) -> torch.Tensor:
        """A module parameter's value from the checkpoint. Some checkpoints store weights in
        another layout than the module holds them (MoE experts: one tensor per expert on disk,
        fused in the module); those are loaded once through Transformers, whose conversion
        rules then apply, and looked up by module name."""
        if key in self.source.reader.keys():  # a keys view: constant-time membership
            return self.source.reader.get(key)
        if self._converted_weights is None:
            from transformers import AutoModel, AutoModelForCausalLM

            auto = AutoModelForCausalLM if self.model_kind == "causal" else AutoModel
            kwargs = {"gguf_file": self.source.gguf_file} if self.source.gguf_file else {}
            model = auto.from_pretrained(str(self.source.directory), dtype=torch.float32, **kwargs)
            self._converted_weights = dict(model.state_dict())
        if key not in self._converted_weights:
            raise ConversionError(f"The checkpoint has no tensor '{key}' that the model needs.")
        return self._converted_weights[key]

    def _capture_layer_inputs(self, input_ids: torch.Tensor) -> tuple[list[dict], list[torch.Tensor]]:
        sink: list = []
        originals = list(self.layers)
        for i, layer in enumerate(originals):
            self.layers[i] = _Passthrough(layer, sink)
        kwargs, hidden = None, []
        try:
            with torch.no_grad():
                for batch in input_ids.split(self.batch_size):
                    sink.clear()
                    self.base(input_ids=batch.to(self.device), use_cache=False)
                    if len(sink) != len(originals):
                        raise ConversionError("Could not capture the decoder layers' inputs for calibration.")
                    hidden.append(sink[0][0])
                    kwargs = kwargs or [named for _, named in sink]
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
        return kwargs, hidden

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."

    @contextlib.contextmanager
    def loaded_layer(self, index: int, layer: nn.Module | None = None,
                     overrides: dict[str, torch.Tensor] | None = None, submodule: str = ""):
        """Materialise layer `index` (optionally a different module, e.g. the converted layer), or
        only its `submodule` (e.g. the attention: refinement needs no MLP weights, 1 GiB in float32
        for the source and the converted layer at 7B). Yields the materialised module."""
        layer = self.layers[index] if layer is None else layer
        module = layer.get_submodule(submodule)
        prefix = self.layer_prefix(index) + (f"{submodule}." if submodule else "")
        self._materialise(module, prefix=prefix, overrides=overrides)
        try:
            yield module
        finally:
            module.to("meta")

    @contextlib.contextmanager
    def loaded_on_call(self, index: int, layer: nn.Module | None = None,
                       overrides: dict[str, torch.Tensor] | None = None, release: bool = False):
        """Layer `index` (or `layer`, with `overrides`, as in `loaded_layer`) with each module's own
        weights materialised when that module is called, and with `release` dropped again when the
        call returns. The passes that stop at the attention's input then load only what runs before
        it (the input norm), not the attention and the MLP behind it (1 GiB of float32 at 7B); a
        whole layer's pass holds one projection at a time. A module that reads another's weights
        without calling it would meet them on the meta device (where some CPU ops silently compute
        garbage): every operation on a meta tensor raises `MetaRead` instead (see `advance`)."""
        layer = self.layers[index] if layer is None else layer
        prefix = self.layer_prefix(index)
        owners = [(name, module) for name, module in layer.named_modules()
                  if next(module.parameters(recurse=False), None) is not None]

        guard = _NoMetaReads()

        def load(name):
            def hook(module, args):
                with guard.paused():
                    self._materialise(module, prefix=f"{prefix}{name}." if name else prefix, overrides=overrides,
                                      recurse=False)
                if not release:  # loaded for good
                    loads.pop(name).remove()
            return hook

        def drop(module, args, output):
            with guard.paused():
                for param_name, param in list(module.named_parameters(recurse=False)):
                    setattr(module, param_name, nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False))

        loads = {name: module.register_forward_pre_hook(load(name)) for name, module in owners}
        drops = [module.register_forward_hook(drop) for _, module in owners] if release else []
        try:
            with guard:
                yield layer
        finally:
            for handle in [*loads.values(), *drops]:
                handle.remove()
            layer.to("meta")

    def _call(self, layer: nn.Module, index: int, hidden: torch.Tensor, call: dict | None = None) -> torch.Tensor:
        out = layer(hidden, **_without_cache(self.layer_kwargs[index] if call is None else call))
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def _each_attention_input(self, index: int, attention_module: str, visit) -> None:
        """Call visit(x, kwargs) with the input of layer `index`'s attention for every calibration
        batch; the rest of the layer is skipped."""

        def hook(module, args, kwargs):
            visit(kwargs.get("hidden_states", args[0] if args else None), kwargs)
            raise _StopForward

        def each_batch(layer):
            handle = layer.get_submodule(attention_module).register_forward_pre_hook(hook, with_kwargs=True)
            try:
                for h in self.hidden:
                    with contextlib.suppress(_StopForward):
                        self._call(layer, index, h)
            finally:
                handle.remove()

        self._run_layer(index, each_batch)

    def attention_input_moment(self, index: int, attention_module: str) -> torch.Tensor:
        """E[[x,1][x,1]^T] of the attention input x of layer `index` (float64, D x D)."""
        acc: dict = {"m": 0.0, "n": 0}

        def visit(x, kwargs):
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
            acc["m"] = acc["m"] + x.T @ x
            acc["n"] += x.shape[0]

        self._each_attention_input(index, attention_module, visit)
        # the weight math (eigendecompositions in float64) runs on the CPU beside the source weights;
        # only the layer forward passes use the calibration device
        return (acc["m"] / acc["n"]).cpu()

    def attention_inputs(self, index: int, attention_module: str) -> tuple[list[torch.Tensor], dict]:
        """The attention inputs of layer `index` per calibration batch, and the other arguments
        the layer passes its attention module (rotary embeddings, mask)."""
        inputs: list[torch.Tensor] = []
        call: dict = {}

        def visit(x, kwargs):
            inputs.append(x)
            call.update({k: v for k, v in kwargs.items() if k != "hidden_states"})

        self._each_attention_input(index, attention_module, visit)
        return inputs, _without_cache(call)

    @torch.no_grad()
    def advance(self, index: int, layer: nn.Module, overrides: dict[str, torch.Tensor],
                call: dict | None = None, replay: tuple[str, list, list] | None = None) -> None:
        """Replace the hidden states by the output of `layer` (weights: checkpoint + overrides;
        `call`: the layer's arguments when they differ from the source's, e.g. another RoPE).

        `replay` = (the attention's module path, its inputs and its raw outputs per batch), when
        they are known already (refinement's final error pass): the attention then returns those
        instead of computing them again, as long as each batch's input is the one they belong to."""
        through = self._through(index, call)
        if replay is not None:
            layer = self.layers[index] if layer is None else layer
            path, inputs, outputs = replay
            owner_path, _, name = path.rpartition(".")
            owner = layer.get_submodule(owner_path)
            attention = getattr(owner, name)
            setattr(owner, name, _Replay(inputs, outputs))
            try:
                self.hidden = self._run_layer(index, through, layer, overrides, release=True)
                return
            except _ReplayMismatch:
                log.debug("layer %d: the attention's inputs differ from refinement's; computing it again", index)
            finally:
                setattr(owner, name, attention)
        self.hidden = self._run_layer(index, through, layer, overrides, release=True)  # one projection at a time

    def _through(self, index: int, call: dict | None):
        return lambda loaded: [self._call(loaded, index, h, call) for h in self.hidden]

    @torch.no_grad()
    def pass_seconds(self, index: int, layer: nn.Module, overrides: dict[str, torch.Tensor],
                     call: dict | None = None) -> float:
        """The seconds `advance` takes through `layer`, with the stream left as it is."""
        started = time.perf_counter()
        self._run_layer(index, self._through(index, call), layer, overrides, release=True)
        return time.perf_counter() - started

    def _run_layer(self, index: int, run, layer: nn.Module | None = None,
                   overrides: dict[str, torch.Tensor] | None = None, release: bool = False):
        """run(the layer) with its weights loaded on call (`loaded_on_call`); with the whole layer
        loaded where a module reads weights it does not call for (MetaRead, raised before any result)."""
        try:
            with self.loaded_on_call(index, layer, overrides, release) as loaded:
                return run(loaded)
        except MetaRead:
            with self.loaded_layer(index, layer, overrides) as loaded:
                return run(loaded)


def _without_cache(kwargs: dict) -> dict:
    """A layer's captured arguments without its KV cache, found by type: the argument's name has
    changed across Transformers releases (`past_key_value`, `past_key_values`, `cache`)."""
    return {k: v for k, v in kwargs.items() if not isinstance(v, Cache)}
