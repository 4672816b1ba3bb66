"""Checkpoint conversion: sources, per-architecture adapters, head merging, atomic output."""

from .adapters import AttentionAdapter, get_adapter, register_adapter, supported_model_types
from .errors import ConversionError
from .gqa import METHODS, AttentionWeights, convert_attention
from .pipeline import TARGETS, convert
from .records import RECORD_FILE, ConversionRecord, HeadMergeRecord, MLARecord, read_record

__all__ = [
    "AttentionAdapter", "AttentionWeights", "ConversionError", "ConversionRecord", "METHODS", "RECORD_FILE",
    "TARGETS", "HeadMergeRecord", "MLARecord", "convert", "convert_attention", "get_adapter", "read_record",
    "register_adapter", "supported_model_types",
]
