"""Model classes kvslim hosts for architectures whose Transformers class cannot express the
converted attention: GPT-2, GPT-NeoX, OPT, BERT and RoBERTa ignore `num_key_value_heads`, and MLA
of Qwen3, the Gemma family and the MoE models cannot become DeepseekV3 (per-head q/k norms, GeGLU,
soft-capping, softmax routers).

Each lives in one self-contained modeling file that is also copied next to the checkpoints it
describes (config `auto_map`), so they load with `trust_remote_code=True` without kvslim. Importing
kvslim registers them with the Auto classes, so no remote code is needed where kvslim is installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from . import (
    modeling_kvslim_bert,
    modeling_kvslim_gemma,
    modeling_kvslim_gpt2,
    modeling_kvslim_gpt_neox,
    modeling_kvslim_moe,
    modeling_kvslim_opt,
    modeling_kvslim_phi3,
    modeling_kvslim_qwen3,
)

HERE = Path(__file__).resolve().parent
# name -> (module, config class, {auto class: model class})
HOSTED = {
    "gpt2": (modeling_kvslim_gpt2, "KvslimGPT2Config",
             {"AutoModel": "KvslimGPT2Model", "AutoModelForCausalLM": "KvslimGPT2LMHeadModel"}),
    "gpt_neox": (modeling_kvslim_gpt_neox, "KvslimGPTNeoXConfig",
                 {"AutoModel": "KvslimGPTNeoXModel", "AutoModelForCausalLM": "KvslimGPTNeoXForCausalLM"}),
    "opt": (modeling_kvslim_opt, "KvslimOPTConfig", {"AutoModel": "KvslimOPTModel", "AutoModelForCausalLM": "KvslimOPTForCausalLM"}),
    "bert": (modeling_kvslim_bert, "KvslimBertConfig", {"AutoModel": "KvslimBertModel"}),
    "roberta": (modeling_kvslim_bert, "KvslimRobertaConfig", {"AutoModel": "KvslimRobertaModel"}),
    # MLA only: DeepseekV3 cannot express these blocks (q/k norms, GeGLU, soft-capping, ...)
    "qwen3": (modeling_kvslim_qwen3, "KvslimQwen3Config",
              {"AutoModel": "KvslimQwen3Model", "AutoModelForCausalLM": "KvslimQwen3ForCausalLM"}),
    "phi3": (modeling_kvslim_phi3, "KvslimPhi3Config",
             {"AutoModel": "KvslimPhi3Model", "AutoModelForCausalLM": "KvslimPhi3ForCausalLM"}),  # partial rotary
    "gemma": (modeling_kvslim_gemma, "KvslimGemmaConfig",
              {"AutoModel": "KvslimGemmaModel", "AutoModelForCausalLM": "KvslimGemmaForCausalLM"}),
    "gemma2": (modeling_kvslim_gemma, "KvslimGemma2Config",
               {"AutoModel": "KvslimGemma2Model", "AutoModelForCausalLM": "KvslimGemma2ForCausalLM"}),
    "gemma3_text": (modeling_kvslim_gemma, "KvslimGemma3TextConfig",
                    {"AutoModel": "KvslimGemma3TextModel", "AutoModelForCausalLM": "KvslimGemma3ForCausalLM"}),
    # MLA only: softmax routers (and Qwen2-MoE's shared expert) that DeepseekV3's MoE cannot express
    "mixtral": (modeling_kvslim_moe, "KvslimMixtralConfig",
                {"AutoModel": "KvslimMixtralModel", "AutoModelForCausalLM": "KvslimMixtralForCausalLM"}),
    "qwen2_moe": (modeling_kvslim_moe, "KvslimQwen2MoeConfig",
                  {"AutoModel": "KvslimQwen2MoeModel", "AutoModelForCausalLM": "KvslimQwen2MoeForCausalLM"}),
    "qwen3_moe": (modeling_kvslim_moe, "KvslimQwen3MoeConfig",
                  {"AutoModel": "KvslimQwen3MoeModel", "AutoModelForCausalLM": "KvslimQwen3MoeForCausalLM"}),
}
_AUTO = {"AutoModel": AutoModel, "AutoModelForCausalLM": AutoModelForCausalLM}


def register() -> None:
    for module, config_name, models in HOSTED.values():
        config_class = getattr(module, config_name)
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto, model_name in models.items():
            _AUTO[auto].register(config_class, getattr(module, model_name), exist_ok=True)


def hosted_config(name: str, source_config, kv_heads: int):
    """The hosted class's config for `source_config` with `kv_heads` KV heads (auto_map included)."""
    module, config_name, models = HOSTED[name]
    config_class = getattr(module, config_name)
    values = {k: v for k, v in source_config.to_dict().items() if k not in ("model_type", "auto_map", "architectures")}
    config = config_class(**{**values, "num_key_value_heads": kv_heads})
    stem = Path(module.__file__).stem
    config.auto_map = {"AutoConfig": f"{stem}.{config_name}", **{a: f"{stem}.{m}" for a, m in models.items()}}
    config.architectures = [models.get("AutoModelForCausalLM", models["AutoModel"])]
    return config


def save_modeling_file(name: str, directory: Path) -> None:
    """Copy the modeling file and the shared attention pieces it imports next to a checkpoint."""
    for path in (Path(HOSTED[name][0].__file__), HERE / "kvslim_attention.py"):
        shutil.copy2(path, Path(directory) / path.name)
