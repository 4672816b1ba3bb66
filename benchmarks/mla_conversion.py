"""MLA conversion benchmark (no training): perplexity at KV budgets 1/2, 1/4, 1/8.

Rows per model and budget: each latent init (svd = MHA2MLA's weight SVD, pca = TransMLA's
activation PCA, whitened = kvslim's) and each RoPE strategy (rotate, partial), all closed form,
plus kvslim's shipped default (whitened + rotate + layer-local refinement). Same protocol as
gqa_conversion.py: first 8,192 tokens, non-overlapping windows with BOS prepended.

    python benchmarks/mla_conversion.py [--models gutenberg,smollm2] [--budgets 0.5,0.25,0.125]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gqa_conversion import (  # noqa: E402
    CONVERT_CHILD,
    EVAL_CHILD,
    child,
    figure,
    gutenberg_spec,
    machine,
    machine_line,
    save_results,
    smollm2_spec,
)

# Published converters run with their own code on these fixtures (issue 7), no training.
PEERS = {
    ("llama-mha-gutenberg", 0.5): (124.3, 91.8), ("llama-mha-gutenberg", 0.25): (125.5, 112.4),
    ("llama-mha-gutenberg", 0.125): (130.8, 228.3), ("SmolLM2-135M-Instruct", 0.5): (49.4, 1992),
    ("SmolLM2-135M-Instruct", 0.25): (91.5, 11447), ("SmolLM2-135M-Instruct", 0.125): (210.4, 31025),
}


def variants(refine_steps: int | None, only_default: bool = False, skip_default: bool = False,
             only: list[str] | None = None) -> list[tuple[str, dict]]:
    default = (f"default (whitened / rotate + refine {refine_steps or 'default'})",
               dict(mla_init="whitened", rope_strategy="rotate", refine_steps=refine_steps))
    if only_default:
        return [default]
    closed = dict(refine_steps=0)  # closed form: explicit, the API's default refines
    rows = [("svd / rotate", dict(mla_init="svd", rope_strategy="rotate", **closed)),
            ("pca / rotate", dict(mla_init="pca", rope_strategy="rotate", **closed)),
            ("whitened / rotate", dict(mla_init="whitened", rope_strategy="rotate", **closed)),
            ("svd / partial", dict(mla_init="svd", rope_strategy="partial", **closed)),
            ("pca / partial", dict(mla_init="pca", rope_strategy="partial", **closed)),
            ("whitened / partial", dict(mla_init="whitened", rope_strategy="partial", **closed))]
    rows = rows if skip_default else rows + [default]
    return [r for r in rows if only is None or r[0] in only]


def run(models, budgets, refine_steps, work: Path, only_default: bool = False, save=None,
        skip_default: bool = False, only: list[str] | None = None) -> dict:
    rows = []
    for key in models:
        spec = {"gutenberg": gutenberg_spec, "smollm2": smollm2_spec}[key](work)
        if spec["source"].endswith(".gguf"):  # dequantise once: an exact identity conversion to safetensors
            hf_dir = work / "source-hf"
            child(CONVERT_CHILD, json.dumps(dict(source=spec["source"], output=str(hf_dir), to="gqa", kv_heads=3)))
            spec.update(source=str(hf_dir), calib_samples=32)
        base = child(EVAL_CHILD, spec["source"], json.dumps(spec["eval_files"]), str(spec["window"]))
        print(f"{spec['name']}: source perplexity {base['perplexity']:.2f}", flush=True)
        for budget in budgets:
            for label, kwargs in variants(refine_steps, only_default, skip_default, only):
                out = work / "mla-out"
                args = dict(source=spec["source"], output=str(out), to="mla", kv_budget=budget,
                            calib_data=spec["calib"], calib_samples=spec["calib_samples"],
                            calib_seq_len=spec["calib_seq_len"], **kwargs)
                conv = child(CONVERT_CHILD, json.dumps(args))
                ev = child(EVAL_CHILD, str(out), json.dumps(spec["eval_files"]), str(spec["window"]))
                rec = conv["record"]
                row = dict(model=spec["name"], budget=budget, variant=label, kv_rank=rec["mla"]["kv_rank"],
                           rope_dim=rec["mla"]["rope_dim"], rope_frequencies=rec["mla"]["rope_frequencies"],
                           kv_bytes_before=rec["kv_bytes_per_token_before"], kv_bytes_after=rec["kv_bytes_per_token_after"],
                           ppl_source=base["perplexity"], ppl=ev["perplexity"], seconds=round(conv["seconds"], 1),
                           peak_rss_mib=round(conv["peak_rss_mib"]),
                           refinement={k: v for k, v in (rec.get("refinement") or {}).items() if k != "relative_output_error"})
                rows.append(row)
                if save:  # keep what is measured even if a later row fails
                    save({"machine": machine(), "refine_steps": refine_steps, "rows": rows})
                print(f"  budget {budget:<6} {label:42s} ppl {row['ppl']:9.2f}  rank {row['kv_rank']:4d} rope "
                      f"{row['rope_dim']:3d}  {row['seconds']:7.1f}s {row['peak_rss_mib']:6d} MiB", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    return {"machine": machine(), "refine_steps": refine_steps, "rows": rows}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# MLA conversion benchmark (no training)", "",
        machine_line(m), "",
        "Perplexity: first 8,192 tokens, non-overlapping windows with BOS prepended (llama-mha-gutenberg: held-out "
        "books, 256-token windows; SmolLM2: WikiText-2 test, 512-token windows). Budget = KV bytes per token relative "
        "to the source; the cache holds the latent (rank + 1 anchor element) and the shared RoPE key. Peers: the "
        "published converters run with their own code on the same fixtures (from the issue).", "",
        "| model | budget | variant | rank + anchor + RoPE | KV bytes/token | ppl source | ppl | x source | TransMLA | MHA2MLA | s | RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        peers = PEERS.get((r["model"], r["budget"]), ("", ""))
        lines.append(
            f"| {r['model']} | 1/{round(1 / r['budget'])} | {r['variant']} | {r['kv_rank']} + 1 + {r['rope_dim']} | "
            f"{r['kv_bytes_before']:,} -> {r['kv_bytes_after']:,} | {r['ppl_source']:.2f} | {r['ppl']:.2f} | "
            f"{r['ppl'] / r['ppl_source']:.2f} | {peers[0]} | {peers[1]} | {r['seconds']} | {r['peak_rss_mib']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    fig, axes = figure(len(models), 6, 4.2)
    for ax, model in zip(axes, models):
        rows = [r for r in result["rows"] if r["model"] == model]
        budgets = sorted({r["budget"] for r in rows}, reverse=True)
        for variant in dict.fromkeys(r["variant"] for r in rows):
            ys = [next((r["ppl"] for r in rows if r["budget"] == b and r["variant"] == variant), float("nan")) for b in budgets]
            ax.plot(range(len(budgets)), ys, marker="o", label=variant)
        for j, name in enumerate(("TransMLA", "MHA2MLA")):
            ys = [PEERS.get((model, b), (float("nan"),) * 2)[j] for b in budgets]
            ax.plot(range(len(budgets)), ys, ls="--", marker="x", color="grey" if j else "black", label=f"{name} (published)")
        ax.axhline(rows[0]["ppl_source"], color="green", lw=1, label="source")
        ax.set_yscale("log")
        ax.set_xticks(range(len(budgets)))
        ax.set_xticklabels([f"1/{round(1 / b)}" for b in budgets])
        ax.set_xlabel("KV cache budget")
        ax.set_ylabel("perplexity (log)")
        ax.set_title(model)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gutenberg,smollm2")
    parser.add_argument("--budgets", default="0.5,0.25,0.125")
    parser.add_argument("--refine-steps", type=int, default=None, help="steps of the default row (default: the shipped --quality default)")
    parser.add_argument("--name", default="mla_conversion")
    parser.add_argument("--only-default", action="store_true", help="only the shipped default variant")
    parser.add_argument("--skip-default", action="store_true", help="only the closed-form variants")
    parser.add_argument("--variants", default=None, help="comma-separated labels to run, e.g. 'pca / partial'")
    args = parser.parse_args()
    def save(result: dict) -> None:  # after every row: keep what is measured if a later row fails
        save_results(args.name, result, markdown)

    with tempfile.TemporaryDirectory(prefix="kvslim-mla-bench-") as tmp:
        result = run(args.models.split(","), [float(b) for b in args.budgets.split(",")], args.refine_steps, Path(tmp),
                     args.only_default, save, args.skip_default,
                     args.variants.split(",") if args.variants else None)
    print(save_results(args.name, result, markdown, plot))


if __name__ == "__main__":
    main()
