"""What refinement costs and buys: llama-mha-gutenberg -> MLA, by refinement steps, this checkout
against another (e.g. the commit before a change), in one run.

Each row converts in a child process (`kvslim.convert`, the benchmark protocol of
gqa_conversion.py: 128 x 256 calibration tokens from 20 training books) and measures held-out
perplexity (first 8,192 tokens, 256-token windows) and each layer's relative output error after
refinement (from the conversion record).

    python benchmarks/refine_cost.py --rows '[[0,"this"],[100,"this"],[300,"other"],[300,"this"]]' \
        --other /path/containing/kvslim   # a directory holding a `kvslim` checkout (PYTHONPATH)
    python benchmarks/refine_cost.py --to gqa --kv-heads 2 ...

A row's steps may be null: the default of that checkout. A third element of a row holds other
convert options of that row (e.g. `[120, "this", {"refine_lr": 0.03}]`). Each row's time is also given as a ratio
to the same code's closed form (the mean of that code's 0-step rows, when the run has any).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gqa_conversion import CONVERT_CHILD, EVAL_CHILD, child, gutenberg_spec, machine, machine_line, save_results  # noqa: E402


def run(rows: list, target: dict, other: str | None) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = gutenberg_spec(work)
        for steps, code, *options in rows:
            os.environ["PYTHONPATH"] = other if code == "other" else ""
            extra = options[0] if options else {}  # other convert options of this row, e.g. {"refine_lr": 0.03}
            args = dict(source=spec["source"], output=str(work / "out"), **target,
                        calib_data=spec["calib"], calib_samples=spec["calib_samples"],
                        calib_seq_len=spec["calib_seq_len"], refine_steps=steps, **extra)
            conv = child(CONVERT_CHILD, json.dumps(args))
            ev = child(EVAL_CHILD, str(work / "out"), json.dumps(spec["eval_files"]), str(spec["window"]))
            refinement = conv["record"].get("refinement") or {}
            row = dict(code=code, options=extra, steps=refinement.get("steps", steps or 0), lr=refinement.get("lr"),
                       perplexity=round(ev["perplexity"], 3),
                       seconds=round(conv["seconds"], 1), layer_error=refinement.get("relative_output_error"),
                       closed_form_estimate_s=refinement.get("closed_form_estimate_s"))
            out.append(row)
            print(json.dumps(row), flush=True)
    os.environ.pop("PYTHONPATH", None)
    add_ratios(out)
    return out


def add_ratios(rows: list[dict]) -> None:
    """Each row's time over its code's closed form: the mean of that code's 0-step rows (run one
    first and one last: the closed form's time alone varies by 10-30% between runs here)."""
    for row in rows:
        closed = [r["seconds"] for r in rows if r["code"] == row["code"] and r["steps"] == 0]
        row["x_closed_form"] = round(row["seconds"] / (sum(closed) / len(closed)), 2) if closed else None


def markdown(r: dict) -> str:
    t = r["target"]
    what = {"mla": f"MLA, {t.get('kv_budget')} of the KV cache", "gqa": f"GQA, {t.get('kv_heads')} KV heads",
            "mqa": "MQA"}[t["to"]]
    lines = [f"# Refinement: cost and quality by steps (llama-mha-gutenberg -> {what}, no training)", "",
             "Held-out perplexity (first 8,192 tokens, 256-token windows). "
             + (f"'other' is `{r['other']}` ({r['other_note']}). " if r["other"] else "") + r["note"], "",
             "| code | refine steps | lr | perplexity | conversion s | x closed form | per-layer output error after refinement |",
             "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        err = " ".join(f"{e:.4f}" for e in row["layer_error"]) if row["layer_error"] else "-"
        ratio = "-" if row.get("x_closed_form") is None else f"{row['x_closed_form']:.2f}"
        lr = "-" if row.get("lr") is None else f"{row['lr']:g}"
        code = " ".join([row["code"], *(f"{k}={v}" for k, v in row.get("options", {}).items())])
        lines.append(f"| {code} | {row['steps']} | {lr} | {row['perplexity']:.3f} | {row['seconds']:.1f} | {ratio} | {err} |")
    return "\n".join(lines + ["", machine_line(r["machine"]), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default='[[0, "this"], [100, "this"], [300, "this"]]')
    parser.add_argument("--to", default="mla", choices=["mla", "gqa", "mqa"])
    parser.add_argument("--budget", type=float, default=0.25, help="--kv-budget of --to mla")
    parser.add_argument("--kv-heads", type=int, default=2, help="--kv-heads of --to gqa")
    parser.add_argument("--other", default=None, help="PYTHONPATH of the other checkout")
    parser.add_argument("--other-note", default="", help="what the other checkout is")
    parser.add_argument("--note", default="", help="a sentence for the table (e.g. the load on the machine)")
    parser.add_argument("--name", default="refine_cost_gutenberg")
    args = parser.parse_args()
    target = {"to": args.to, **({"kv_budget": args.budget} if args.to == "mla" else {}),
              **({"kv_heads": args.kv_heads} if args.to == "gqa" else {})}
    rows = run(json.loads(args.rows), target, args.other)
    result = dict(machine=machine(), target=target, other=args.other, other_note=args.other_note,
                  note=args.note, rows=rows)
    print(save_results(args.name, result, markdown))


if __name__ == "__main__":
    main()
