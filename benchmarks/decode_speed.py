"""Decode/prefill speed and KV cache memory of converted models: Transformers' default path vs kvslim.

For llama-mha-gutenberg and its conversions (GQA 2, MQA, MLA at 1/4 of the KV cache), at several
context lengths and batch sizes: KV cache bytes actually allocated (and the theoretical bytes per
token x tokens), prefill tokens/s (chunked prefill into the cache), decode tokens/s (greedy steps
after the prefill), peak RSS of the measuring process. Every (model, path, batch) runs in its own
process; ratios are measured side by side in one run.

    python benchmarks/decode_speed.py [--contexts 512,2048,8192] [--batches 1,8] [--steps 16]
    python benchmarks/decode_speed.py --device cuda --flex --contexts 512,2048,8192,32768 [--model synthetic]
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
from kvslim.compat import cache_argument
km.register()
from transformers import AutoModelForCausalLM, DynamicCache
path, impl, mode, batch, contexts, steps, chunk, device, dtype = sys.argv[1:10]
batch, contexts, steps, chunk = int(batch), json.loads(contexts), int(steps), int(chunk)
device, dtype = torch.device(device), getattr(torch, dtype)
on_cuda = device.type == "cuda"
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=dtype).to(device).eval()
if mode != "off":  # kvslim's attention: mode is the backend for the non-MLA layers
    km.enable(model, backend=mode)
summary = km.describe(model.config)
per_token = summary.kv_elements_per_token_per_layer * summary.num_layers * torch.tensor([], dtype=dtype).element_size()
vocab = model.config.vocab_size
cache_kw = cache_argument(model)  # `cache` since Transformers 5.24, `past_key_values` before


def sync():
    if on_cuda:
        torch.cuda.synchronize()


def fill(ids, cache):
    for s in range(0, ids.shape[1], chunk):
        out = model(input_ids=ids[:, s:s + chunk], use_cache=True, **{cache_kw: cache})
    return out


def greedy(nxt, cache, n):
    for _ in range(n):
        nxt = model(input_ids=nxt, use_cache=True, **{cache_kw: cache}).logits[:, -1:].argmax(-1)
    return nxt


rows = []
with torch.inference_mode():
    # warm-up (kernel selection, allocator, compilation where a backend compiles) outside the timings
    cache = DynamicCache(config=model.config)
    greedy(fill(torch.randint(3, vocab, (batch, min(contexts))).to(device), cache).logits[:, -1:].argmax(-1), cache, 2)
    del cache
    for ctx in contexts:
        ids = torch.randint(3, vocab, (batch, ctx)).to(device)
        cache = DynamicCache(config=model.config)
        if on_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        out = fill(ids, cache)
        sync()
        prefill = time.perf_counter() - t
        allocated = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        nxt = out.logits[:, -1:].argmax(-1)
        del out
        sync()
        t = time.perf_counter()
        greedy(nxt, cache, steps)
        sync()
        decode = time.perf_counter() - t
        row = {"context": ctx, "batch": batch, "kv_bytes_allocated": allocated,
               "kv_bytes_theoretical": per_token * ctx * batch, "prefill_tok_s": batch * ctx / prefill,
               "decode_tok_s": batch * steps / decode}
        if on_cuda:
            row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        rows.append(row)
        del cache
print("RESULT" + json.dumps({"rows": rows, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def synthetic_source(work: Path, spec: dict) -> str:
    """A randomly initialised Llama of about 0.85B parameters (MHA, 16 heads of 128 dims, 16 layers) with
    the Gutenberg tokenizer: for speed and memory only, where a 6.8M model would measure kernel
    launches rather than attention."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = work / "synthetic-llama"
    tok = AutoTokenizer.from_pretrained(spec["source"])
    config = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                         num_attention_heads=16, num_key_value_heads=16, head_dim=128, max_position_embeddings=65536,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def prepare(work: Path, device: str = "cpu", model: str = "gutenberg") -> list[tuple[str, str]]:
    spec = gutenberg_spec(work)
    source = spec["source"] if model == "gutenberg" else synthetic_source(work, spec)
    heads = 8 if model == "gutenberg" else 16
    # speed only on random weights: no refinement of the MLA initialisation
    refine = {} if model == "gutenberg" else dict(refine_steps=0)
    models = [(f"source MHA {heads}/{heads}", source)]
    for name, kwargs in [(f"GQA {heads}/2", dict(to="gqa", kv_heads=2, method="mean")),
                         (f"MQA {heads}/1", dict(to="mqa", method="mean")),
                         ("MLA 1/4", dict(to="mla", kv_budget=0.25, calib_data=spec["calib"], calib_samples=16,
                                          calib_seq_len=256, device=device, **refine))]:
        out = work / name.replace(" ", "_").replace("/", "-")
        child(CONVERT_CHILD, json.dumps(dict(source=source, output=str(out), **kwargs)))
        models.append((name, str(out)))
    return models


