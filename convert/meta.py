"""A model of a config with no weights in memory: its structure (names, shapes, modules) for free."""

from __future__ import annotations

import torch
from torch import nn


def meta_model(config, kind: str = "causal") -> nn.Module:
    """A model of `config` with weights on the meta device (buffers such as RoPE frequencies real).
    `kind`: "causal" (AutoModelForCausalLM) or "base" (AutoModel, e.g. encoders)."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    from ..modeling.hosted import register_for

    register_for(config.model_type)  # a kvslim-hosted output class

    auto = AutoModelForCausalLM if kind == "causal" else AutoModel
    with init_empty_weights(include_buffers=False):
        try:
            model = auto.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        except ValueError:  # classes without SDPA support (Gemma 2: soft-capping)
            model = auto.from_config(config, attn_implementation="eager", dtype=torch.float32)
    # from_config builds a model in training mode: dropout (BERT, GPT-2, OPT: 0.1) would add noise
    # to every calibration statistic and refinement target
    return model.eval()
