"""`kvslim.convert(...)`: read a checkpoint layer by layer, convert its attention, write it out."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..compat import check_transformers
from .adapters import AttentionAdapter, get_adapter
from .calibration import LayerwiseRunner, calibration_windows, meta_model
from .errors import ConversionError
from .formatting import plural
from .gqa import METHODS, check_kv_heads, convert_attention, pairwise_merge_cost, plan_groups
from .refine import REFINE_LR, REFINE_STEPS, refine_attention
from .sources import CheckpointSource, open_source
from .writer import AtomicDirectory, ShardedWriter

TARGETS = ("gqa", "mqa", "mha", "mla")
RECORD_FILE = "kvslim_conversion.json"
log = logging.getLogger("kvslim")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class ConversionRecord:
    """What a conversion did; stored in config.json (key "kvslim") and kvslim_conversion.json."""

    source: str
    target: str
    method: str
    architecture: str
    num_layers: int
    num_heads: int
    head_dim: int
    kv_heads_before: int
    kv_heads_after: int
    dtype: str
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    regrouped: bool = False
    groups: list[list[list[int]]] | None = None
    calibration: dict | None = None
    refinement: dict | None = None
    mla: dict | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    kvslim_version: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConversionError(f"Unknown dtype '{name}'; valid: auto, {', '.join(_DTYPES)}.") from None


def default_refine_steps(to: str, method: str) -> int:
    """Layer-local refinement steps when not given (measured, see benchmarks/results): every
    calibrated conversion refines 300 steps at lr 3e-2. Against 100 steps at 1e-2, llama-mha-gutenberg
    8 -> 1 KV heads: +9.7% -> +2.6% perplexity; all-MiniLM-L6-v2 12 -> 4: mean cosine 0.942 at 100
    steps, 0.949 at lr 1e-2, 0.955; MLA at 1/4 without RoPE (all-MiniLM-L6-v2): 0.990 closed form,
    0.992 refined. About twice the conversion time of 100 steps. Mean-pooling is the paper's baseline
    and is left as is."""
    return 0 if to != "mla" and method == "mean" else REFINE_STEPS


def resolve_kv_heads(to: str, kv_heads: int | None, num_heads: int) -> int:
    if to not in TARGETS:
        raise ConversionError(
            f"Unknown target '--to {to}'; valid: {', '.join(TARGETS)}."
        )
    if to == "mla":
        if kv_heads is not None:
            raise ConversionError("--kv-heads does not apply to --to mla; use --kv-budget or --kv-rank/--rope-dim.")
        return num_heads
    if to == "mqa":
        if kv_heads not in (None, 1):
            raise ConversionError(f"--to mqa means 1 KV head; drop --kv-heads {kv_heads} or use --to gqa.")
        return 1
    if to == "mha":
        if kv_heads not in (None, num_heads):
            raise ConversionError(f"--to mha means {num_heads} KV heads (one per query head).")
        return num_heads
    if kv_heads is None:
        raise ConversionError("--to gqa needs --kv-heads N (a divisor of the query heads).")
    return kv_heads


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * num_layers * kv_heads * head_dim * element


def convert(
    source: str,
    output: str | Path,
    *,
    to: str = "gqa",
    kv_heads: int | None = None,
    method: str | None = None,
    calib_data: str | None = None,
    calib_samples: int = 128,
    calib_seq_len: int = 512,
    regroup: bool | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    revision: str | None = None,
    device: str = "cpu",
    max_shard_bytes: int = 2 * 1024**3,
    refine_steps: int | None = None,
    refine_lr: float = REFINE_LR,
    kv_rank: int | None = None,
    rope_dim: int | None = None,
    kv_budget: float | None = None,
    mla_init: str | None = None,
    rope_strategy: str | None = None,
    tokenizer: str | None = None,
    progress: bool = True,
) -> ConversionRecord:
    """Convert `source` (Hub id, directory or .gguf) to `kv_heads` KV heads and save to `output`.

    Returns the conversion record (also saved beside the weights). Raises ConversionError on bad
    input, before anything is written. `refine_steps` None: see `default_refine_steps`. `method` and
    `regroup` apply to GQA/MQA/MHA targets, `kv_rank`, `rope_dim`, `kv_budget`, `mla_init` and
    `rope_strategy` to MLA; an option given for the other kind of target is refused. `tokenizer`: a
    directory or Hub id to tokenize calibration text with, for sources that ship none.
    """
    started = time.perf_counter()
    check_transformers()
    out = AtomicDirectory(output, overwrite, marker=RECORD_FILE)
    out.check()
    _refuse_other_targets_options(to, method=method, regroup=regroup, kv_rank=kv_rank, rope_dim=rope_dim,
                                  kv_budget=kv_budget, mla_init=mla_init, rope_strategy=rope_strategy)
    method, mla_init, rope_strategy = method or "aware", mla_init or "whitened", rope_strategy or "rotate"
    if method not in METHODS:
        raise ConversionError(f"Unknown method '{method}'; valid: {', '.join(METHODS)}.")
    if calib_samples < 1 or calib_seq_len < 2:
        raise ConversionError("--calib-samples must be >= 1 and --calib-seq-len >= 2.")
    if refine_steps is not None and refine_steps < 0:
        raise ConversionError(f"--refine-steps {refine_steps} is negative; use 0 (closed form only) or more.")
    out_dtype = parse_dtype(dtype)
    check_device(device)
    src = open_source(source, revision, tokenizer)
    calib_seq_len = fit_to_context(src.config, calib_seq_len)
    adapter = get_adapter(src.model_type)
    layout = adapter.layout(src.config)
    if refine_steps is None:
        refine_steps = default_refine_steps(to, method)
    target_kv = resolve_kv_heads(to, kv_heads, layout.num_heads)
    check_kv_heads(layout, target_kv)
    _check_tensors(src, adapter, layout.num_layers)
    if to == "mla":
        return _convert_to_mla(src, adapter, layout, out, source, out_dtype, started, max_shard_bytes,
                               kv_rank=kv_rank, rope_dim=rope_dim, kv_budget=kv_budget, init=mla_init,
                               rope_strategy=rope_strategy, calib_data=calib_data, calib_samples=calib_samples,
                               calib_seq_len=calib_seq_len, refine_steps=refine_steps, refine_lr=refine_lr,
                               device=device, progress=progress)

    merging = target_kv < layout.num_kv_heads
    regroup = (method == "aware") if regroup is None else regroup
    regroup = regroup and merging and 1 < target_kv
    calibrate = method == "aware" and merging

    weight_dtype = out_dtype or src.reader.dtype(adapter.required(0)[0])
    record = ConversionRecord(
        source=source, target=to, method=method if merging else "replicate" if target_kv > layout.num_kv_heads else "identity",
        architecture=src.model_type, num_layers=layout.num_layers, num_heads=layout.num_heads,
        head_dim=layout.head_dim, kv_heads_before=layout.num_kv_heads, kv_heads_after=target_kv,
        dtype=str(weight_dtype).removeprefix("torch."),
        kv_bytes_per_token_before=kv_bytes_per_token(layout.num_layers, layout.num_kv_heads, layout.head_dim, weight_dtype),
        kv_bytes_per_token_after=kv_bytes_per_token(layout.num_layers, target_kv, layout.head_dim, weight_dtype),
        regrouped=regroup, kvslim_version=_version(),
    )
    if adapter.qk_norm and method == "aware" and merging:
        record.notes.append(
            "q/k-norm model: the per-head key folds are restricted to phases (rotations), which pass "
            "the query RMSNorm exactly only when its weight is equal within each RoPE pair; otherwise "
            "the fold is an approximation."
        )

    runner = target_layers = None
    if calibrate:
        ids, record.calibration = calibration_windows(src, calib_data, calib_samples, calib_seq_len)
        runner = LayerwiseRunner(src, ids, device=device, adapter=adapter)
        target = meta_model(adapter.target_config(src.config, target_kv), adapter.model_kind)
        target_layers = list(target.get_submodule(adapter.layers_path))

    rope = adapter.rope(src.config)
    with out as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        copy_non_layer_tensors(src, adapter, layout, writer, out_dtype)
        groups_log, refine_log = [], []
        bar = tqdm(range(layout.num_layers), desc=f"converting ({method} -> {plural(target_kv, 'KV head')})",
                   unit="layer", disable=not progress)
        for i in bar:
            weights = adapter.read(src.reader, i, layout)
            cov = runner.attention_input_moment(i, adapter.attention_module) if runner else None
            groups = None
            if regroup:
                groups = plan_groups(pairwise_merge_cost(weights, layout, cov, rope), target_kv)
                groups_log.append(groups)
            new = convert_attention(weights, layout, target_kv, method if merging else "mean",
                                    groups=groups, cov=cov, rope_layout=rope)
            converted = adapter.write(new, i)
            if runner and refine_steps:
                converted, err = _refine(runner, adapter, i, target_layers[i], converted, refine_steps, refine_lr)
                refine_log.append(round(err, 6))
            if runner:
                runner.advance(i, target_layers[i], {k: v.float() for k, v in converted.items()})
            prefix = adapter.prefix(i)
            for name in src.layer_names(prefix):
                tensor = converted.pop(name, None)
                writer.add(name, _cast(tensor if tensor is not None else src.reader.get(name), out_dtype))
            for name, tensor in converted.items():  # tensors the source lacked (none today)
                writer.add(name, _cast(tensor, out_dtype))
        record.groups = groups_log or None
        if refine_log:
            record.refinement = {"steps": refine_steps, "lr": refine_lr, "relative_output_error": refine_log}
        writer.close()

        config = adapter.target_config(src.config, target_kv)
        if out_dtype is not None:
            config.dtype = out_dtype
        record.seconds = round(time.perf_counter() - started, 2)
        config.kvslim = record.to_dict()
        config.save_pretrained(str(tmp))
        if adapter.hosted:  # the modeling file travels with the checkpoint (auto_map)
            from ..modeling.hosted import save_modeling_file

            save_modeling_file(adapter.hosted, tmp)
        src.save_side_files(tmp)
        (tmp / RECORD_FILE).write_text(json.dumps(record.to_dict(), indent=2))
    return record


def _convert_to_mla(src, adapter, layout, out, source, out_dtype, started, max_shard_bytes, **kwargs):
    from .mla_pipeline import convert_hosted_mla, convert_mla, hosted_mla_class

    weight_dtype = out_dtype or src.reader.dtype(adapter.required(0)[0])
    record = ConversionRecord(
        source=source, target="mla", method="mla", architecture=src.model_type, num_layers=layout.num_layers,
        num_heads=layout.num_heads, head_dim=layout.head_dim, kv_heads_before=layout.num_kv_heads,
        kv_heads_after=1, dtype=str(weight_dtype).removeprefix("torch."),
        kv_bytes_per_token_before=kv_bytes_per_token(layout.num_layers, layout.num_kv_heads, layout.head_dim, weight_dtype),
        kv_bytes_per_token_after=0, kvslim_version=_version(),
    )

    hosted = hosted_mla_class(adapter, src.config)

    def save(tmp, config):
        record.seconds = round(time.perf_counter() - started, 2)
        config.kvslim = record.to_dict()
        config.save_pretrained(str(tmp))
        if hosted:
            from ..modeling.hosted import save_modeling_file

            save_modeling_file(hosted, tmp)
        src.save_side_files(tmp)
        (tmp / RECORD_FILE).write_text(json.dumps(record.to_dict(), indent=2))

    run = convert_hosted_mla if hosted else convert_mla
    run(src, adapter, layout, out, lambda tmp: ShardedWriter(tmp, max_shard_bytes), record,
        out_dtype=out_dtype, started=started, save=save, **kwargs)
    return record


def _refine(runner, adapter, index, target_layer, converted, steps, lr, target_position_embeddings=None,
            frozen: tuple[str, ...] = (), layer_tensors: dict | None = None):
    """`layer_tensors`: other tensors of the target layer whose names the source lacks (renamed MLP)."""
    inputs, call = runner.attention_inputs(index, adapter.attention_module)
    target_call = None if target_position_embeddings is None else {**call, "position_embeddings": target_position_embeddings}
    f32 = {k: _cast(v, torch.float32) for k, v in {**(layer_tensors or {}), **converted}.items()}
    with runner.loaded_layer(index) as source, runner.loaded_layer(index, target_layer, f32) as target:
        err = refine_attention(target.get_submodule(adapter.attention_module),
                               source.get_submodule(adapter.attention_module), inputs, call, steps, lr,
                               target_call=target_call, frozen=frozen)
        prefix = f"{runner.layer_prefix(index)}{adapter.attention_module}."
        fitted = {prefix + n: p.detach().cpu().clone()  # the refined layer ran on the calibration device
                  for n, p in target.get_submodule(adapter.attention_module).named_parameters()}
    dtype = next(v.dtype for v in converted.values() if v.is_floating_point())
    return {**converted, **{k: v.to(dtype) for k, v in fitted.items()}}, err


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvslim")
    except PackageNotFoundError:
        return "0+unknown"


def copy_non_layer_tensors(src: CheckpointSource, adapter: AttentionAdapter, layout, writer, out_dtype) -> None:
    """Embeddings, final norm, head: everything outside the decoder layers goes out unchanged."""
    layer_prefixes = tuple(adapter.prefix(i) for i in range(layout.num_layers))
    for name in src.reader.keys():
        if not name.startswith(layer_prefixes):
            writer.add(adapter.output_name(name), _cast(src.reader.get(name), out_dtype))


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or not t.is_floating_point() else t.to(dtype)


MLA_OPTIONS = {"kv_rank": "--kv-rank", "rope_dim": "--rope-dim", "kv_budget": "--kv-budget",
               "mla_init": "--mla-init", "rope_strategy": "--rope-strategy"}
GQA_OPTIONS = {"method": "--method", "regroup": "--regroup/--no-regroup"}


def _refuse_other_targets_options(to: str, **given) -> None:
    """An option of the other kind of target is refused, not silently ignored."""
    foreign = MLA_OPTIONS if to != "mla" else GQA_OPTIONS
    wrong = [flag for name, flag in foreign.items() if given.get(name) is not None]
    if wrong:
        own = GQA_OPTIONS if to != "mla" else MLA_OPTIONS
        verb = "does" if len(wrong) == 1 else "do"
        raise ConversionError(f"{', '.join(wrong)} {verb} not apply to --to {to}; --to {to} takes "
                              f"{', '.join(own.values())} (and the calibration and refinement options).")


def fit_to_context(config, seq_len: int) -> int:
    """Calibration windows no longer than the model's context (GPT-2 style models index a position
    table and fail past it), with a notice when shortened."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and 2 <= limit < seq_len:
        log.warning("kvslim: calibration windows shortened from %d to %d tokens, the model's context.", seq_len, limit)
        return limit
    return seq_len


