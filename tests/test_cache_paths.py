"""Every path that keeps its own KV cache, on the installed Transformers release.

For each converted model (Transformers' own classes for Llama GQA and DeepseekV3 MLA, kvslim's
absorbed DeepseekV3 decoding, every hosted class): cached greedy generation equals greedy decoding
by full forwards without a cache, and the cache holds exactly what the conversion record says
(KV heads for GQA; only the latent, RoPE key and key-norm scales for MLA). The hosted checkpoints
are also loaded in a fresh interpreter where kvslim cannot be imported, as their users load them.

A Transformers release that renames how a decoder layer passes the cache (5.24: `past_key_values`
-> `cache`) fails here: the caches stay empty and cached tokens differ.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import kvslim
from kvslim.compat import cache_argument, output_cache
from kvslim.recipes.publish import CAUSAL_LM_CLASSES

from common import IDS, greedy_without_cache, load, registered_source

STEPS = 6
FAST = dict(calib_samples=8, calib_seq_len=32, refine_steps=0, progress=False)


# (source architecture, target): every class that owns a cache path after conversion
CASES = [
    ("llama", "gqa"), ("llama", "mla"),  # Transformers' Llama and DeepseekV3
    ("gpt2", "gqa"), ("gpt2", "mla"), ("opt", "gqa"), ("opt", "mla"), ("gpt_neox", "gqa"), ("gpt_neox", "mla"),
    ("qwen3", "mla"), ("phi3", "mla"), ("gemma", "mla"), ("gemma2", "mla"), ("gemma3_text", "mla"),
    ("mixtral", "mla"), ("qwen2_moe", "mla"), ("qwen3_moe", "mla"),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer_dir, text_file):
    """{case: (output dir, conversion record)}, converted once for the module."""
    import shutil

    root = tmp_path_factory.mktemp("cache-paths")
    done = {}
    for arch, to in CASES:
        src = root / f"{arch}-src"
        registered_source(arch, 4 if arch == "phi3" else 2).save_pretrained(str(src))  # Phi-3 MLA: 4 heads, MHA
        for f in tokenizer_dir.iterdir():
            shutil.copy2(f, src / f.name)
        options = dict(kv_heads=2) if to == "gqa" else dict(kv_budget=0.5)
        out = root / f"{arch}-{to}"
        done[(arch, to)] = out, kvslim.convert(str(src), out, to=to, calib_data=str(text_file), **options, **FAST)
    return done


def _cache_bytes_per_token(cache) -> int:
    """Bytes the cache stores per token, summed over layers (keys and values)."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None and t.numel():
                total += t[0, :, 0].numel() * t.element_size()
    return total


@pytest.mark.parametrize("case", CASES, ids=[f"{a}-{t}" for a, t in CASES])
def test_cached_greedy_equals_uncached_and_cache_holds_the_record(case, converted):
    from transformers import DynamicCache

    path, record = converted[case]
    model = load(path)
    want = greedy_without_cache(model, STEPS)
    generated = model.generate(IDS[:1], max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(generated.sequences, want)
    cache = output_cache(generated)
    assert cache is not None and cache.get_seq_length() == want.shape[1] - 1  # the last token is never fed back
    assert _cache_bytes_per_token(cache) == record.kv_bytes_per_token_after

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=IDS, use_cache=True, **{cache_argument(model): cache})
    assert cache.get_seq_length() == IDS.shape[1]  # the model filled the cache it was given
    if case[1] == "gqa":
        assert all(layer.keys.shape[1] == 2 for layer in cache.layers)  # two KV heads, never repeated
    elif type(model).__name__.startswith("Kvslim"):
        assert all(layer.values.numel() == 0 for layer in cache.layers)  # only the latent entry
    else:  # DeepseekV3: the normalised latent as keys, the shared RoPE key as values
        assert all(layer.keys.shape[1] == 1 and layer.keys.shape[-1] == model.config.kv_lora_rank
                   for layer in cache.layers)


def test_absorbed_deepseek_decoding_matches_uncached(converted):
    from kvslim.modeling import AbsorbedMLAAttention, enable

    path, record = converted[("llama", "mla")]
    model = load(path)
    want = greedy_without_cache(model, STEPS)
    enable(model)
    assert all(isinstance(layer.self_attn, AbsorbedMLAAttention) for layer in model.model.layers)
    for implementation in ("dynamic", "static"):
        out = model.generate(IDS[:1], max_new_tokens=STEPS, do_sample=False, cache_implementation=implementation)
        assert torch.equal(out, want)
    generated = model.generate(IDS[:1], max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True)
    assert _cache_bytes_per_token(output_cache(generated)) == record.kv_bytes_per_token_after


FRESH = """
import json, sys, torch
sys.modules["kvslim"] = None  # what a user without kvslim has
from transformers import AutoModelForCausalLM
ids, steps, report = torch.tensor(IDS), STEPS, {}
for path in PATHS:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation="eager").eval()
    assert "kvslim" not in type(model).__module__.split(".")[0]
    want = ids
    with torch.no_grad():
        for _ in range(steps):
            want = torch.cat([want, model(input_ids=want).logits[:, -1:].argmax(-1)], dim=1)
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    report[path] = {"class": type(model).__name__, "equal": bool(torch.equal(out.sequences, want)),
                    "cached": cache.get_seq_length(),
                    "empty_values": all(l.values is None or l.values.numel() == 0 for l in cache.layers)}
print(json.dumps(report))
"""


def test_hosted_checkpoints_generate_in_a_fresh_interpreter_without_kvslim(converted, tmp_path):
    hosted = {str(path): case for case, (path, _) in converted.items()
              if json.loads((path / "config.json").read_text()).get("auto_map")}
    assert len(hosted) >= 12  # every hosted class above
    code = (FRESH.replace("IDS", repr(IDS[:1].tolist())).replace("STEPS", str(STEPS))
            .replace("PATHS", repr(sorted(hosted))))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for path, result in report.items():
        arch, to = hosted[path]
        assert result["class"].startswith("Kvslim"), (arch, to, result)
        assert result["equal"], (arch, to, result)  # cached tokens == uncached tokens
        assert result["cached"] == IDS.shape[1] + STEPS - 1, (arch, to, result)
        assert result["empty_values"] == (to == "mla"), (arch, to, result)


def test_every_mla_output_names_its_architecture(converted):
    """Tools that dispatch on `architectures` (vLLM, TGI, the Hub's widgets) must see a causal LM."""
    for (arch, to), (path, _) in converted.items():
        if to == "mla":
            config = json.loads((path / "config.json").read_text())
            assert config.get("architectures", [""])[0].endswith(CAUSAL_LM_CLASSES), (arch, config.get("architectures"))
