"""Helpers shared by the test files: tiny random models of every registered architecture,
calibration text, and the checks the tests repeat (outputs, greedy decoding, fresh interpreters).
Fixtures live in conftest.py; test files import helpers from here, never from each other."""

from __future__ import annotations

import random
import subprocess
import sys

import torch

import kvslim

WORDS = ("the a of and to in is was he she it that for on with as his her at by from they we you "
         "this had not but be are were which one all would there their what so up out if about who "
         "get go me when make can like time no just him know take people into year your good some "
         "could them see other than then now look only come its over think also back after use two "
         "how our work first well way even new want because any these give day most us").split()


def sample_text(n_words: int = 6000, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < n_words:
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + ".")
    return " ".join(sentences)


def build_tokenizer(path):
    """A small byte-level BPE tokenizer trained on `sample_text`, saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([sample_text(3000, seed=s) for s in range(3)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path))
    return path


def tiny_config(model_type: str = "llama", heads: int = 8, kv_heads: int = 8, **overrides):
    from transformers import AutoConfig

    base = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
                max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                tie_word_embeddings=False)
    if model_type == "gemma3_text":
        base.update(sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                    query_pre_attn_scalar=16)
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def randomize_extras(model, seed: int = 0) -> None:
    """Give biases and norm weights non-trivial values so their handling is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def make_model(model_type: str = "llama", heads: int = 8, kv_heads: int = 8, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, heads, kv_heads, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomize_extras(model, seed)
    return model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = dict(calib_samples=8, calib_seq_len=32, refine_steps=0, progress=False)


def gpt2(heads=4, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=heads, vocab_size=320, n_positions=128, bos_token_id=1,
                        eos_token_id=2, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def bert(heads=4, seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=heads, intermediate_size=96,
                        vocab_size=320, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertModel(config).eval()


def phi3(heads=4, kv_heads=4, seed=0, **extra):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    config = Phi3Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv_heads,
                        intermediate_size=96, vocab_size=320, max_position_embeddings=128, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0, **extra)
    return Phi3ForCausalLM(config).eval()


def outputs(model, ids=IDS, mask=None):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def greedy_without_cache(model, steps: int, ids=IDS[:1]) -> torch.Tensor:
    """The tokens greedy generate() must give: one full forward per step, no cache."""
    for _ in range(steps):
        ids = torch.cat([ids, outputs(model, ids)[:, -1:].argmax(-1)], dim=1)
    return ids


def load(path, kind="causal", **kwargs):
    from transformers import AutoModel, AutoModelForCausalLM

    kvslim.register()  # kvslim's hosted classes, as a user with kvslim installed loads them
    auto = AutoModelForCausalLM if kind == "causal" else AutoModel
    return auto.from_pretrained(str(path), attn_implementation="eager", **kwargs).eval()


def fresh_interpreter_outputs(path, kind: str, tmp_path) -> torch.Tensor:
    """Load `path` with trust_remote_code=True in a new Python where importing kvslim fails."""
    out = tmp_path / f"remote-{kind}.pt"
    code = f"""
import sys, torch
sys.modules["kvslim"] = None  # kvslim is not available here
from transformers import AutoModel, AutoModelForCausalLM
auto = AutoModelForCausalLM if {kind!r} == "causal" else AutoModel
model = auto.from_pretrained({str(path)!r}, trust_remote_code=True, attn_implementation="eager").eval()
assert "kvslim" not in type(model).__module__.split(".")[0]
ids = torch.tensor({IDS.tolist()})
with torch.no_grad():
    o = model(input_ids=ids)
torch.save((o.logits if hasattr(o, "logits") else o.last_hidden_state, type(model).__name__), {str(out)!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result, name = torch.load(out)
    assert name.startswith("Kvslim")
    return result


def opt(heads=4, seed=0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=96, num_attention_heads=heads, vocab_size=320,
                       max_position_embeddings=128, word_embed_proj_dim=64, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, dropout=0.0, attention_dropout=0.0)
    return OPTForCausalLM(config).eval()


def neox(heads=4, seed=0, rotary_pct=0.25):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=heads,
                           vocab_size=320, max_position_embeddings=128, rotary_pct=rotary_pct, bos_token_id=1,
                           eos_token_id=2, hidden_dropout=0.0, attention_dropout=0.0)
    return GPTNeoXForCausalLM(config).eval()


def neox_shared_rotary_keys(rotary_pct=0.5):
    """GPT-NeoX whose heads share their rotary key dims (free dims and values differ): the kind of
    multi-head key one shared RoPE key reproduces exactly."""
    model = neox(rotary_pct=rotary_pct)
    hd, nh = 16, 4
    rot = int(hd * rotary_pct)
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            qkv = layer.attention.query_key_value
            per_head = qkv.weight.view(nh, 3, hd, -1)
            bias = qkv.bias.view(nh, 3, hd)
            per_head[1:, 1, :rot] = per_head[0, 1, :rot]
            bias[1:, 1, :rot] = bias[0, 1, :rot]
    return model


def roberta(heads=4, seed=0):
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(seed)
    return RobertaModel(RobertaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=heads,
                                      intermediate_size=96, vocab_size=320, max_position_embeddings=130,
                                      pad_token_id=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()


def registered_source(model_type: str, kv_heads: int | None = None):
    """A tiny random model of any registered model type, with `kv_heads` KV heads where its class
    has a GQA form (None: as many as query heads). Query heads: 8, or 4 for the MHA-only classes."""
    builders = {"gpt2": gpt2, "opt": opt, "gpt_neox": neox, "bert": bert, "roberta": roberta}
    if model_type in builders:
        return builders[model_type]()
    if model_type == "phi3":
        return phi3(heads=4, kv_heads=kv_heads or 4)
    extra = {"attn_logit_softcapping": 5.0, "sliding_window": 8} if model_type == "gemma2" else {}
    return make_model(model_type, 8, kv_heads or 8, **extra)
