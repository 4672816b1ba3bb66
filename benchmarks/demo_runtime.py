"""The README's first command, `kvslim demo`, timed end to end as a user runs it.

Each variant runs `kvslim demo` in its own process (model already downloaded; the download is a
one-time ~100 MB wheel from PyPI) and records its wall time, the conversion time and the
perplexities it prints. Variants differ only in --refine-steps, so the table shows what the shipped
default buys over the closed form at the same calibration set (32 x 256 tokens of The Time Machine;
evaluation on 8,192 tokens of Jekyll and Hyde, 512-token windows). Needs nothing from ../shared.

    python benchmarks/demo_runtime.py                 # shipped default and closed form
    python benchmarks/demo_runtime.py --steps 25 50
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gqa_conversion import ROOT, machine, machine_line, save_results  # noqa: E402

ROW = re.compile(r"^\s+(source \(GQA 9/3\)|kvslim MQA 9/1)\s+perplexity\s+([\d.]+)", re.M)


def run_demo(steps: str, cache: Path, work: Path) -> dict:
    """`steps`: a --refine-steps value, or "default" (the option left out)."""
    started = time.perf_counter()
    out = work / f"demo-{steps}"
    proc = subprocess.run([sys.executable, "-m", "kvslim.cli", "demo", "-o", str(out), "--cache", str(cache),
                           *([] if steps == "default" else ["--refine-steps", steps])],
                          capture_output=True, text=True, cwd=ROOT, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"kvslim demo --refine-steps {steps} failed:\n{proc.stderr[-3000:]}")
    ppl = {name: float(value) for name, value in ROW.findall(proc.stdout)}
    conversion = float(re.search(r"conversion took (\d+)s", proc.stdout).group(1))
    refinement = json.loads((out / "kvslim_conversion.json").read_text()).get("refinement") or {}
    return {"refine_steps": steps, "steps": refinement.get("steps", 0), "tokens_per_step": refinement.get("tokens_per_step"),
            "lr": refinement.get("lr"), "wall_s": round(wall, 1), "conversion_s": conversion,
            "source_ppl": ppl["source (GQA 9/3)"], "mqa_ppl": ppl["kvslim MQA 9/1"]}


def markdown(result: dict) -> str:
    lines = ["# `kvslim demo`: time and quality (SmolLM2-135M-Instruct, GQA 9/3 -> MQA)", "",
             "End-to-end wall time of the README's first command (model already downloaded), each variant in "
             "its own process, side by side in one run. Calibration: 32 x 256 tokens of *The Time Machine*; "
             "evaluation: 8,192 tokens of *Jekyll and Hyde*, 512-token windows (both shipped with kvslim).", "",
             "| --refine-steps | steps x tokens, lr | wall time | conversion | source ppl | MQA ppl | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['refine_steps']} | {r['steps']} x {r.get('tokens_per_step') or '-'}, {r.get('lr') or '-'} "
                     f"| {r['wall_s'] / 60:.1f} min | {r['conversion_s']:.0f} s | {r['source_ppl']:.2f} "
                     f"| {r['mqa_ppl']:.2f} | x{r['mqa_ppl'] / r['source_ppl']:.2f} |")
    lines += ["", machine_line(result["machine"]), ""]
    return "\n".join(lines)


def main() -> None:
    from kvslim.cli import DEMO_SETTINGS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", nargs="+", default=["default", "0"], help='--refine-steps values, or "default"')
    parser.add_argument("--cache", default=str(ROOT / "out" / ".cache"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvslim-demo-bench-") as work:
        rows = [run_demo(steps, Path(args.cache), Path(work)) for steps in args.steps]
    result = {"machine": machine(), "settings": DEMO_SETTINGS, "rows": rows}
    print(save_results("demo_runtime", result, markdown))


if __name__ == "__main__":
    main()
