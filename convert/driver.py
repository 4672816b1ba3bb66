"""The one layerwise conversion loop, shared by every method.

Per layer: read the source attention, measure its input statistics on the calibration stream,
let the method convert it, refine it against the source layer's outputs, advance the stream
through the converted layer (so the next layer calibrates on what it will really see), and write
it. Only one layer's weights are in memory at a time; the output appears atomically. A time-bounded
refinement (the default) sets its step count on the first layer, from that layer's timings.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import json
import time

import torch
from tqdm.auto import tqdm

from .calibration import LayerwiseRunner, calibration_windows
from .meta import meta_model
from .methods import ConversionMethod, Job
from .records import RECORD_FILE, ConversionRecord, kv_bytes_per_token
from .refine import Effort, Refinement, TimeBudget, output_error, output_scale, refine_attention, source_outputs
from .writer import AtomicDirectory, ShardedWriter


def run(job: Job, method: ConversionMethod, out: AtomicDirectory, started: float) -> ConversionRecord:
    with bounded_allocator():
        return _run(job, method, out, started)


def _run(job: Job, method: ConversionMethod, out: AtomicDirectory, started: float) -> ConversionRecord:
    settings, adapter, layout, src = job.settings, job.adapter, job.layout, job.src
    effort = method.refine_effort()
    lr = effort.lr
    runner, calibration, steps, budget = None, None, 0, None
    if method.calibrates():
        ids, calibration = calibration_windows(src, settings.calib_data, settings.calib_samples, settings.calib_seq_len)
        runner = LayerwiseRunner(src, ids, device=settings.device, adapter=adapter)
        fewest, steps = effort.step_range(ids.numel(), ids.shape[-1])
        batch_tokens = effort.step_tokens(ids.shape[-1])
    config = method.output_config(runner)
    release_memory()  # after a pass over all layers (MLA's RoPE frequencies, the cache allocation)
    target_layers = None
    if runner:
        target = fused_attention(meta_model(config, adapter.model_kind))
        method.prepare_layers(target)
        target_layers = list(target.get_submodule(adapter.layers_path))
    record = method.new_record(common_record_fields(job))
    record.calibration = calibration

    with out as tmp:
        writer = ShardedWriter(tmp, settings.max_shard_bytes)
        copy_non_layer_tensors(job, writer)
        errors = []
        setup = time.perf_counter() - started
        for i in tqdm(range(layout.num_layers), desc=method.progress_label(), unit="layer",
                      disable=not settings.progress):
            layer_started = time.perf_counter()
            weights = adapter.read(src.reader, i, layout)
            cov = runner.attention_input_moment(i, adapter.attention_module) if runner else None
            layer = method.convert_layer(i, weights, cov, runner)
            del weights, cov  # (the moment is 128 MiB of float64 at 7B, needed no more)
            release_memory()  # the closed form's float64 temporaries
            fit = None
            if runner and steps:
                if i == 0 and effort.time_share and fewest < steps:
                    budget = time_budget(effort, runner, target_layers[0], layer, setup,
                                         time.perf_counter() - layer_started, layout.num_layers, fewest, steps)
                with mmap_threshold(REFINE_MMAP_THRESHOLD):
                    layer.attention, fit = refine_layer(runner, job, i, target_layers[i], layer,
                                                        budget if i == 0 and budget else steps, lr, batch_tokens)
                if i == 0 and budget:
                    steps = fit.steps  # for every layer: one count, recorded
                errors.append(round(fit.error, 6))
                release_memory()  # the refinement's activations and optimiser state
            if runner:
                replay = (adapter.attention_module, fit.inputs, fit.outputs) if fit else None
                runner.advance(i, target_layers[i], {**layer.extra, **layer.attention}, call=layer.call, replay=replay)
                del fit
            write_layer(job, i, layer, writer)
            del layer
            release_memory()
        method.finish(record)
        if errors:
            record.refinement = {"steps": steps, "tokens_per_step": batch_tokens, "lr": lr,
                                 **({"quality": settings.quality} if settings.refine_steps is None else {}),
                                 **({"time_share": effort.time_share,
                                     "closed_form_estimate_s": round(budget.closed_form, 1)} if budget else {}),
                                 "relative_output_error": errors}
        writer.close()
        save(job, method, config, record, tmp, started)
    return record


def common_record_fields(job: Job) -> dict:
    layout = job.layout
    return dict(source=job.source_id, target=job.target, architecture=job.src.model_type,
                num_layers=layout.num_layers, num_heads=layout.num_heads, head_dim=layout.head_dim,
                kv_heads_before=layout.num_kv_heads, dtype=str(job.weight_dtype).removeprefix("torch."),
                kv_bytes_per_token_before=kv_bytes_per_token(
                    layout.num_layers, 2 * layout.num_kv_heads * layout.head_dim, job.weight_dtype),
                kvslim_version=version())


def time_budget(effort: Effort, runner, target_layer, layer, setup: float, layer_seconds: float,
                num_layers: int, fewest: int, most: int) -> TimeBudget:
    """Each layer's refinement time: `effort.time_share` of the closed form's per layer, estimated
    from the first layer (`setup`: the seconds before it; `layer_seconds`: its reading, statistics and
    closed form) and one timed pass of the stream through it (what its advance costs)."""
    overrides = {**layer.extra, **layer.attention}
    stream_pass = runner.pass_seconds(0, target_layer, overrides, call=layer.call)
    closed_form = setup + num_layers * (layer_seconds + stream_pass)
    return TimeBudget(effort.time_share * closed_form / num_layers, fewest, most, closed_form)


def fused_attention(model):
    """The converted layers refine and advance the stream with kvslim_sdpa where the model runs
    SDPA: Transformers' own SDPA call sends MLA's attention (values narrower than keys) to the
    unfused math kernel on CPU, where kvslim_sdpa pads the values for the flash kernel (a
    refinement step's attention forward and backward in ~60% of the time)."""
    from ..modeling.attention import IMPLEMENTATION, register

    if model.config._attn_implementation == "sdpa":
        register()
        model.config._attn_implementation = IMPLEMENTATION
    return model


def refine_layer(runner, job: Job, index: int, target_layer, layer, steps: int | TimeBudget, lr: float,
                 batch_tokens: int) -> tuple[dict, Refinement]:
    """Fit the converted attention to the source layer's outputs on the calibration inputs."""
    started = time.perf_counter()
    attention = job.adapter.attention_module
    inputs, call = runner.attention_inputs(index, attention)
    target_call = call if layer.call is None else {**call, "position_embeddings": layer.call["position_embeddings"]}
    closed_form = {**layer.extra, **layer.attention}  # loading makes float32 copies; none is held here
    prefix = f"{runner.layer_prefix(index)}{attention}."

    dtype = next(v.dtype for v in layer.attention.values() if v.is_floating_point())

    def weights(module):  # in the layer's dtype straight away (no float32 copy of them all)
        return {prefix + n: p.detach().to("cpu", dtype, copy=True) for n, p in module.named_parameters()}

    with runner.loaded_layer(index, submodule=attention) as source:
        wanted = source_outputs(source, inputs, call)
    with runner.loaded_layer(index, target_layer, closed_form, submodule=attention) as target:
        fit = refine_attention(target, wanted, inputs, target_call, steps, lr, batch_tokens,
                               frozen=layer.frozen, dtype=dtype, spent=time.perf_counter() - started)
        fitted = weights(target) if fit.improved else None
    if not fit.improved:  # the closed form, loaded again as it was
        with runner.loaded_layer(index, target_layer, closed_form, submodule=attention) as target:
            fitted = weights(target)
            fit.error, fit.outputs = output_error(target, wanted, inputs, target_call, output_scale(wanted))
    return {**layer.attention, **fitted}, fit


def write_layer(job: Job, index: int, layer, writer) -> None:
    """The layer's source tensors in checkpoint order (kept, dropped or replaced in place), then the
    converted tensors not written yet."""
    src, out_dtype = job.src, job.settings.out_dtype
    pending = {**layer.extra, **layer.attention}
    for name in src.layer_names(job.adapter.prefix(index)):
        if layer.in_place and name in pending:
            writer.add(name, cast(pending.pop(name), out_dtype))
        elif not layer.drops(name):
            writer.add(job.adapter.output_name(name), kept(job, name))
    for name, tensor in pending.items():
        writer.add(name, cast(tensor, out_dtype))


def kept(job: Job, name: str):
    """A source tensor that goes out unchanged: its stored bytes, which the writer has the kernel
    copy, where the output keeps its dtype; else the tensor, cast."""
    out_dtype = job.settings.out_dtype
    stored = job.src.reader.stored(name)
    if stored is not None and (out_dtype is None or stored.dtype == out_dtype or not stored.dtype.is_floating_point):
        return stored
    return cast(job.src.reader.get(name), out_dtype)


def copy_non_layer_tensors(job: Job, writer) -> None:
    """Embeddings, final norm, head: everything outside the decoder layers goes out unchanged."""
    adapter = job.adapter
    layer_prefixes = tuple(adapter.prefix(i) for i in range(job.layout.num_layers))
    for name in job.src.reader.keys():
        if not name.startswith(layer_prefixes):
            writer.add(adapter.output_name(name), kept(job, name))


def save(job: Job, method: ConversionMethod, config, record: ConversionRecord, tmp, started: float) -> None:
    """Config (with the record under "kvslim"), the hosted modeling file, tokenizer and record."""
    record.seconds = round(time.perf_counter() - started, 2)
    config.kvslim = record.to_dict()
    config.save_pretrained(str(tmp))
    hosted = method.hosted_class()
    if hosted:  # the modeling file travels with the checkpoint (auto_map)
        from ..modeling.hosted import save_modeling_file

        save_modeling_file(hosted, tmp)
    job.src.save_side_files(tmp)
    (tmp / RECORD_FILE).write_text(json.dumps(record.to_dict(), indent=2))


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_LIBC = _libc()  # glibc, or None (macOS, musl): then the allocator is left as it is
M_MMAP_THRESHOLD = -3  # mallopt parameter
MMAP_THRESHOLD = 1024**2  # while converting: every block of 1 MiB or more is its own mapping
# While refining: a step allocates and frees the same blocks a hundred times over, and a fresh mapping
# costs a page fault per 4 KiB touched. llama-mha-gutenberg -> MLA 1/4, 100 steps on each of 6 layers:
# 72 s at 1 MiB, 51 s at 8 MiB; a 1.1B-width layer's refinement peak rose from 927 to 1,011 MiB.
REFINE_MMAP_THRESHOLD = 8 * 1024**2
DEFAULT_MMAP_THRESHOLD = 128 * 1024  # glibc's initial value


def _set_mmap_threshold(nbytes: int) -> None:
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, nbytes)


