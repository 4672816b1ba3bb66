"""GQA/MQA conversion benchmark on real models (no training).

For each model and target: KV bytes per token, perplexity before/after conversion, conversion wall
time and peak RSS (each conversion runs in its own process, so its peak RSS is its own).

Protocol: perplexity on the first 8,192 tokens of held-out text, non-overlapping windows with BOS
prepended; llama-mha-gutenberg on its held-out books with 256-token windows, SmolLM2-135M-Instruct
on WikiText-2 test with 512-token windows. Calibration text is disjoint from evaluation text
(training books; WikiText-2 validation).

    python benchmarks/gqa_conversion.py                  # everything
    python benchmarks/gqa_conversion.py --models gutenberg
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KVSLIM_SHARED", ROOT.parent / "shared"))
TEXT = SHARED / "data" / "text"
RESULTS = ROOT / "benchmarks" / "results"


def gutenberg_books() -> tuple[list[str], list[str]]:
    """llama-mha-gutenberg's training and held-out books (its split.json)."""
    split = json.loads((SHARED / "models" / "llama-mha-gutenberg" / "split.json").read_text())
    books = TEXT / "gutenberg"
    return [str(books / b) for b in split["train"]], [str(books / b) for b in split["heldout"]]


def gutenberg_spec(work: Path) -> dict:
    train, held = gutenberg_books()
    calib = work / "gutenberg_calib.txt"
    # 20 training books, 200K characters each: disjoint from the held-out books used for evaluation
    calib.write_text("\n\n".join(Path(b).read_text(encoding="utf-8")[:200_000] for b in train[:20]))
    return dict(name="llama-mha-gutenberg", source=str(SHARED / "models" / "llama-mha-gutenberg"), targets=[4, 2, 1],
                eval_files=held, window=256,
                calib=str(calib), calib_seq_len=256, calib_samples=128, eval_desc="held-out books")


def smollm2_spec(work: Path) -> dict:
    from kvslim.cli import fetch_demo_model

    gguf = fetch_demo_model(Path(os.environ.get("KVSLIM_CACHE", ROOT / "out" / ".cache")))
    return dict(name="SmolLM2-135M-Instruct", source=str(gguf), targets=[1],
                eval_files=[str(TEXT / "wikitext2_test.tokens.txt")], window=512,
                calib=str(TEXT / "wikitext2_valid.tokens.txt"), calib_seq_len=512, calib_samples=64,
                eval_desc="WikiText-2 test")


CONVERT_CHILD = r"""
import json, resource, sys, time
import kvslim
args = json.loads(sys.argv[1])
t = time.perf_counter()
record = kvslim.convert(args.pop("source"), args.pop("output"), progress=False, overwrite=True, **args)
print("RESULT" + json.dumps({"seconds": time.perf_counter() - t,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "record": record.to_dict()}))
"""

EVAL_CHILD = r"""
import json, sys
from kvslim.recipes.perplexity import load_causal_lm, perplexity, tokenize_corpus
from kvslim.recipes.summary import describe
path, files, window = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model, tok = load_causal_lm(path)
texts = [open(f, encoding="utf-8").read() for f in files]
r = perplexity(model, tokenize_corpus(texts, tok, 8192), window, None, tok.bos_token_id, progress=False)
print("RESULT" + json.dumps({**r.to_dict(), "kv_bytes_per_token": describe(model.config).kv_bytes_per_token}))
"""


def child(code: str, *args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # KVSLIM_CHILD_TIMEOUT (seconds): give up on one measurement rather than on the whole benchmark
    timeout = float(os.environ.get("KVSLIM_CHILD_TIMEOUT", 0)) or None
    try:
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"child stopped after {timeout:.0f} s (KVSLIM_CHILD_TIMEOUT)") from err
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[6:])
    raise RuntimeError(f"child failed:\n{proc.stderr[-3000:]}")


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # the GPU the benchmark can use, where there is one (benchmarks pick it with --device)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": device,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def run(models: list[str], methods: list[tuple[str, dict]], work: Path) -> dict:
    rows = []
    for key in models:
        spec = {"gutenberg": gutenberg_spec, "smollm2": smollm2_spec}[key](work)
        base = child(EVAL_CHILD, spec["source"], json.dumps(spec["eval_files"]), str(spec["window"]))
        print(f"{spec['name']}: source perplexity {base['perplexity']:.2f}", flush=True)
        for kv in spec["targets"]:
            for label, kwargs in methods:
                out = work / f"{key}-{kv}-{label}"
                args = dict(source=spec["source"], output=str(out), to="gqa", kv_heads=kv, **kwargs)
                if kwargs.get("method") != "mean":
                    args.update(calib_data=spec["calib"], calib_samples=spec["calib_samples"],
                                calib_seq_len=spec["calib_seq_len"])
                conv = child(CONVERT_CHILD, json.dumps(args))
                ev = child(EVAL_CHILD, str(out), json.dumps(spec["eval_files"]), str(spec["window"]))
                rec = conv["record"]
                row = dict(model=spec["name"], heads=rec["num_heads"], kv_before=rec["kv_heads_before"], kv_after=kv,
                           method=label, kv_bytes_before=rec["kv_bytes_per_token_before"],
                           kv_bytes_after=rec["kv_bytes_per_token_after"], ppl_source=base["perplexity"],
                           ppl=ev["perplexity"], ppl_increase=ev["perplexity"] / base["perplexity"] - 1,
                           seconds=round(conv["seconds"], 1), peak_rss_mib=round(conv["peak_rss_mib"]),
                           refinement={k: v for k, v in (rec.get("refinement") or {}).items() if k != "relative_output_error"},
                           eval=f"{spec['eval_desc']}, {ev['tokens_scored']} tokens, {ev['window']}-token windows, BOS prepended")
                rows.append(row)
                print(f"  {kv_str(row)} {label:16s} ppl {row['ppl']:10.2f} (+{row['ppl_increase']:.1%})  "
                      f"{row['seconds']:7.1f}s  {row['peak_rss_mib']:6d} MiB", flush=True)
                import shutil

                shutil.rmtree(out, ignore_errors=True)
    return {"machine": machine(), "rows": rows}


