"""Every registered architecture (`supported_model_types()`) x every kind of conversion.

Cells:
- mha: replicate a GQA source's KV heads (or copy an MHA one): exact;
- round_trip: that MHA output merged back to the source's KV heads by mean-pooling: exact (the
  replicated heads are identical), so GQA -> MHA -> GQA gives the source back (for classes with
  no GQA form, the GQA source is kvslim's hosted GQA of the model);
- mqa: mean-pooling to one KV head: not exact, but it must load and decode;
- mla: full-rank MLA (every latent dimension, every rotary pair) of a one-KV-head source: exact.
In every cell the output reloads with plain `from_pretrained` (kvslim registered), and for causal
models cached greedy generation equals uncached greedy decoding; hosted outputs also run in a
fresh interpreter without kvslim. A cell that cannot apply would be skipped with the reason
(none today: every registered architecture takes every conversion).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import kvslim
from kvslim.convert import get_adapter, supported_model_types
from kvslim.convert.adapters import class_uses_kv_heads

from common import CALIB, IDS, greedy_without_cache, load, neox_shared_rotary_keys, outputs, registered_source

CELLS = ("mha", "round_trip", "mqa", "mla")
STEPS = 5
ENCODERS = {t for t in supported_model_types() if get_adapter(t).model_kind == "base"}


def _source(model_type: str, cell: str):
    """(source model, conversion options) of a cell, or a skip reason (str)."""
    if cell in ("mha", "round_trip", "mqa"):
        model = registered_source(model_type, 2 if class_uses_kv_heads(model_type) else None)
        return model, {"mha": dict(to="mha"), "round_trip": dict(to="mha"), "mqa": dict(to="mqa", method="mean")}[cell]
    if model_type == "gpt_neox":  # MHA-only class: heads that share their rotary key dims instead
        model = neox_shared_rotary_keys()
    else:
        model = registered_source(model_type, 1 if class_uses_kv_heads(model_type) else None)
    adapter = get_adapter(model_type)
    rope = adapter.rope(model.config)
    options = dict(to="mla", kv_rank=65)  # hidden + 1: the latent's full rank
    if rope != "none":
        options["rope_dim"] = int(rope.split(":")[1]) if ":" in rope else adapter.layout(model.config).head_dim
    return model, options


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, tokenizer_dir, text_file):
    """convert(model_type, cell) -> (source model, output path, kind), converted once per cell."""
    root = tmp_path_factory.mktemp("matrix")
    done: dict = {}

    def convert(model_type: str, cell: str):
        if (model_type, cell) in done:
            return done[(model_type, cell)]
        made = _source(model_type, cell)
        if isinstance(made, str):
            done[(model_type, cell)] = made
            return made
        model, options = made
        src = root / f"{model_type}-{cell}-src"
        model.save_pretrained(str(src))
        for f in tokenizer_dir.iterdir():
            shutil.copy2(f, src / f.name)
        kind = "base" if model_type in ENCODERS else "causal"
        if cell == "round_trip" and not class_uses_kv_heads(model_type):
            # Transformers' class is MHA-only: the GQA source is kvslim's hosted GQA of it
            gqa = root / f"{model_type}-{cell}-gqa"
            kvslim.convert(str(src), gqa, to="gqa", kv_heads=2, method="mean", progress=False)
            model, src = load(gqa, kind), gqa
        out = root / f"{model_type}-{cell}"
        kvslim.convert(str(src), out, calib_data=str(text_file), **options, **CALIB)
        if cell == "round_trip":
            back = root / f"{model_type}-{cell}-back"
            kvslim.convert(str(out), back, to="gqa", kv_heads=2, method="mean", progress=False)
            out = back
        done[(model_type, cell)] = model, out, kind
        return done[(model_type, cell)]

    return convert


CASES = [(t, c) for t in supported_model_types() for c in CELLS]


@pytest.mark.parametrize("model_type,cell", CASES, ids=[f"{t}-{c}" for t, c in CASES])
def test_cell(model_type, cell, matrix):
    made = matrix(model_type, cell)
    if isinstance(made, str):
        pytest.skip(made)
    source, path, kind = made
    converted = load(path, kind)
    assert converted.config.model_type in (model_type, f"kvslim_{model_type}", "deepseek_v3")
    if cell != "mqa":  # where the math says exact
        torch.testing.assert_close(outputs(converted), outputs(source), rtol=1e-4, atol=2e-4)
    if kind == "causal":
        generated = converted.generate(IDS[:1], max_new_tokens=STEPS, do_sample=False)
        want = greedy_without_cache(converted, STEPS)
        assert torch.equal(generated, want[:, :generated.shape[1]])  # generate stops early at EOS only
        assert generated.shape == want.shape or generated[0, -1] == converted.generation_config.eos_token_id


FRESH = """
import json, sys, torch
sys.modules["kvslim"] = None  # what a user without kvslim has
from transformers import AutoModel, AutoModelForCausalLM
ids, report = torch.tensor(IDS), {}
for path, kind in CASES:
    auto = AutoModelForCausalLM if kind == "causal" else AutoModel
    model = auto.from_pretrained(path, trust_remote_code=True, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=ids)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    report[path] = {"class": type(model).__name__, "module": type(model).__module__, "outputs": out.tolist()}
print(json.dumps(report))
"""


def test_hosted_outputs_run_in_a_fresh_interpreter_without_kvslim(matrix, tmp_path):
    cases = {}
    for model_type, cell in CASES:
        made = matrix(model_type, cell)
        if not isinstance(made, str) and json.loads((made[1] / "config.json").read_text()).get("auto_map"):
            cases[str(made[1])] = made
    assert len(cases) >= 20  # GPT-2, OPT, GPT-NeoX, BERT, RoBERTa in every cell, and the hosted MLA classes
    code = FRESH.replace("IDS", repr(IDS.tolist())).replace("CASES", repr(sorted((p, m[2]) for p, m in cases.items())))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for path, (_, _, kind) in cases.items():
        result = report[path]
        assert result["class"].startswith("Kvslim") and "kvslim" not in result["module"].split(".")[0]
        torch.testing.assert_close(torch.tensor(result["outputs"]), outputs(load(path, kind)), rtol=0, atol=1e-5)
