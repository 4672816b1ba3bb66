"""Peak memory of a weight-only conversion on a synthetic Llama checkpoint, by output shard size.

The benchmark writes a random bf16 Llama checkpoint of the chosen shape itself (layer by layer, so
making it needs little memory), then runs `kvslim convert --to gqa --method mean` on it in a child
process per setting while sampling the child's /proc status every 20 ms. It reports peak anonymous
RSS (RssAnon: the memory the process itself allocated; mmap'd checkpoint pages, which the kernel can
drop at any time, are excluded) next to plain peak RSS, the wall time, and the time of reading the
shards once (`cat` to /dev/null) measured in the same run.

    python benchmarks/convert_memory.py                          # 1.1B-shaped (16 x 2048), 2GB vs 200MB shards
    python benchmarks/convert_memory.py --shape 7b --shards 2GB  # 32 x 4096, ~13 GB of bf16 shards
    python benchmarks/convert_memory.py --calibrated            # --to mla --kv-budget 0.25, 8 x 128 calibration tokens
    python benchmarks/convert_memory.py --calibrated --target gqa --kv-heads 8   # aware GQA, the same calibration
    python benchmarks/convert_memory.py --shape 7b-4layers --calibrated --shards 2GB   # 7B's layers, 4 of them
    KVSLIM_CODE=/path/to/other/checkout python benchmarks/convert_memory.py   # another kvslim, side by side
    python benchmarks/convert_memory.py --shape 7b --shards 2GB --cold   # each timing from a cold page cache (root)

Next to `cat`, the run times copying the shards once (`cp`, then `sync`): the same bytes read and
written, the floor of any conversion that writes the model out on this disk. Each conversion's
time is also given with its own `sync`, so that both count the writes that reached the disk.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gqa_conversion import machine, machine_line, save_results  # noqa: E402

SHAPES = {  # layers, hidden, intermediate, heads, kv heads, vocab
    "1b": (16, 2048, 5632, 32, 32, 32000),
    "7b": (32, 4096, 11008, 32, 32, 32000),
    "7b-4layers": (4, 4096, 11008, 32, 32, 32000),  # 7B's layer shape: what bounds a layerwise conversion
    "7b-2layers": (2, 4096, 11008, 32, 32, 32000),
    "1b-2layers": (2, 2048, 5632, 32, 32, 32000),
    "llama3-8b-2layers": (2, 4096, 14336, 32, 8, 128256),  # Llama-3-8B's layers and 128K vocabulary
}


CALIB_SAMPLES, CALIB_SEQ_LEN = 8, 128  # of --calibrated
CALIB_TOKENS = CALIB_SAMPLES * CALIB_SEQ_LEN


def write_checkpoint(path: Path, shape: str, shard_bytes: int) -> int:
    """A random bf16 Llama checkpoint (config + sharded safetensors), one tensor in memory at a time."""
    import torch
    from transformers import LlamaConfig

    from kvslim.convert.writer import ShardedWriter

    layers, hidden, inter, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=inter,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16")
    path.mkdir(parents=True)
    config.save_pretrained(str(path))
    writer = ShardedWriter(path, shard_bytes)
    g = torch.Generator().manual_seed(0)

    def rand(*s):
        return (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)

    hd = hidden // heads
    writer.add("model.embed_tokens.weight", rand(vocab, hidden))
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, s in [("self_attn.q_proj", (heads * hd, hidden)), ("self_attn.k_proj", (kv * hd, hidden)),
                        ("self_attn.v_proj", (kv * hd, hidden)), ("self_attn.o_proj", (hidden, heads * hd)),
                        ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                        ("mlp.down_proj", (hidden, inter))]:
            writer.add(p + name + ".weight", rand(*s))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            writer.add(p + norm + ".weight", torch.ones(hidden, dtype=torch.bfloat16))
    writer.add("model.norm.weight", torch.ones(hidden, dtype=torch.bfloat16))
    writer.add("lm_head.weight", rand(vocab, hidden))
    writer.close()
    return writer.total_bytes


def _status_kib(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                out[key] = int(value.split()[0])
    return out


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so that a timing reads from the disk."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return True
    except OSError:
        return False


def timed_sync() -> float:
    started = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - started


def measured(cmd: list[str], env: dict) -> dict:
    """Run `cmd`, sampling its RSS; peak values in MiB and the wall time."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"VmRSS": 0, "RssAnon": 0}

    def sample():
        while proc.poll() is None:
            try:
                for k, v in _status_kib(proc.pid).items():
                    peak[k] = max(peak[k], v)
            except (OSError, ValueError):
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"wall_s": round(time.perf_counter() - started, 1), "peak_rss_anon_mib": round(peak["RssAnon"] / 1024),
            "peak_rss_mib": round(peak["VmRSS"] / 1024)}


