"""kvslim: convert Hugging Face MHA/GQA checkpoints to cheaper attention and recover quality.

`import kvslim` imports no Transformers model implementation: the evaluation names below load on
first use (PEP 562), and the hosted model classes when a conversion or a loader needs them.
`kvslim.register()` registers kvslim's attention (`attn_implementation="kvslim_sdpa"`) and hosted
model classes with Transformers; kvslim's own loaders and the CLI call it.
"""

# Absolute imports: pytest imports this file as a bare module when the checkout's directory name is
# not a valid identifier (e.g. a clone named "ci-check"), where relative imports have no parent.
import importlib

# `kvslim.convert` is the function; bound here, after the subpackage of the same name is imported
from kvslim.convert import ConversionError, convert

__version__ = "0.1.0"
_LAZY = {"describe": "kvslim.recipes.summary", "inspect": "kvslim.recipes.summary",
         "evaluate_perplexity": "kvslim.recipes.perplexity", "register": "kvslim.modeling"}
__all__ = ["ConversionError", "__version__", "convert", "describe", "evaluate_perplexity", "inspect", "register"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvslim' has no attribute {name!r}")