def check_device(device: str) -> None:
    """The calibration device exists here (before any work, not deep in the first layer)."""
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConversionError(f"Unknown --device '{device}'; use cpu, cuda or cuda:N.") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConversionError(f"--device {device}: no CUDA GPU is available here (torch {torch.__version__}, {build}). "
                              "Use --device cpu.")
    if where.type == "cuda" and where.index is not None and where.index >= torch.cuda.device_count():
        raise ConversionError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    if where.type not in ("cpu", "cuda"):
        raise ConversionError(f"--device {device}: calibration runs on cpu or cuda.")


def _check_tensors(src: CheckpointSource, adapter: AttentionAdapter, num_layers: int) -> None:
    """Before any work: every tensor the conversion reads exists, and every checkpoint tensor the
    config's model also has (built on the meta device, so nothing is allocated) has its shape."""
    keys = src.reader.keys()
    for i in range(num_layers):
        for name in adapter.required(i):
            if name not in keys:
                raise ConversionError(
                    f"The checkpoint has no tensor '{name}': its weights do not match its config "
                    f"(model_type '{src.model_type}')."
                )
    expected = {name: tuple(t.shape) for name, t in meta_model(src.config, adapter.model_kind).state_dict().items()}
    for name in keys:
        want = expected.get(name)
        if want is not None and src.reader.shape(name) != want:
            raise ConversionError(
                f"Tensor '{name}' has shape {list(src.reader.shape(name))}, but the checkpoint's config.json "
                f"describes {list(want)}: the weights and the config do not belong together. Use the config "
                "that was saved with these weights."
            )