def save_results(name: str, result: dict, markdown, plot=None) -> str:
    """Write RESULTS/name.json and .md (and .png with `plot`); returns the Markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{name}.md").write_text(text)
    if plot is not None:
        plot(result, RESULTS / f"{name}.png")
    return text


def machine_line(m: dict) -> str:
    return (f"Machine: {m['cpu']}, {m['cores']} cores, {m['device']}; torch {m['torch']}, transformers "
            f"{m['transformers']}; {m['date']}.")


def figure(panels: int, width: float = 5.5, height: float = 4.0):
    """A headless matplotlib figure with `panels` side by side: (fig, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
    return fig, axes[0]


def kv_str(row: dict) -> str:
    return f"{row['kv_before']}->{row['kv_after']} KV"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# GQA/MQA conversion benchmark (no training)", "",
        machine_line(m), "",
        "Perplexity: first 8,192 tokens, non-overlapping windows with BOS prepended (llama-mha-gutenberg: "
        "held-out books, 256-token windows; SmolLM2: WikiText-2 test, 512-token windows). Calibration text "
        "is disjoint from it. Goal: the default method's perplexity increase is at most a tenth of mean's.", "",
        f"aware (default): regrouped closed form, then {result.get('refine_steps') or 'the default'} steps of layer-local "
        f"refinement (lr {result.get('refine_lr', 1e-2):g}); aware-closed-form: without the refinement.", "",
        "| model | heads -> KV heads | method | KV bytes/token | ppl source | ppl converted | increase | "
        "increase / mean's | convert s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    mean_inc = {(r["model"], r["kv_after"]): r["ppl_increase"] for r in result["rows"] if r["method"] == "mean"}
    for r in result["rows"]:
        ratio = r["ppl_increase"] / mean_inc[(r["model"], r["kv_after"])] if (r["model"], r["kv_after"]) in mean_inc else float("nan")
        lines.append(
            f"| {r['model']} | {r['heads']} / {r['kv_before']} -> {r['kv_after']} | {r['method']} | "
            f"{r['kv_bytes_before']:,} -> {r['kv_bytes_after']:,} | {r['ppl_source']:.2f} | {r['ppl']:.2f} | "
            f"{r['ppl_increase']:+.1%} | {ratio:.3f} | {r['seconds']} | {r['peak_rss_mib']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    models = sorted({r["model"] for r in result["rows"]})
    fig, axes = figure(len(models))
    for ax, model in zip(axes, models):
        rows = [r for r in result["rows"] if r["model"] == model]
        targets = sorted({r["kv_after"] for r in rows}, reverse=True)
        methods = list(dict.fromkeys(r["method"] for r in rows))
        width = 0.8 / len(methods)
        for j, meth in enumerate(methods):
            vals = [next((r["ppl"] for r in rows if r["kv_after"] == t and r["method"] == meth), float("nan"))
                    for t in targets]
            ax.bar([i + j * width for i in range(len(targets))], vals, width, label=meth)
        ax.axhline(rows[0]["ppl_source"], color="black", ls="--", lw=1, label="source")
        ax.set_yscale("log")
        ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(targets))])
        ax.set_xticklabels([f"{rows[0]['kv_before']}->{t} KV" for t in targets])
        ax.set_title(model)
        ax.set_ylabel("perplexity (log)")
        ax.legend(fontsize=8)
    fig.suptitle("Perplexity after conversion, no training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from kvslim.convert.refine import REFINE_LR_HEAD_MERGE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gutenberg,smollm2")
    parser.add_argument("--refine-steps", type=int, default=None, help="steps of the default row (default: the shipped --quality default)")
    parser.add_argument("--name", default="gqa_conversion")
    args = parser.parse_args()
    methods = [("mean", dict(method="mean")),
               ("aware-closed-form", dict(method="aware", refine_steps=0)),
               ("aware (default)", dict(method="aware", refine_steps=args.refine_steps))]
    with tempfile.TemporaryDirectory(prefix="kvslim-bench-") as tmp:
        result = run(args.models.split(","), methods, Path(tmp))
    result["refine_steps"] = args.refine_steps
    result["refine_lr"] = REFINE_LR_HEAD_MERGE
    print(save_results(args.name, result, markdown, plot))


if __name__ == "__main__":
    main()
