"""Decode/prefill speed and KV cache memory of converted models: Transformers' default path vs kvslim.

For llama-mha-gutenberg and its conversions (GQA 2, MQA, MLA at 1/4 of the KV cache), at several
context lengths and batch sizes: KV cache bytes actually allocated (and the theoretical bytes per
token x tokens), prefill tokens/s (chunked prefill into the cache), decode tokens/s (greedy steps
after the prefill), peak RSS of the measuring process. Every (model, path, batch) runs in its own
process; ratios are measured side by side in one run.

    python benchmarks/decode_speed.py [--contexts 512,2048,8192] [--batches 1,8] [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gqa_conversion import CONVERT_CHILD, SHARED, child, figure, gutenberg_spec, machine, machine_line, save_results  # noqa: E402

MEASURE_CHILD = r"""
import json, resource, sys, time
import torch
import kvslim.modeling as km
from transformers import AutoModelForCausalLM, DynamicCache
path, impl, use_kvslim, batch, contexts, steps, chunk = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), json.loads(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=torch.float32).eval()
if use_kvslim:
    km.enable(model)
per_token = km.describe(model.config).kv_bytes_per_token
vocab = model.config.vocab_size
rows = []
for ctx in contexts:
    ids = torch.randint(3, vocab, (batch, ctx))
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        t = time.perf_counter()
        for s in range(0, ctx, chunk):
            out = model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True)
        prefill = time.perf_counter() - t
        allocated = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        nxt = out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(steps):
            nxt = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - t
    rows.append({"context": ctx, "batch": batch, "kv_bytes_allocated": allocated,
                 "kv_bytes_theoretical": per_token * ctx * batch, "prefill_tok_s": batch * ctx / prefill,
                 "decode_tok_s": batch * steps / decode})
print("RESULT" + json.dumps({"rows": rows, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def prepare(work: Path) -> list[tuple[str, str]]:
    spec = gutenberg_spec(work)
    models = [("source MHA 8/8", spec["source"])]
    for name, kwargs in [("GQA 8/2", dict(to="gqa", kv_heads=2, method="mean")),
                         ("MQA 8/1", dict(to="mqa", method="mean")),
                         ("MLA 1/4", dict(to="mla", kv_budget=0.25, calib_data=spec["calib"], calib_samples=16,
                                          calib_seq_len=256))]:
        out = work / name.replace(" ", "_").replace("/", "-")
        child(CONVERT_CHILD, json.dumps(dict(source=spec["source"], output=str(out), **kwargs)))
        models.append((name, str(out)))
    return models


def run(contexts, batches, steps, chunk, work: Path) -> dict:
    results = []
    for name, path in prepare(work):
        paths = [("transformers sdpa", "sdpa", "0"), ("kvslim", "sdpa", "1")]
        if name.startswith("MLA"):
            paths = [("transformers DeepseekV3 (expanded)", "sdpa", "0"), ("kvslim absorbed", "sdpa", "1")]
        for label, impl, flag in paths:
            for batch in batches:
                r = child(MEASURE_CHILD, path, impl, flag, str(batch), json.dumps(contexts), str(steps), str(chunk))
                for row in r["rows"]:
                    row.update(model=name, path=label, peak_rss_mib=round(r["peak_rss_mib"]))
                    results.append(row)
                    print(f"{name:15s} {label:36s} b{batch} ctx {row['context']:5d}  KV {row['kv_bytes_allocated'] / 2**20:8.1f} MiB "
                          f"(theory {row['kv_bytes_theoretical'] / 2**20:8.1f})  prefill {row['prefill_tok_s']:8.0f} tok/s  "
                          f"decode {row['decode_tok_s']:7.1f} tok/s", flush=True)
    import torch

    return {"machine": machine(), "steps": steps, "prefill_chunk": chunk, "threads": torch.get_num_threads(),
            "rows": results}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Decode speed and KV cache memory", "",
             f"{machine_line(m)} Model: llama-mha-gutenberg and its conversions (fp32); "
             f"{result['steps']} greedy decode steps after a prefill in chunks of {result['prefill_chunk']}; "
             f"{result.get('threads', '?')} torch threads per measuring process, one process at a time.", "",
             "| model | path | batch | context | KV MiB allocated | KV MiB theory | prefill tok/s | decode tok/s | "
             "decode vs transformers | decode vs source | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = result["rows"]
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["batch"] == r["batch"]
                    and x["context"] == r["context"] and not x["path"].startswith("kvslim"))
        src = next(x for x in rows if x["model"].startswith("source") and x["batch"] == r["batch"]
                   and x["context"] == r["context"] and x["path"] == "transformers sdpa")
        lines.append(
            f"| {r['model']} | {r['path']} | {r['batch']} | {r['context']} | {r['kv_bytes_allocated'] / 2**20:.2f} | "
            f"{r['kv_bytes_theoretical'] / 2**20:.2f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
            f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x | {r['decode_tok_s'] / src['decode_tok_s']:.2f}x | {r['peak_rss_mib']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    batches = sorted({r["batch"] for r in result["rows"]})
    fig, axes = figure(len(batches), 6, 4.2)
    for ax, batch in zip(axes, batches):
        for key in dict.fromkeys((r["model"], r["path"]) for r in result["rows"]):
            rows = [r for r in result["rows"] if (r["model"], r["path"]) == key and r["batch"] == batch]
            ax.plot([r["context"] for r in rows], [r["decode_tok_s"] for r in rows], marker="o",
                    ls="-" if key[1].startswith("kvslim") else "--", label=f"{key[0]} - {key[1]}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="512,1024,2048,4096,8192")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--name", default="decode_speed_cpu")
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found (set KVSLIM_SHARED)")
    with tempfile.TemporaryDirectory(prefix="kvslim-speed-") as tmp:
        result = run([int(c) for c in args.contexts.split(",")], [int(b) for b in args.batches.split(",")],
                     args.steps, args.chunk, Path(tmp))
    print(save_results(args.name, result, markdown, plot))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