@contextlib.contextmanager
def mmap_threshold(nbytes: int, restore: int = MMAP_THRESHOLD):
    """Blocks of `nbytes` or more are their own mappings inside; `restore` afterwards."""
    _set_mmap_threshold(nbytes)
    try:
        yield
    finally:
        _set_mmap_threshold(restore)


@contextlib.contextmanager
def bounded_allocator():
    """Large blocks go straight back to the OS when freed, for the duration of a conversion.

    glibc serves blocks above a threshold by mmap, but raises the threshold (up to 32 MiB) each time
    such a block is freed; later blocks of that size then come from its heap arenas, which fragment
    and keep freed memory. Layer after layer, a calibrated conversion's anonymous memory grew by its
    refinement working set: a 1.1B Llama -> MLA peaked at 3.7-4.3 GiB. A fixed 1 MiB threshold kept
    a 3-layer model of that width at 600-640 MiB after every step (2.0 GiB of growth without), for
    about 7% more time. Afterwards the threshold is set back to glibc's initial value.

    The objects that exist before the conversion (Python, torch and Transformers: ~350K) are frozen
    out of the cycle collector meanwhile: each per-layer collection then scans only what the
    conversion made (0.5 s per collection before, 18 s of a 1.1B weight-only conversion's 43 s)."""
    ours = gc.get_freeze_count() == 0  # a caller's own frozen set is left as it is
    if ours:
        gc.freeze()
    try:
        with mmap_threshold(MMAP_THRESHOLD, restore=DEFAULT_MMAP_THRESHOLD):
            yield
    finally:
        if ours:
            gc.unfreeze()


def release_memory() -> None:
    """Hand memory freed by the last step (float64 temporaries, refinement activations) back to
    the OS: collect cycles, empty CUDA's cache, and trim glibc's heaps."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or not t.is_floating_point() else t.to(dtype)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("kvslim")
    except PackageNotFoundError:
        return "0+unknown"
