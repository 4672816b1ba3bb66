"""A quick proxy for tuning MLA refinement on SmolLM2-135M: convert only its first few layers and
score the full model with those layers' attention swapped in.

A whole SmolLM2 -> MLA conversion with refinement takes 20-40 min on 2 cores, too slow to compare
step counts, step sizes and tokens per step. This cuts the checkpoint to its first `--layers`
layers, converts that (`--to mla --kv-budget 0.25`, 32 x 512 WikiText-2 validation tokens, as
mla_conversion.py), then loads the full source model, replaces those layers' attention with the
converted DeepseekV3 attention (with its own rotary embedding) and measures WikiText-2 test
perplexity (first 8,192 tokens, 512-token windows). The source scores 29.92. Per-layer
calibration errors alone misled here: they can fall while held-out perplexity rises.

    python benchmarks/refine_batch.py --rows '[[100, 2048, 0.02], [400, 512, 0.02], [0, 512, 0.01]]'

A row is [steps, tokens per step, lr]; each converts in its own process with the default
refinement level set to exactly that (steps 0: the closed form).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gqa_conversion import CONVERT_CHILD, child, machine, machine_line, save_results, smollm2_spec  # noqa: E402

CUT_CHILD = r"""
import json, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst, layers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
dst.mkdir(parents=True, exist_ok=True)
config = json.loads((src / "config.json").read_text())
config["num_hidden_layers"] = layers
(dst / "config.json").write_text(json.dumps(config))
keep = lambda name: not name.startswith("model.layers.") or int(name.split(".")[2]) < layers
save_file({k: v for k, v in load_file(src / "model.safetensors").items() if keep(k)}, dst / "model.safetensors",
          metadata={"format": "pt"})
for f in src.iterdir():
    if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
        (dst / f.name).write_bytes(f.read_bytes())
print("RESULT{}")
"""

# the default refinement level replaced by the row's, then kvslim.convert as CONVERT_CHILD
ROW_CHILD = r"""
import json, sys
from kvslim.convert import refine
steps, tokens, lr = json.loads(sys.argv[2])
refine.REFINE_EFFORT["default"] = refine.Effort(tokens, lr, steps=steps)
sys.argv = sys.argv[:2]
""" + CONVERT_CHILD

HYBRID_CHILD = r"""
import json, sys, torch
from torch import nn
from kvslim.recipes.perplexity import load_causal_lm, perplexity, tokenize_corpus
source, converted, text = sys.argv[1:4]
model, tok = load_causal_lm(source)
cut, _ = load_causal_lm(converted)

class Swapped(nn.Module):  # the converted attention under the source's decoder layer
    def __init__(self, attention, rotary):
        super().__init__()
        self.attention, self.rotary = attention, rotary
    def forward(self, hidden_states, attention_mask=None, position_ids=None, **kwargs):
        positions = position_ids if position_ids is not None else torch.arange(hidden_states.shape[1])[None]
        return self.attention(hidden_states=hidden_states, attention_mask=attention_mask,
                              position_embeddings=self.rotary(hidden_states, positions))

for i, layer in enumerate(cut.model.layers):
    model.model.layers[i].self_attn = Swapped(layer.self_attn, cut.model.rotary_emb)
ids = tokenize_corpus([open(text).read()], tok, 8192)
r = perplexity(model, ids, 512, None, tok.bos_token_id, progress=False)
print("RESULT" + json.dumps({"perplexity": r.perplexity}))
"""


def run(rows: list, layers: int, work: Path) -> dict:
    spec = smollm2_spec(work)
    full, cut = work / "source-hf", work / "cut"
    child(CONVERT_CHILD, json.dumps(dict(source=spec["source"], output=str(full), to="gqa", kv_heads=3)))
    child(CUT_CHILD, str(full), str(cut), str(layers))
    out = []
    for steps, tokens, lr in rows:
        args = dict(source=str(cut), output=str(work / "out"), to="mla", kv_budget=0.25, calib_data=spec["calib"],
                    calib_samples=32, calib_seq_len=512, **({"refine_steps": 0} if steps == 0 else {}))
        conv = child(ROW_CHILD, json.dumps(args), json.dumps([steps, tokens, lr]))
        ev = child(HYBRID_CHILD, str(full), str(work / "out"), spec["eval_files"][0])
        refinement = conv["record"].get("refinement") or {}
        row = dict(steps=steps, tokens_per_step=tokens if steps else None, lr=lr if steps else None,
                   perplexity=round(ev["perplexity"], 3), seconds=round(conv["seconds"], 1),
                   layer_error=refinement.get("relative_output_error"))
        out.append(row)
        print(json.dumps(row), flush=True)
    return {"machine": machine(), "layers": layers, "rows": out}


def markdown(result: dict) -> str:
    lines = [f"# Refinement by steps, tokens per step and lr: SmolLM2-135M, first {result['layers']} layers -> MLA 1/4", "",
             f"The first {result['layers']} layers converted (32 x 512 WikiText-2 validation tokens), swapped into the "
             "full source model; WikiText-2 test perplexity (first 8,192 tokens, 512-token windows; the source scores "
             "29.92). Each row in its own process, one after another.", "",
             "| steps | tokens / step | lr | perplexity | conversion s | per-layer calibration output error |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        errors = " ".join(f"{e:.4f}" for e in r["layer_error"] or []) or "-"
        lines.append(f"| {r['steps']} | {r['tokens_per_step'] or '-'} | {r['lr'] or '-'} | {r['perplexity']:.3f} "
                     f"| {r['seconds']:.1f} | {errors} |")
    if result.get("note"):
        lines += ["", result["note"]]
    lines += ["", machine_line(result["machine"]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default='[[0, 512, 0.01], [100, 2048, 0.02], [400, 512, 0.02]]')
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--note", default="")
    parser.add_argument("--name", default="refine_batch_smollm2")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="kvslim-refine-batch-") as tmp:
        result = run(json.loads(args.rows), args.layers, Path(tmp))
    result["note"] = args.note
    print(save_results(args.name, result, markdown))


if __name__ == "__main__":
    main()
