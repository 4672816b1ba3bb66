"""kvslim: convert Hugging Face MHA/GQA checkpoints to cheaper attention and recover quality."""

# Absolute imports: pytest imports this file as a bare module when the checkout's directory name is
# not a valid identifier (e.g. a clone named "ci-check"), where relative imports have no parent.
from kvslim.convert import ConversionError, convert
from kvslim.modeling import describe, evaluate_perplexity, inspect

__version__ = "0.1.0"
__all__ = ["ConversionError", "__version__", "convert", "describe", "evaluate_perplexity", "inspect"]