def run(contexts, batches, steps, chunk, work: Path, device: str, dtype: str, flex: bool, model: str,
        save=lambda result: None) -> dict:
    import torch

    result = {"machine": machine(), "steps": steps, "prefill_chunk": chunk, "threads": torch.get_num_threads(),
              "device": device, "dtype": dtype, "model": model, "rows": []}
    jobs, flex_jobs = [], []
    for name, path in prepare(work, device, model):
        paths = [("transformers sdpa", "sdpa", "off"), ("kvslim", "sdpa", "sdpa")]
        if name.startswith("MLA"):
            paths = [("transformers DeepseekV3 (expanded)", "sdpa", "off"), ("kvslim absorbed", "sdpa", "sdpa")]
        elif flex:  # Transformers' FlexAttention behind kvslim's enable; it compiles, so it is measured last
            flex_jobs += [(name, path, "kvslim flex", "sdpa", "flex", b) for b in batches]
        jobs += [(name, path, label, impl, mode, b) for label, impl, mode in paths for b in batches]
    for name, path, label, impl, mode, batch in jobs + flex_jobs:
        try:
            r = child(MEASURE_CHILD, path, impl, mode, str(batch), json.dumps(contexts), str(steps), str(chunk),
                      device, dtype)
        except RuntimeError as err:  # e.g. out of memory at the longest context: report, go on
            print(f"{name} {label} b{batch}: failed: {str(err)[-300:]}", flush=True)
            continue
        for row in r["rows"]:
            row.update(model=name, path=label, peak_rss_mib=round(r["peak_rss_mib"]))
            result["rows"].append(row)
            print(f"{name:15s} {label:36s} b{batch} ctx {row['context']:5d}  KV {row['kv_bytes_allocated'] / 2**20:8.1f} MiB "
                  f"(theory {row['kv_bytes_theoretical'] / 2**20:8.1f})  prefill {row['prefill_tok_s']:8.0f} tok/s  "
                  f"decode {row['decode_tok_s']:7.1f} tok/s", flush=True)
        save(result)  # after every measurement: a long run stopped part-way keeps what it measured
    return result


MODELS = {"gutenberg": "llama-mha-gutenberg", "synthetic": "a random ~0.85B Llama (16 layers, 16 heads of 128 dims)"}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Decode speed and KV cache memory", "",
             f"{machine_line(m)} Model: {MODELS[result.get('model', 'gutenberg')]} and its conversions "
             f"({result.get('dtype', 'float32')}, on {result.get('device', 'cpu')}); "
             f"{result['steps']} greedy decode steps after a prefill in chunks of {result['prefill_chunk']}; "
             f"{result.get('threads', '?')} torch threads per measuring process, one process at a time. "
             "Peak memory: the measuring process's RSS on CPU, the GPU memory allocated at that context on CUDA.", "",
             *([result["note"], ""] if result.get("note") else []),
             "| model | path | batch | context | KV MiB allocated | KV MiB theory | prefill tok/s | decode tok/s | "
             "decode vs transformers | decode vs source | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = result["rows"]
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["batch"] == r["batch"]
                    and x["context"] == r["context"] and not x["path"].startswith("kvslim"))
        src = next(x for x in rows if x["model"].startswith("source") and x["batch"] == r["batch"]
                   and x["context"] == r["context"] and x["path"] == "transformers sdpa")
        lines.append(
            f"| {r['model']} | {r['path']} | {r['batch']} | {r['context']} | {r['kv_bytes_allocated'] / 2**20:.2f} | "
            f"{r['kv_bytes_theoretical'] / 2**20:.2f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
            f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x | {r['decode_tok_s'] / src['decode_tok_s']:.2f}x | {r.get('peak_gpu_mib', r['peak_rss_mib'])} |")
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
    parser.add_argument("--name", default=None, help="results name (default decode_speed_<device>[_<model>])")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--model", default="gutenberg", choices=sorted(MODELS))
    parser.add_argument("--flex", action="store_true", help="also measure kvslim with FlexAttention (CUDA)")
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    name = args.name or "_".join(["decode_speed", args.device.split(":")[0]] + ([args.model] if args.model != "gutenberg" else []))
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} not found (set KVSLIM_SHARED)")
    with tempfile.TemporaryDirectory(prefix="kvslim-speed-") as tmp:
        result = run([int(c) for c in args.contexts.split(",")], [int(b) for b in args.batches.split(",")],
                     args.steps, args.chunk, Path(tmp), args.device, dtype, args.flex, args.model,
                     save=lambda partial: save_results(name, partial, markdown, plot))
    print(save_results(name, result, markdown, plot))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
