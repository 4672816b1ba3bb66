"""Running converted models: attention summaries (KV cache cost) and perplexity evaluation."""

from .perplexity import PerplexityResult, evaluate_perplexity, load_causal_lm, perplexity
from .summary import ModelSummary, describe, inspect

__all__ = ["ModelSummary", "PerplexityResult", "describe", "evaluate_perplexity", "inspect", "load_causal_lm", "perplexity"]
from .mmca import MMCACache, SimpleMMCA  # noqa: E402

__all__ += ["MMCACache", "SimpleMMCA"]
from .attention import (  # noqa: E402
    IMPLEMENTATION,
    AbsorbedMLAAttention,
    choose_backend,
    disable,
    enable,
    kvslim_sdpa_attention,
    register,
)

register()
__all__ += ["IMPLEMENTATION", "AbsorbedMLAAttention", "choose_backend", "disable", "enable", "kvslim_sdpa_attention", "register"]
from .hosted import register as _register_hosted  # noqa: E402

_register_hosted()
