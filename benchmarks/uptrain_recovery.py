"""Recovery curves: held-out perplexity vs uptraining tokens, LM loss vs distillation vs LoRA-distillation.

Conversions of llama-mha-gutenberg (MQA, MLA at 1/4 of the KV cache; kvslim defaults, no training)
are uptrained on its training books (disjoint from the held-out books used for evaluation) with
each recipe; held-out perplexity is measured every `--eval-every` steps on `--eval-rows` packed
rows of the held-out books (256 tokens each, each book starting with BOS).

    python benchmarks/uptrain_recovery.py [--tokens 1M] [--conversions mqa,mla]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gqa_conversion import CONVERT_CHILD, RESULTS, SHARED, child, figure, machine, machine_line  # noqa: E402

UPTRAIN_CHILD = r"""
import json, sys
from kvslim.recipes.uptrain import UptrainConfig, run
cfg = UptrainConfig.load(sys.argv[1], json.loads(sys.argv[2]))
result = run(cfg)
print("RESULT" + json.dumps(result))
"""

RECIPES = {"LM loss": "continued_pretraining", "distillation": "distill", "LoRA distillation": "lora_distill"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1M")
    parser.add_argument("--conversions", default="mqa,mla")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--name", default="uptrain_recovery")
    args = parser.parse_args()
    model = SHARED / "models" / "llama-mha-gutenberg"
    split = json.loads((model / "split.json").read_text())
    books = SHARED / "data" / "text" / "gutenberg"
    train = [str(books / b) for b in split["train"]]
    held = [str(books / b) for b in split["heldout"]]
    curves = []
    with tempfile.TemporaryDirectory(prefix="kvslim-recovery-") as tmp:
        work = Path(tmp)
        calib = work / "calib.txt"
        calib.write_text("\n\n".join(Path(b).read_text(encoding="utf-8")[:200_000] for b in train[:20]))
        source_eval = None
        for conversion in args.conversions.split(","):
            out = work / conversion
            kwargs = dict(to="mqa") if conversion == "mqa" else dict(to="mla", kv_budget=0.25)
            child(CONVERT_CHILD, json.dumps(dict(source=str(model), output=str(out), calib_data=str(calib),
                                                 calib_samples=128, calib_seq_len=256, **kwargs)))
            for label, recipe in RECIPES.items():
                settings = dict(model=str(out), teacher=str(model), data=train, eval_data=held, seq_len=256,
                                micro_batch=16, tokens=args.tokens, eval_every=args.eval_every,
                                eval_rows=args.eval_rows, checkpoint_every=10**9, progress=False,
                                output=str(work / f"{conversion}-{recipe}"))
                result = child(UPTRAIN_CHILD, recipe, json.dumps(settings))
                # the first evaluation is the student before training (step 0), on the same rows
                points = [{"tokens": e["tokens"], "eval_ppl": e["eval_ppl"], "teacher_agreement": e.get("teacher_agreement")}
                          for e in result["evaluations"]]
                curves.append({"conversion": conversion, "method": label, "recipe": recipe, "points": points})
                print(f"{conversion} {label:18s} " + "  ".join(f"{p['tokens']/1e6:.2f}M:{p['eval_ppl']:.1f}" for p in points), flush=True)
            if source_eval is None:  # the source itself on the same rows (lr 0, no teacher)
                s = child(UPTRAIN_CHILD, "continued_pretraining",
                          json.dumps({**settings, "model": str(model), "teacher": None, "tokens": 1, "lr": 0.0,
                                      "output": str(work / "source-0")}))
                source_eval = s["evaluations"][-1]["eval_ppl"]
    result = {"machine": machine(), "tokens": args.tokens, "source_eval_ppl": source_eval, "curves": curves}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    lines = ["# Uptraining recovery (llama-mha-gutenberg)", "",
             f"{machine_line(result['machine'])} Held-out perplexity on "
             f"{args.eval_rows} packed 256-token rows of the held-out books; source model: {source_eval:.2f} "
             f"(10% band: {1.1 * source_eval:.2f}). Training text: the 99 training books.", "",
             "| conversion | method | tokens -> held-out perplexity | first point within 10% of source |", "|---|---|---|---|"]
    for c in curves:
        within = next((p["tokens"] for p in c["points"] if p["eval_ppl"] <= 1.1 * source_eval), None)
        lines.append(f"| {c['conversion']} | {c['method']} | " +
                     ", ".join(f"{p['tokens'] / 1e6:.2f}M: {p['eval_ppl']:.1f}" for p in c["points"]) +
                     f" | {'%.2fM tokens' % (within / 1e6) if within is not None else 'not reached'} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")

    fig, axes = figure(len(args.conversions.split(",")))
    for ax, conversion in zip(axes, args.conversions.split(",")):
        for c in [c for c in curves if c["conversion"] == conversion]:
            ax.plot([p["tokens"] / 1e6 for p in c["points"]], [p["eval_ppl"] for p in c["points"]], marker="o", label=c["method"])
        ax.axhline(source_eval, color="black", lw=1, label="source")
        ax.axhline(1.1 * source_eval, color="grey", ls="--", lw=1, label="source +10%")
        ax.set_xlabel("uptraining tokens (M)")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(f"llama-mha-gutenberg -> {conversion.upper()}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
