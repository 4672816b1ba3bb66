"""GGUF sources read one tensor at a time (convert/gguf_source.py), checked against Transformers'
own GGUF loader on a tiny Llama GGUF written in-test the way llama.cpp writes one (q/k rows
permuted for its RoPE kernel, Q8_0-quantised matrices)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import kvslim

from common import make_model

gguf = pytest.importorskip("gguf")


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotate-half -> interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path: Path, quantise: bool = True) -> Path:
    from gguf import GGMLQuantizationType, GGUFWriter, get_tensor_name_map
    from gguf.constants import MODEL_ARCH
    from gguf.quants import quantize

    c = model.config
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    writer.add_token_scores([0.0] * c.vocab_size)
    writer.add_token_types([1] * c.vocab_size)
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        data = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, c.num_key_value_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if quantise and data.ndim == 2 and data.shape[1] % 32 == 0 and "embed" not in name:
            writer.add_tensor(gguf_name, quantize(data, GGMLQuantizationType.Q8_0),
                              raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def llama_gguf(tmp_path):
    model = make_model("llama", 4, 2, tie_word_embeddings=False)
    return model, write_llama_gguf(model, tmp_path / "tiny.gguf")


def test_gguf_tensors_are_read_one_at_a_time_and_match_transformers_loader(llama_gguf):
    from kvslim.convert.gguf_source import GGUFTensorReader
    from kvslim.convert.sources import _dequantise_all, open_source

    model, path = llama_gguf
    src = open_source(str(path))
    assert isinstance(src.reader, GGUFTensorReader)
    everything = _dequantise_all(path, src.config)
    assert set(src.reader.keys()) == set(everything)
    for name, tensor in everything.items():
        assert src.reader.shape(name) == tuple(tensor.shape)
        assert torch.equal(src.reader.get(name), tensor), name
    # the llama.cpp permutation is undone: q/k match the source up to Q8_0 rounding
    q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    err = (src.reader.get("model.layers.0.self_attn.q_proj.weight") - q).abs().max()
    assert err < 0.02 * q.abs().max()


def test_gguf_source_converts_like_its_dequantised_weights(llama_gguf, tmp_path, save_model):
    model, path = llama_gguf
    record = kvslim.convert(str(path), tmp_path / "mqa", to="mqa", method="mean", progress=False)
    assert record.kv_heads_after == 1
    from kvslim.convert.sources import _dequantise_all, open_source

    dequantised = make_model("llama", 4, 2, tie_word_embeddings=False)
    dequantised.load_state_dict(_dequantise_all(path, open_source(str(path)).config))
    reference = save_model(dequantised, "dequantised")
    kvslim.convert(str(reference), tmp_path / "ref", to="mqa", method="mean", progress=False)
    from safetensors.torch import load_file

    got, want = load_file(tmp_path / "mqa" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
