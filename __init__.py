"""kvslim: convert Hugging Face MHA/GQA checkpoints to cheaper attention and recover quality."""

from .convert import ConversionError, convert
from .modeling import describe, evaluate_perplexity, inspect

__version__ = "0.1.0"
__all__ = ["ConversionError", "__version__", "convert", "describe", "evaluate_perplexity", "inspect"]
