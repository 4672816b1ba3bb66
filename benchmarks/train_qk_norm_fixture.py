"""Train the q/k-norm MQA fixture of issue 21: a small Gemma-3-style model on the Gutenberg training books.

The kind of source our other fixtures are not: one KV head (MQA 4/1), head_dim 128, q/k RMSNorm,
sliding-window local layers (RoPE base 10k, window 64) interleaved 2:1 with global layers (base 1M),
GeGLU MLP. It shares llama-mha-gutenberg's tokenizer and book split, so held-out perplexities are
comparable across the two fixtures. Training is seeded and runs a fixed number of steps.

    python benchmarks/train_qk_norm_fixture.py OUT_DIR [--steps 500] [--threads 2]

Benchmarks call `ensure_fixture()`, which trains on first use and caches the weights
(under $KVSLIM_CACHE, default out/.cache) instead of committing them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("KVSLIM_SHARED", ROOT.parent / "shared"))
SOURCE = SHARED / "models" / "llama-mha-gutenberg"  # tokenizer and book split
NAME = "gemma3-mqa-gutenberg"
STEPS = 500
CONTEXT, BATCH = 256, 16


def fixture_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=1, head_dim=128, query_pre_attn_scalar=128,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2, sliding_window=64,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}},
        max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def train(out: Path, steps: int = STEPS, threads: int = 2) -> None:
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    split = json.loads((SOURCE / "split.json").read_text())
    books = SHARED / "data" / "text" / "gutenberg"
    tokenizer = AutoTokenizer.from_pretrained(SOURCE)
    ids: list[int] = []
    for name in split["train"]:
        ids.extend(tokenizer((books / name).read_text(encoding="utf-8", errors="ignore"))["input_ids"] + [0])
    data = torch.tensor(ids, dtype=torch.long)
    print(f"train tokens {len(data):,}", flush=True)
    model = Gemma3ForCausalLM(fixture_config())
    print(f"params {sum(p.numel() for p in model.parameters()):,}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    start, warmup = time.time(), max(1, steps // 10)
    for step in range(steps):  # linear warm-up, cosine decay to 5%
        lr = 1e-3 * min(1.0, (step + 1) / warmup) * max(0.05, 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - CONTEXT - 1, (BATCH,))
        x = torch.stack([data[i:i + CONTEXT] for i in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step}/{steps} loss {loss.item():.3f} lr {lr:.2e} {time.time() - start:.0f}s", flush=True)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "split.json").write_text(json.dumps(split, indent=1))
    (partial / "training.json").write_text(json.dumps(dict(steps=steps, context=CONTEXT, batch=BATCH, threads=threads,
                                                           seconds=round(time.time() - start, 1), final_loss=loss.item())))
    partial.rename(out)  # only a finished fixture gets the real name


def ensure_fixture() -> Path:
    """The cached fixture, trained here on first use (about 30 minutes on 2 cores)."""
    out = Path(os.environ.get("KVSLIM_CACHE", ROOT / "out" / ".cache")) / NAME
    if not (out / "model.safetensors").exists():
        print(f"training the {NAME} fixture once into {out} ...", flush=True)
        train(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out} exists; choose a new directory")
    train(args.out, args.steps, args.threads)


if __name__ == "__main__":
    main()
