"""What refinement costs and buys: llama-mha-gutenberg -> MLA, by refinement steps, this checkout
against another (e.g. the commit before a change), in one run.

Each row converts in a child process (`kvslim.convert`, the benchmark protocol of
gqa_conversion.py: 128 x 256 calibration tokens from 20 training books) and measures held-out
perplexity (first 8,192 tokens, 256-token windows) and each layer's relative output error after
refinement (from the conversion record).

    python benchmarks/refine_cost.py --rows '[[0,"this"],[100,"this"],[300,"other"],[300,"this"]]' \
        --other /path/containing/kvslim   # a directory holding a `kvslim` checkout (PYTHONPATH)
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


def run(rows: list, budget: float, other: str | None) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = gutenberg_spec(work)
        for steps, code in rows:
            os.environ["PYTHONPATH"] = other if code == "other" else ""
            args = dict(source=spec["source"], output=str(work / "out"), to="mla", kv_budget=budget,
                        calib_data=spec["calib"], calib_samples=spec["calib_samples"],
                        calib_seq_len=spec["calib_seq_len"], refine_steps=steps)
            conv = child(CONVERT_CHILD, json.dumps(args))
            ev = child(EVAL_CHILD, str(work / "out"), json.dumps(spec["eval_files"]), str(spec["window"]))
            row = dict(code=code, steps=steps, budget=budget, perplexity=round(ev["perplexity"], 3),
                       seconds=round(conv["seconds"], 1),
                       layer_error=(conv["record"].get("refinement") or {}).get("relative_output_error"))
            out.append(row)
            print(json.dumps(row), flush=True)
    os.environ.pop("PYTHONPATH", None)
    return out


def markdown(r: dict) -> str:
    lines = ["# Refinement: cost and quality by steps (llama-mha-gutenberg -> MLA, no training)", "",
             f"Budget {r['budget']} of the KV cache; held-out perplexity (first 8,192 tokens, 256-token windows); "
             f"'other' is `{r['other']}` ({r['other_note']}). {r['note']}", "",
             "| code | refine steps | perplexity | conversion s | per-layer output error after refinement |",
             "|---|---|---|---|---|"]
    for row in r["rows"]:
        err = " ".join(f"{e:.4f}" for e in row["layer_error"]) if row["layer_error"] else "-"
        lines.append(f"| {row['code']} | {row['steps']} | {row['perplexity']:.3f} | {row['seconds']:.1f} | {err} |")
    return "\n".join(lines + ["", machine_line(r["machine"]), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default='[[0, "this"], [100, "this"], [300, "this"]]')
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--other", default=None, help="PYTHONPATH of the other checkout")
    parser.add_argument("--other-note", default="", help="what the other checkout is")
    parser.add_argument("--note", default="", help="a sentence for the table (e.g. the load on the machine)")
    parser.add_argument("--name", default="refine_cost_gutenberg")
    args = parser.parse_args()
    rows = run(json.loads(args.rows), args.budget, args.other)
    result = dict(machine=machine(), budget=args.budget, other=args.other, other_note=args.other_note,
                  note=args.note, rows=rows)
    print(save_results(args.name, result, markdown))


if __name__ == "__main__":
    main()
