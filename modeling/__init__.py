"""What converted models run on: kvslim's attention kernels (`kvslim_sdpa`, absorbed MLA
decoding), the multimodal cross-attention layer, and the hosted model classes (modeling/hosted/).

This package imports nothing from the rest of kvslim, and nothing heavy on import: its names
load on first use (PEP 562), and `register()` registers the attention and the hosted classes
with Transformers when a caller needs them.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "MMCACache": "mmca", "SimpleMMCA": "mmca",
    "IMPLEMENTATION": "attention", "AbsorbedMLAAttention": "attention", "choose_backend": "attention",
    "disable": "attention", "enable": "attention", "kvslim_sdpa_attention": "attention",
}
__all__ = [*_LAZY, "register"]


def register() -> None:
    """Register `kvslim_sdpa` (AttentionInterface and AttentionMaskInterface) and every hosted
    class with the Auto classes; idempotent."""
    from . import attention, hosted

    attention.register()
    hosted.register()


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
