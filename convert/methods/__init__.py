"""Conversion methods behind one interface (methods/base.py), found by target in one registry.

Adding a target means writing one module with a `ConversionMethod` subclass and its options
dataclass, and registering it here; the driver and the CLI need no change.
"""

from __future__ import annotations

from ..adapters import AttentionAdapter
from ..errors import ConversionError
from .base import ConversionMethod, Job, LayerOutput, Settings, flag, option_names, parse_dtype
from .merge_heads import HeadMerge, HeadMergeOptions
from .mla import DeepseekMLA, LatentMLA, LatentRopeMLA, MLAOptions

_METHODS: dict[str, list[type[ConversionMethod]]] = {}


def register_method(method: type[ConversionMethod]) -> type[ConversionMethod]:
    """Register `method` for each of its targets; several methods of one target share its Options
    and are tried in registration order (`applies`)."""
    for target in method.targets:
        registered = _METHODS.setdefault(target, [])
        if registered and registered[0].Options is not method.Options:
            raise ValueError(f"Methods of target '{target}' must share one options class.")
        registered.append(method)
    return method


def targets() -> tuple[str, ...]:
    return tuple(_METHODS)


def options_class(target: str):
    """The options dataclass of `target` (ConversionError for an unknown target)."""
    if target not in _METHODS:
        raise ConversionError(f"Unknown target '--to {target}'; valid: {', '.join(_METHODS)}.")
    return _METHODS[target][0].Options


def method_class(target: str, adapter: AttentionAdapter, config) -> type[ConversionMethod]:
    """The method that converts `config`'s architecture to `target`."""
    for method in _METHODS[target]:
        if method.applies(adapter, config):
            return method
    raise ConversionError(
        f"--to {target} cannot convert this '{config.model_type}' (RoPE layout {adapter.rope(config)}): no "
        f"registered method applies. Try another --to ({', '.join(t for t in _METHODS if t != target)})."
    )


register_method(HeadMerge)
# DeepseekV3 where it reproduces the blocks exactly, else kvslim's hosted classes
register_method(DeepseekMLA)
register_method(LatentRopeMLA)
register_method(LatentMLA)

__all__ = ["ConversionMethod", "DeepseekMLA", "HeadMerge", "HeadMergeOptions", "Job", "LatentMLA", "LatentRopeMLA",
           "LayerOutput", "MLAOptions", "Settings", "flag", "method_class", "option_names", "options_class",
           "parse_dtype", "register_method", "targets"]
