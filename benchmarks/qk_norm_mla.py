"""MLA on a source unlike our other fixtures (issue 21): one KV head, head_dim 128, q/k-norm,
local (window 64, RoPE 10k) and global (RoPE 1M) layers. Where does the one-shot loss come from?

The fixture is `gemma3-mqa-gutenberg`, trained by `train_qk_norm_fixture.py` on first use and cached.
Perplexity on llama-mha-gutenberg's held-out books (first 8,192 tokens, 256-token windows, the same
protocol and tokenizer as gqa_conversion.py). Rows, all no training:
- full rank (every RoPE pair kept, latent rank = head_dim): must equal the source;
- the default at 1/2 and 1/4 of the cache, closed form and refined;
- the split of a 1/2 budget between the RoPE key and the latent (closed form);
- the loss taken apart: RoPE pairs dropped with a lossless latent, and a compressed latent with
  every RoPE pair kept;
- per layer (local / global): the relative error of each attention block's output in the
  converted model (recipes.report.compare on 8 held-out windows).

    python benchmarks/qk_norm_mla.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_qk_norm_fixture import ensure_fixture  # noqa: E402

from gqa_conversion import CONVERT_CHILD, EVAL_CHILD, child, gutenberg_books, machine, machine_line, save_results  # noqa: E402

REPORT_CHILD = r"""
import json, sys
import torch
from kvslim.recipes.perplexity import load_causal_lm
from kvslim.recipes.report import compare
source, converted, files, window = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
(src, tok), (conv, _) = load_causal_lm(source), load_causal_lm(converted)
ids = tok("".join(open(f, encoding="utf-8").read()[:20000] for f in files[:2]))["input_ids"]
windows = torch.tensor(ids[: 8 * window]).view(8, window)
print("RESULT" + json.dumps(compare(src.float().eval(), conv.float().eval(), windows, progress=False)["layers"]))
"""


def rows_to_run(head_dim: int, quick: bool) -> list[tuple[str, str, dict]]:
    """(group, label, convert options). Cache per token and layer of the source: 2 x head_dim."""
    closed = dict(refine_steps=0)
    pairs = head_dim // 2
    uniform = dict(allocation="uniform", **closed)
    rows = [("exactness", f"full rank (rank {head_dim} + RoPE {head_dim})", dict(kv_rank=head_dim, rope_dim=head_dim, **closed)),
            ("default (per-layer)", "1/2, closed form", dict(kv_budget=0.5, **closed)),
            ("default (per-layer)", "1/2, default (refined)", dict(kv_budget=0.5)),
            ("default (per-layer)", "1/4, closed form", dict(kv_budget=0.25, **closed)),
            ("default (per-layer)", "1/4, default (refined)", dict(kv_budget=0.25)),
            ("default (per-layer)", "1/8, closed form", dict(kv_budget=0.125, **closed)),
            ("uniform", "1/2, closed form", dict(kv_budget=0.5, **uniform)),
            ("uniform", "1/4, closed form", dict(kv_budget=0.25, **uniform)),
            ("uniform", "1/8, closed form", dict(kv_budget=0.125, **uniform))]
    for rope in (16, 32, 64, 96):
        rows.append(("split of 1/2", f"RoPE {rope} + latent {head_dim - 1 - rope}",
                     dict(kv_budget=0.5, rope_dim=rope, **closed)))
    for rope in (32, 64, 96):  # the latent holds the un-rotated keys and the values exactly
        rows.append(("RoPE pairs dropped only", f"RoPE {rope} ({pairs - rope // 2} of {pairs} pairs lose rotation), "
                     f"lossless latent {2 * head_dim - rope}", dict(kv_rank=2 * head_dim - rope, rope_dim=rope, **closed)))
    for rank in (96, 64, 32):  # every pair rotates: the latent only has to hold the values
        rows.append(("latent only", f"every RoPE pair kept, latent {rank} of {head_dim} values",
                     dict(kv_rank=rank, rope_dim=head_dim, **closed)))
    return [r for r in rows if not quick or "refined" not in r[1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="closed-form rows only")
    parser.add_argument("--name", default="qk_norm_mla")
    parser.add_argument("--groups", nargs="*", default=None, help="only these row groups (e.g. uniform exactness)")
    args = parser.parse_args()
    source = ensure_fixture()
    config = json.loads((source / "config.json").read_text())
    training = json.loads((source / "training.json").read_text())
    train, held = gutenberg_books()
    result = {"machine": machine(), "fixture": {"name": source.name, "config": {
        k: config[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
                               "num_hidden_layers", "layer_types", "sliding_window", "rope_parameters")},
        "training": training}, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib = work / "calib.txt"  # 20 training books, as for llama-mha-gutenberg
        calib.write_text("\n\n".join(Path(b).read_text(encoding="utf-8")[:200_000] for b in train[:20]))
        base = child(EVAL_CHILD, str(source), json.dumps(held), "256")["perplexity"]
        result["source_perplexity"] = base
        print(f"{source.name}: held-out perplexity {base:.2f}", flush=True)
        for group, label, options in rows_to_run(config["head_dim"], args.quick):
            if args.groups and not any(group.startswith(g) for g in args.groups):
                continue
            out = work / "mla"
            conv = child(CONVERT_CHILD, json.dumps(dict(source=str(source), output=str(out), to="mla", calib_data=str(calib),
                                                        calib_samples=128, calib_seq_len=256, **options)))
            ppl = child(EVAL_CHILD, str(out), json.dumps(held), "256")["perplexity"]
            layers = child(REPORT_CHILD, str(source), str(out), json.dumps(held), "256")
            mla = conv["record"]["mla"]
            cache = mla["cache_elements_per_layer"]
            mean = sum(cache) / len(cache) if isinstance(cache, list) else cache
            row = dict(group=group, label=label, options=options, perplexity=ppl, ratio=ppl / base,
                       kv_rank=mla["kv_rank"], rope_dim=mla["rope_dim"], cache_elements_per_layer=cache,
                       budget=mean / (2 * config["head_dim"] * config["num_key_value_heads"]),
                       allocation=mla.get("allocation"),
                       rope_frequencies=mla.get("rope_frequencies"), seconds=conv["seconds"],
                       layer_error=[round(r["attention_relative_error"], 4) for r in layers])
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    print(save_results(args.name, result, markdown))


def markdown(r: dict) -> str:
    f = r["fixture"]
    c = f["config"]
    kinds = ["L" if t == "sliding_attention" else "G" for t in c["layer_types"]]
    lines = ["# MLA on a q/k-norm MQA source (no training)", "",
             f"Fixture `{f['name']}`: Gemma-3-style (`gemma3_text`), {c['num_attention_heads']} query heads / "
             f"{c['num_key_value_heads']} KV head, head_dim {c['head_dim']}, hidden {c['hidden_size']}, "
             f"{c['num_hidden_layers']} layers ({''.join(kinds)}: L = sliding window {c['sliding_window']}, RoPE "
             f"{c['rope_parameters']['sliding_attention']['rope_theta']:g}; G = global, RoPE "
             f"{c['rope_parameters']['full_attention']['rope_theta']:g}), q/k RMSNorm, GeGLU; trained "
             f"{f['training']['steps']} steps x {f['training']['batch']} x {f['training']['context']} tokens on the "
             f"Gutenberg training books ({f['training']['seconds']:.0f} s, {f['training']['threads']} threads).", "",
             f"Held-out perplexity (llama-mha-gutenberg's held-out books, first 8,192 tokens, 256-token windows): "
             f"source **{r['source_perplexity']:.2f}**. Cache per token and layer: the source's "
             f"{2 * c['head_dim'] * c['num_key_value_heads']} elements; MLA's rank + RoPE + 1 key-norm gain. Per-layer "
             "rows list each layer's latent rank + RoPE dims after the mean cache.", "",
             "| group | row | cache / source | perplexity | x source | per-layer attention error (" + " ".join(kinds)
             + ") | s |", "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        cache = row["cache_elements_per_layer"]
        if isinstance(cache, list):  # per layer: rank + RoPE of each, and the mean cache
            cache = f"{sum(cache) / len(cache):.0f}: " + " ".join(f"{k}+{d}" for k, d in zip(row["kv_rank"], row["rope_dim"]))
        lines.append(f"| {row['group']} | {row['label']} | {cache} ({row['budget']:.3f}) | "
                     f"{row['perplexity']:.2f} | {row['ratio']:.3f} | {' '.join(f'{e:.3f}' for e in row['layer_error'])} | "
                     f"{row['seconds']:.0f} |")
    lines += ["", *([r["note"], ""] if r.get("note") else []), machine_line(r["machine"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
