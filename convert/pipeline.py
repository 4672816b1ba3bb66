"""`kvslim.convert(...)`: check the options and the source, pick the method, run the layerwise driver."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..compat import check_transformers
from . import driver
from .adapters import AttentionAdapter, source_adapter
from .errors import ConversionError
from .meta import meta_model
from .methods import Job, Settings, flag, method_class, option_names, options_class, targets
from .records import RECORD_FILE, ConversionRecord
from .sources import CheckpointSource, open_source
from .writer import AtomicDirectory

log = logging.getLogger("kvslim")
TARGETS = targets()


def convert(source: str, output: str | Path, *, to: str = "gqa", **options) -> ConversionRecord:
    """Convert `source` (Hub id, directory or .gguf) to the attention `to` and save to `output`.

    `options`: the shared settings (`Settings`: calibration, refinement, dtype, device, shards, ...)
    and the target's own (`HeadMergeOptions` for gqa/mqa/mha: kv_heads, method, regroup;
    `MLAOptions` for mla: kv_budget or kv_rank [+ rope_dim], mla_init, rope_strategy, runtime, allocation). None means
    "not given". An option of another target is refused, naming the ones this target takes.
    Returns the conversion record (also saved beside the weights). Raises ConversionError on bad
    input, before anything is written.
    """
    started = time.perf_counter()
    check_transformers()
    out = AtomicDirectory(output, options.get("overwrite") or False, marker=RECORD_FILE)
    out.check()
    settings, method_options = build_options(to, options)
    check_device(settings.device)
    src = open_source(source, settings.revision, settings.tokenizer)
    settings = replace(settings, calib_seq_len=fit_to_context(src.config, settings.calib_seq_len))
    adapter = source_adapter(src.config)
    job = Job(source, to, src, adapter, adapter.layout(src.config), settings)
    method = method_class(to, adapter, src.config)(job, method_options)
    method.check()
    _check_tensors(src, adapter, job.layout.num_layers)
    return driver.run(job, method, out, started)


def build_options(to: str, given: dict):
    """(Settings, the target's options) from keyword options; None values count as not given."""
    target_options = options_class(to)
    given = {k: v for k, v in given.items() if v is not None}
    shared, own = option_names(Settings), option_names(target_options)
    foreign = [k for k in given if k not in shared and k not in own]
    if foreign:
        known = {n for t in TARGETS for n in option_names(options_class(t))}
        unknown = [k for k in foreign if k not in known]
        if unknown:
            raise TypeError(f"convert() got unknown option(s) {', '.join(unknown)}; valid: "
                            f"{', '.join(sorted(set(shared) | known))}.")
        verb = "does" if len(foreign) == 1 else "do"
        raise ConversionError(f"{', '.join(flag(k) for k in foreign)} {verb} not apply to --to {to}; --to {to} takes "
                              f"{', '.join(flag(k) for k in own)} (and the calibration and refinement options).")
    return (Settings(**{k: v for k, v in given.items() if k in shared}),
            target_options(**{k: v for k, v in given.items() if k in own}))


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
