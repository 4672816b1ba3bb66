"""Model classes kvslim hosts for architectures whose Transformers class cannot express the
converted attention: GPT-2, GPT-NeoX, OPT, BERT and RoBERTa ignore `num_key_value_heads`, and MLA
of Qwen3, the Gemma family and the MoE models cannot become DeepseekV3 (per-head q/k norms, GeGLU,
soft-capping, softmax routers).

Each lives in one self-contained modeling file that is also copied next to the checkpoints it
describes (config `auto_map`), so they load with `trust_remote_code=True` without kvslim. Importing
`register()` registers them with the Auto classes (kvslim's own loaders call it), so no remote
code is needed where kvslim is installed. Nothing here imports a modeling file before it is needed:
a rename in one Transformers model cannot break the conversion of another.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> (modeling file, config class, {auto class: model class}); a hosted class's model_type
# is "kvslim_" + its name
HOSTED = {
    "gpt2": ("modeling_kvslim_gpt2", "KvslimGPT2Config",
             {"AutoModel": "KvslimGPT2Model", "AutoModelForCausalLM": "KvslimGPT2LMHeadModel"}),
    "gpt_neox": ("modeling_kvslim_gpt_neox", "KvslimGPTNeoXConfig",
                 {"AutoModel": "KvslimGPTNeoXModel", "AutoModelForCausalLM": "KvslimGPTNeoXForCausalLM"}),
    "opt": ("modeling_kvslim_opt", "KvslimOPTConfig", {"AutoModel": "KvslimOPTModel", "AutoModelForCausalLM": "KvslimOPTForCausalLM"}),
    "bert": ("modeling_kvslim_bert", "KvslimBertConfig", {"AutoModel": "KvslimBertModel"}),
    "roberta": ("modeling_kvslim_bert", "KvslimRobertaConfig", {"AutoModel": "KvslimRobertaModel"}),
    # MLA only: DeepseekV3 cannot express these blocks (q/k norms, GeGLU, soft-capping, ...)
    "qwen3": ("modeling_kvslim_qwen3", "KvslimQwen3Config",
              {"AutoModel": "KvslimQwen3Model", "AutoModelForCausalLM": "KvslimQwen3ForCausalLM"}),
    "phi3": ("modeling_kvslim_phi3", "KvslimPhi3Config",
             {"AutoModel": "KvslimPhi3Model", "AutoModelForCausalLM": "KvslimPhi3ForCausalLM"}),  # partial rotary
    "gemma": ("modeling_kvslim_gemma", "KvslimGemmaConfig",
              {"AutoModel": "KvslimGemmaModel", "AutoModelForCausalLM": "KvslimGemmaForCausalLM"}),
    "gemma2": ("modeling_kvslim_gemma", "KvslimGemma2Config",
               {"AutoModel": "KvslimGemma2Model", "AutoModelForCausalLM": "KvslimGemma2ForCausalLM"}),
    "gemma3_text": ("modeling_kvslim_gemma", "KvslimGemma3TextConfig",
                    {"AutoModel": "KvslimGemma3TextModel", "AutoModelForCausalLM": "KvslimGemma3ForCausalLM"}),
    # MLA only: softmax routers (and Qwen2-MoE's shared expert) that DeepseekV3's MoE cannot express
    "mixtral": ("modeling_kvslim_moe", "KvslimMixtralConfig",
                {"AutoModel": "KvslimMixtralModel", "AutoModelForCausalLM": "KvslimMixtralForCausalLM"}),
    "qwen2_moe": ("modeling_kvslim_moe", "KvslimQwen2MoeConfig",
                  {"AutoModel": "KvslimQwen2MoeModel", "AutoModelForCausalLM": "KvslimQwen2MoeForCausalLM"}),
    "qwen3_moe": ("modeling_kvslim_moe", "KvslimQwen3MoeConfig",
                  {"AutoModel": "KvslimQwen3MoeModel", "AutoModelForCausalLM": "KvslimQwen3MoeForCausalLM"}),
}
PREFIX = "kvslim_"


def module(name: str):
    """The modeling module of hosted class `name` (imported on first use)."""
    return importlib.import_module(f"{__name__}.{HOSTED[name][0]}")


def config_class(name: str):
    return getattr(module(name), HOSTED[name][1])


def hosted_name(model_type: str) -> str | None:
    """The hosted class a model_type names (kvslim_<name>), or None for any other model_type."""
    name = model_type[len(PREFIX):] if model_type.startswith(PREFIX) else None
    return name if name in HOSTED else None


def register(name: str | None = None) -> None:
    """Register hosted class `name` (all when None) with the Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    autos = {"AutoModel": AutoModel, "AutoModelForCausalLM": AutoModelForCausalLM}
    for key in HOSTED if name is None else [name]:
        config, models = config_class(key), HOSTED[key][2]
        AutoConfig.register(config.model_type, config, exist_ok=True)
        for auto, model_name in models.items():
            autos[auto].register(config, getattr(module(key), model_name), exist_ok=True)


def register_for(model_type: str) -> None:
    """Register the hosted class of `model_type` when it is one (kvslim_<name>)."""
    name = hosted_name(model_type)
    if name is not None:
        register(name)


def hosted_config(name: str, source_config, kv_heads: int):
    """The hosted class's config for `source_config` with `kv_heads` KV heads (auto_map included)."""
    stem, config_name, models = HOSTED[name]
    values = {k: v for k, v in source_config.to_dict().items() if k not in ("model_type", "auto_map", "architectures")}
    config = config_class(name)(**{**values, "num_key_value_heads": kv_heads})
    config.auto_map = {"AutoConfig": f"{stem}.{config_name}", **{a: f"{stem}.{m}" for a, m in models.items()}}
    config.architectures = [models.get("AutoModelForCausalLM", models["AutoModel"])]
    return config


def save_modeling_file(name: str, directory: Path) -> None:
    """Copy the modeling file and the shared attention pieces it imports next to a checkpoint."""
    for path in (HERE / f"{HOSTED[name][0]}.py", HERE / "kvslim_attention.py"):
        shutil.copy2(path, Path(directory) / path.name)
