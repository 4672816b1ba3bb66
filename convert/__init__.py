"""Checkpoint conversion: sources, per-architecture adapters, head merging, atomic output."""

from .adapters import AttentionAdapter, get_adapter, register_adapter, supported_model_types
from .errors import ConversionError
from .gqa import METHODS, AttentionWeights, convert_attention
from .pipeline import RECORD_FILE, TARGETS, ConversionRecord, convert

__all__ = [
    "AttentionAdapter", "AttentionWeights", "ConversionError", "ConversionRecord", "METHODS", "RECORD_FILE",
    "TARGETS", "convert", "convert_attention", "get_adapter", "register_adapter", "supported_model_types",
]
