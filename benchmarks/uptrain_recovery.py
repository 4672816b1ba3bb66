"""Recovery curves: held-out perplexity vs uptraining tokens, LM loss vs distillation vs LoRA-distillation.

Conversions (kvslim defaults, no training) are uptrained with each recipe on text disjoint from
the evaluation text; held-out perplexity is measured every `--eval-every` steps on `--eval-rows`
packed rows (each document starting with BOS).

* gutenberg: llama-mha-gutenberg -> MQA and MLA at 1/4 of the KV cache; training books vs held-out books.
* smollm2: SmolLM2-135M-Instruct (GQA 9/3) -> GQA 3 -> 1 and MLA at 1/4; WikiText-2 validation vs test.
* qk_norm: the q/k-norm MQA fixture (gemma3_text) -> MLA at 1/8 (closed form) and 1/4; Gutenberg books.

    python benchmarks/uptrain_recovery.py [--model gutenberg|smollm2] [--tokens 1M] [--conversions mqa,mla]
    python benchmarks/uptrain_recovery.py --model smollm2 --conversions mla --recipes lora_distill   # add one curve
    python benchmarks/uptrain_recovery.py --model qk_norm --conversions mla-eighth-closed-form --recipes distill
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gqa_conversion import (  # noqa: E402
    CONVERT_CHILD,
    RESULTS,
    child,
    figure,
    gutenberg_books,
    gutenberg_spec,
    machine,
    machine_line,
    smollm2_spec,
)

UPTRAIN_CHILD = r"""
import json, sys, time
from kvslim.recipes.uptrain import UptrainConfig, run
cfg = UptrainConfig.load(sys.argv[1], json.loads(sys.argv[2]))
started = time.perf_counter()
result = run(cfg)
print("RESULT" + json.dumps({**result, "seconds": round(time.perf_counter() - started, 1)}))
"""

RECIPES = {"LM loss": "continued_pretraining", "distillation": "distill", "LoRA distillation": "lora_distill"}


def gutenberg(work: Path, text: str) -> dict:
    spec = gutenberg_spec(work)
    train, _ = gutenberg_books()
    return dict(name=spec["name"], source=spec["source"], train=train, held=spec["eval_files"],
                held_desc="the held-out books", train_desc=f"the {len(train)} training books", seq_len=256, micro_batch=16,
                conversions={"mqa": dict(to="mqa"), "mla": dict(to="mla", kv_budget=0.25)},
                calib=dict(calib_data=spec["calib"], calib_samples=128, calib_seq_len=256))


def smollm2(work: Path, text: str) -> dict:
    """SmolLM2-135M-Instruct (the GGUF, dequantised once); GQA 3 -> 1 (MQA) and MLA at 1/4, calibrated
    as in the conversion benchmarks (on WikiText-2 validation); uptrained on WikiText-2 validation and
    evaluated on WikiText-2 test, or (`--text gutenberg`) uptrained on the Gutenberg training books and
    evaluated on the held-out books."""
    spec = smollm2_spec(work)
    source = work / "source-hf"
    if not (source / "config.json").is_file():
        child(CONVERT_CHILD, json.dumps(dict(source=spec["source"], output=str(source), to="gqa", kv_heads=3)))
    data = dict(train=[spec["calib"]], held=spec["eval_files"], held_desc="WikiText-2 test",
                train_desc="WikiText-2 validation")
    if text == "gutenberg":
        train, held = gutenberg_books()
        data = dict(train=train, held=held, held_desc="llama-mha-gutenberg's held-out books",
                    train_desc=f"its {len(train)} training books")
    return dict(name="SmolLM2-135M-Instruct", source=str(source), **data, seq_len=256, micro_batch=8,
                conversions={"mqa": dict(to="gqa", kv_heads=1, calib_samples=64),
                             "mla": dict(to="mla", kv_budget=0.25, calib_samples=32)},
                calib=dict(calib_data=spec["calib"], calib_seq_len=512))


def qk_norm(work: Path, text: str) -> dict:
    """The q/k-norm MQA fixture of issue 21 (gemma3_text 4/1, head_dim 128, local/global RoPE; built by
    train_qk_norm_fixture.py on first use) -> MLA at 1/8 of the KV cache, closed form (its largest
    one-shot loss), and 1/4; Gutenberg training books vs the held-out books."""
    from train_qk_norm_fixture import ensure_fixture

    train, held = gutenberg_books()
    calib = work / "calib.txt"
    if not calib.is_file():
        calib.write_text("\n\n".join(Path(b).read_text(encoding="utf-8")[:200_000] for b in train[:20]))
    return dict(name="gemma3-mqa-gutenberg (q/k-norm MQA fixture)", source=str(ensure_fixture()), train=train,
                held=held, held_desc="the held-out books", train_desc=f"the {len(train)} training books", seq_len=256,
                micro_batch=16, conversions={"mla-eighth-closed-form": dict(to="mla", kv_budget=0.125, refine_steps=0),
                                             "mla-quarter": dict(to="mla", kv_budget=0.25)},
                calib=dict(calib_data=str(calib), calib_samples=128, calib_seq_len=256))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gutenberg", choices=["gutenberg", "smollm2", "qk_norm"])
    parser.add_argument("--tokens", default="1M")
    parser.add_argument("--conversions", default="mqa,mla")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--work", default=None, help="keep the converted models here and reuse them on the next run")
    parser.add_argument("--name", default=None)
    parser.add_argument("--source-reference", action="store_true",
                        help="also uptrain the source itself with LM loss on the same tokens: what the training text "
                             "alone does to held-out perplexity (domain adaptation), apart from recovery")
    parser.add_argument("--render", action="store_true", help="only redraw the table and plot from the saved JSON")
    parser.add_argument("--text", default="wikitext", choices=["wikitext", "gutenberg"],
                        help="smollm2's training/evaluation text (gutenberg always uses its books)")
    parser.add_argument("--device", default="cpu", help="where conversions run (uptraining uses accelerate's device)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--recipes", default=",".join(RECIPES.values()),
                        help="which recipes to run (the saved curves of the others are kept)")
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    if unknown := set(recipes) - set(RECIPES.values()):
        parser.error(f"unknown recipe(s) {', '.join(sorted(unknown))}; valid: {', '.join(RECIPES.values())}")
    name = args.name or ("uptrain_recovery" if args.model == "gutenberg" else f"uptrain_recovery_{args.model}")
    if args.render:
        render(name, json.loads((RESULTS / f"{name}.json").read_text()))
        return
    with tempfile.TemporaryDirectory(prefix="kvslim-recovery-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        spec = {"gutenberg": gutenberg, "smollm2": smollm2, "qk_norm": qk_norm}[args.model](work, args.text)
        model = spec["source"]
        base = dict(teacher=model, data=spec["train"], eval_data=spec["held"], seq_len=spec["seq_len"],
                    micro_batch=spec["micro_batch"], tokens=args.tokens, eval_every=args.eval_every,
                    eval_rows=args.eval_rows, checkpoint_every=10**9, progress=False,
                    mixed_precision=args.mixed_precision)
        # the source itself on the same rows: a run's first evaluation is before its first step
        # (the recipe refuses lr 0; the one step it takes is not evaluated)
        s = child(UPTRAIN_CHILD, "continued_pretraining",
                  json.dumps({**base, "model": model, "teacher": None, "tokens": 1, "lr": 1e-12,
                              "output": str(Path(tmp) / "source-0")}))
        source_eval = s["evaluations"][0]["eval_ppl"]
        conversions = [c for c in args.conversions.split(",") if c]
        # earlier runs of other conversions or recipes of the same model are kept beside this run's
        curves = []
        previous = RESULTS / f"{name}.json"
        if previous.is_file():
            old = json.loads(previous.read_text())
            if old.get("model") == spec["name"] and old.get("held_desc", spec["held_desc"]) == spec["held_desc"]:
                redone = {(c, r) for c in conversions for r in recipes}
                if args.source_reference:
                    redone.add(("source", "continued_pretraining"))
                curves = [c for c in old["curves"] if (c["conversion"], c["recipe"]) not in redone]

        def record(conversion: str, label: str, recipe: str, result: dict) -> None:
            # the first evaluation is the student before training (step 0), on the same rows
            points = [{"tokens": e["tokens"], "eval_ppl": e["eval_ppl"], "teacher_agreement": e.get("teacher_agreement")}
                      for e in result["evaluations"]]
            curves.append({"conversion": conversion, "method": label, "recipe": recipe, "points": points,
                           "seconds": result.get("seconds")})
            print(f"{conversion} {label:20s} " + "  ".join(f"{p['tokens']/1e6:.3f}M:{p['eval_ppl']:.1f}" for p in points), flush=True)
            save(name, spec, args, source_eval, curves)

        if args.source_reference:
            record("source", "LM loss (reference)", "continued_pretraining",
                   child(UPTRAIN_CHILD, "continued_pretraining",
                         json.dumps({**base, "model": model, "teacher": None, "output": str(Path(tmp) / "source-lm")})))
        for conversion in conversions:
            out = work / conversion
            if not (out / "config.json").is_file():
                child(CONVERT_CHILD, json.dumps(dict(source=model, output=str(out), device=args.device,
                                                     **{**spec["calib"], **spec["conversions"][conversion]})))
            for label, recipe in RECIPES.items():
                if recipe not in recipes:
                    continue
                settings = {**base, "model": str(out), "output": str(Path(tmp) / f"{conversion}-{recipe}")}
                record(conversion, label, recipe, child(UPTRAIN_CHILD, recipe, json.dumps(settings)))


def save(name: str, spec: dict, args, source_eval: float, curves: list[dict]) -> None:
    """Write JSON, then Markdown and the plot, for every curve so far (called after each run)."""
    result = {"machine": machine(), "model": spec["name"], "tokens": args.tokens, "seq_len": spec["seq_len"],
              "mixed_precision": args.mixed_precision,
              "micro_batch": spec["micro_batch"], "eval_rows": args.eval_rows, "held_desc": spec["held_desc"],
              "train_desc": spec["train_desc"], "source_eval_ppl": source_eval, "curves": curves}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    render(name, result)


def render(name: str, result: dict) -> None:
    """Markdown table and recovery plot from a results JSON."""
    source_eval, curves = result["source_eval_ppl"], result["curves"]
    reference = next((c for c in curves if c["conversion"] == "source"), None)
    mixed_precision = result.get("mixed_precision", "no")
    precision = "fp32" if mixed_precision == "no" else mixed_precision

    def vs_reference(point: dict) -> str:
        # the source uptrained on the same number of tokens (its nearest evaluation)
        if reference is None:
            return ""
        ref = min(reference["points"], key=lambda r: abs(r["tokens"] - point["tokens"]))
        return f"{point['eval_ppl'] / ref['eval_ppl']:.2f}x"

    lines = [f"# Uptraining recovery ({result['model']})", "",
             f"{machine_line(result['machine'])} Held-out perplexity on {result['eval_rows']} packed "
             f"{result['seq_len']}-token rows of {result['held_desc']}; source model: {source_eval:.2f} "
             f"(10% band: {1.1 * source_eval:.2f}). Training text: {result['train_desc']} (disjoint from the "
             f"evaluation text); {result['micro_batch']} rows of {result['seq_len']} tokens per step; {precision} "
             "training; recipe defaults otherwise. A `source` row, where present, is the unconverted source "
             "uptrained the same way (LM loss): what the training text alone does to held-out perplexity. The last column compares the "
             "last point with that row at the same token count.", "",
             "| conversion | method | tokens -> held-out perplexity | first point within 10% of source | run s "
             "| last vs source uptrained the same way |",
             "|---|---|---|---|---|---|"]
    for c in curves:
        within = next((p["tokens"] for p in c["points"] if p["eval_ppl"] <= 1.1 * source_eval), None)
        lines.append(f"| {c['conversion']} | {c['method']} | " +
                     ", ".join(f"{p['tokens'] / 1e6:.3g}M: {p['eval_ppl']:.1f}" for p in c["points"]) +
                     f" | {'%.3gM tokens' % (within / 1e6) if within is not None else 'not reached'} "
                     f"| {c.get('seconds') or ''} | {vs_reference(c['points'][-1])} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")

    conversions = list(dict.fromkeys(c["conversion"] for c in curves if c["conversion"] != "source")) or ["source"]
    fig, axes = figure(len(conversions))
    for ax, conversion in zip(axes, conversions):
        for c in [c for c in curves if c["conversion"] in (conversion, "source")]:
            is_reference = c["conversion"] == "source"
            ax.plot([p["tokens"] / 1e6 for p in c["points"]], [p["eval_ppl"] for p in c["points"]],
                    marker=None if is_reference else "o", ls=":" if is_reference else "-",
                    label=f"source, {c['method']}" if is_reference else c["method"])
        ax.axhline(source_eval, color="black", lw=1, label="source")
        ax.axhline(1.1 * source_eval, color="grey", ls="--", lw=1, label="source +10%")
        ax.set_xlabel("uptraining tokens (M)")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(f"{result['model']} -> {conversion.upper()}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)


if __name__ == "__main__":
    main()
