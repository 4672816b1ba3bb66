"""Tiny random models and a tokenizer built in-test: the suite never touches the Hub."""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([sample_text(3000, seed=s) for s in range(3)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(sample_text(8000, seed=7))
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


@pytest.fixture
def save_model(tmp_path, tokenizer_dir):
    """save_model(model, name) -> directory with weights, config and tokenizer."""
    import shutil

    def _save(model, name: str = "src"):
        path = tmp_path / name
        model.save_pretrained(str(path))
        for f in tokenizer_dir.iterdir():
            shutil.copy2(f, path / f.name)
        return path

    return _save


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()