def convert_args(args) -> list[str]:
    if args.calibrated:  # calibration text and a tokenizer written beside the checkpoint
        target = ["--to", "mla", "--kv-budget", "0.25"] if args.target == "mla" else ["--to", "gqa", "--kv-heads",
                                                                                     str(args.kv_heads)]
        return [*target, "--calib-data", str(args.calib_file), "--calib-samples", str(CALIB_SAMPLES),
                "--calib-seq-len", str(CALIB_SEQ_LEN), "--refine-steps", str(args.refine_steps)]
    return ["--to", "gqa", "--kv-heads", str(args.kv_heads), "--method", "mean"]


def markdown(result: dict) -> str:
    size = result["checkpoint_bytes"] / 1024**3
    kind = "Calibrated" if result.get("calibrated") else "Weight-only"
    lines = [f"# {kind} conversion memory: synthetic {result['shape']} Llama ({size:.2f} GiB of bf16 shards)", "",
             f"`kvslim convert {' '.join(result['command'])}`, each setting in its own "
             "process, side by side in one run. Peak anonymous RSS excludes the mmap'd source pages; "
             f"reading the shards once (`cat`) took {result['cat_s']:.1f} s."]
    copy = result.get("cp_sync_s")  # (older results have no copy baseline)
    if copy:
        lines[-1] += (f" Copying them once (`cp`, the same bytes read and written) took {result['cp_s']:.1f} s, "
                      f"{copy:.1f} s with its `sync`.")
    lines[-1] += " Each timing started from a cold page cache." if result.get("cold") else ""
    lines += ["", "| code | --max-shard-size | peak RssAnon | peak RSS | wall time | time / cat |"
              + (" with sync | / cp with sync |" if copy else ""),
              "|---|---|---|---|---|---|" + ("---|---|" if copy else "")]
    for r in result["rows"]:
        line = (f"| {r['code']} | {r['shards']} | {r['peak_rss_anon_mib']:,} MiB | {r['peak_rss_mib']:,} MiB "
                f"| {r['wall_s']:.1f} s | x{r['wall_s'] / max(result['cat_s'], 1e-9):.1f} |")
        if copy:
            line += f" {r['wall_sync_s']:.1f} s | x{r['wall_sync_s'] / copy:.2f} |"
        lines.append(line)
    layer = result["layer_bytes"] / 1024**2
    lines += ["", f"One layer's weights: {layer:,.0f} MiB."]
    if result.get("calibrated"):  # the goal: one layer + the calibration activations (float32) + 1 GiB
        activations = CALIB_TOKENS * SHAPES[result["shape"]][1] * 4 / 1024**2
        lines[-1] += (f" The goal for a calibrated conversion, one layer + the calibration activations "
                      f"({activations:,.0f} MiB) + 1 GiB, is {layer + activations + 1024:,.0f} MiB.")
    lines += ["", machine_line(result["machine"]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--shards", nargs="+", default=["2GB", "200MB"])
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--work", default=None, help="keep the synthetic checkpoint here and reuse it")
    parser.add_argument("--name", default=None)
    parser.add_argument("--calibrated", action="store_true", help="a calibrated conversion (--target)")
    parser.add_argument("--target", default="mla", choices=["mla", "gqa"],
                        help="of --calibrated: --to mla --kv-budget 0.25, or --to gqa --kv-heads K (aware, the default)")
    parser.add_argument("--refine-steps", type=int, default=5, help="refinement steps of --calibrated")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each timing (root only)")
    args = parser.parse_args()
    codes = {"this checkout": None}
    if os.environ.get("KVSLIM_CODE"):
        codes[f"other ({os.environ['KVSLIM_CODE']})"] = os.environ["KVSLIM_CODE"]
    with tempfile.TemporaryDirectory(prefix="kvslim-mem-") as scratch:
        work = Path(args.work or scratch)
        src = work / f"synthetic-{args.shape}"
        if not (src / "config.json").is_file():
            print(f"writing a synthetic {args.shape} checkpoint to {src} ...", flush=True)
            write_checkpoint(src, args.shape, 2 * 1024**3)
        if args.calibrated:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from common import build_tokenizer, sample_text

            if not (src / "tokenizer.json").is_file():
                build_tokenizer(src)
            args.calib_file = work / "calib.txt"
            args.calib_file.write_text(sample_text(20000, seed=3))
        shards = sorted(src.glob("*.safetensors"))
        total = sum(p.stat().st_size for p in shards)
        cold = args.cold and drop_page_cache()
        if args.cold and not cold:
            print("--cold: cannot drop the page cache (not root); timings are warm", flush=True)
        started = time.perf_counter()
        subprocess.run(["cat", *map(str, shards)], stdout=subprocess.DEVNULL, check=True)
        cat_s = time.perf_counter() - started
        copy = work / "copy"
        copy.mkdir(exist_ok=True)
        if cold:
            drop_page_cache()
        started = time.perf_counter()
        subprocess.run(["cp", *map(str, shards), str(copy)], check=True)
        cp_s = time.perf_counter() - started
        cp_sync_s = cp_s + timed_sync()
        subprocess.run(["rm", "-rf", str(copy)], check=True)
        print(f"cat {cat_s:.1f} s, cp {cp_s:.1f} s ({cp_sync_s:.1f} s with sync)", flush=True)
        rows = []
        for code, where in codes.items():
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            if where:  # a directory whose `kvslim` package shadows the installed one
                env["PYTHONPATH"] = where
            for shard in args.shards:
                out = work / "out"
                cmd = [sys.executable, "-m", "kvslim.cli", "convert", str(src), "-o", str(out), *convert_args(args),
                       "--max-shard-size", shard]
                if cold:
                    drop_page_cache()
                row = {"code": code, "shards": shard, **measured(cmd, env)}
                row["wall_sync_s"] = round(row["wall_s"] + timed_sync(), 1)
                print(row, flush=True)
                rows.append(row)
                subprocess.run(["rm", "-rf", str(out)], check=True)
    layers, hidden, inter, heads, kv, _ = SHAPES[args.shape]
    layer_bytes = 2 * (2 * hidden * hidden + 2 * hidden * (hidden // heads) * kv + 3 * hidden * inter)
    result = {"machine": machine(), "shape": args.shape, "checkpoint_bytes": total, "layer_bytes": layer_bytes,
              "kv_heads": args.kv_heads, "cat_s": round(cat_s, 2), "cp_s": round(cp_s, 2),
              "cp_sync_s": round(cp_sync_s, 2), "cold": cold, "rows": rows, "calibrated": args.calibrated,
              "command": [a if a != str(getattr(args, "calib_file", "")) else "CALIB.txt" for a in convert_args(args)]}
    suffix = ("_calibrated" + ("" if args.target == "mla" else "_gqa")) if args.calibrated else ""
    name = args.name or f"convert_memory_{args.shape}{suffix}"
    print(save_results(name, result, markdown))


if __name__ == "__main__":
    main()
