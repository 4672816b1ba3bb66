"""Fingerprints of conversion outputs: proof that a refactor left behaviour unchanged.

Converts a fixed set of sources (llama-mha-gutenberg when ../shared has it, plus tiny random
models of every family a conversion path treats differently) to every target kind, with a short
calibration and refinement so that every stage runs, and records the SHA-256 of each output file.
config.json and kvslim_conversion.json are hashed without their wall-time field, which differs
from run to run. Two runs on the same machine and torch build must give the same fingerprints.

    python benchmarks/conversion_fingerprints.py --out before.json
    python benchmarks/conversion_fingerprints.py --out after.json --compare before.json

The comparison fails when a weight (or any non-record) file differs; changes inside the two
record-carrying JSON files are listed key by key, for a person to judge.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KVSLIM_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT / "tests"))
FAST = dict(calib_samples=8, calib_seq_len=64, refine_steps=4, progress=False)
# (source, conversion options): every driver path (GQA aware with regrouping, mean, replication,
# DeepseekV3 MLA, hosted MLA without and with RoPE, q/k-norm, fused qkv, encoder)
CASES = [
    ("llama", dict(to="gqa", kv_heads=2)), ("llama", dict(to="mqa", method="mean")),
    ("llama", dict(to="mla", kv_budget=0.25)), ("llama_gqa", dict(to="mha")),
    ("gpt2", dict(to="gqa", kv_heads=2)), ("gpt2", dict(to="mla", kv_budget=0.25)),
    ("qwen3", dict(to="mla", kv_budget=0.5)), ("qwen3", dict(to="gqa", kv_heads=1)),
    ("gemma3_text", dict(to="mla", kv_budget=0.5)), ("phi3", dict(to="mla", kv_budget=0.5)),
    ("bert", dict(to="gqa", kv_heads=2)), ("gpt_neox", dict(to="mla", kv_budget=0.5)),
]
REAL = [("gutenberg", dict(to="gqa", kv_heads=2)), ("gutenberg", dict(to="mqa")),
        ("gutenberg", dict(to="mla", kv_budget=0.25))]


def build_source(name: str, root: Path, tokenizer: Path) -> Path:
    import shutil

    from common import bert, gpt2, make_model, neox, phi3

    if name == "gutenberg":
        return SHARED / "models" / "llama-mha-gutenberg"
    path = root / name
    if path.exists():
        return path
    builders = {"gpt2": gpt2, "bert": bert, "gpt_neox": neox, "phi3": phi3,
                "llama": lambda: make_model("llama", 8, 8), "llama_gqa": lambda: make_model("llama", 8, 2),
                "qwen3": lambda: make_model("qwen3", 8, 2), "gemma3_text": lambda: make_model("gemma3_text", 8, 2)}
    builders[name]().save_pretrained(str(path))
    for f in tokenizer.iterdir():
        shutil.copy2(f, path / f.name)
    return path


def _normalised(value, root: str):
    """Without the wall time, and with the temporary work directory's name replaced."""
    if isinstance(value, dict):
        return {k: _normalised(v, root) for k, v in value.items() if k != "seconds"}
    return value.replace(root, "<work>") if isinstance(value, str) else value


def fingerprint(directory: Path, root: Path) -> dict:
    """SHA-256 per file; the two JSON files with a record are kept whole (minus wall time), so
    that a comparison can name the keys that changed."""
    prints = {}
    for path in sorted(directory.iterdir()):
        if path.name in ("config.json", "kvslim_conversion.json"):
            prints[path.name] = _normalised(json.loads(path.read_text()), str(root))
        else:
            prints[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return prints


def json_changes(before, after, path: str = "") -> list[str]:
    """Key paths where two JSON values differ."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [c for k in sorted(set(before) | set(after))
                for c in json_changes(before.get(k, "<absent>"), after.get(k, "<absent>"), f"{path}.{k}")]
    return [] if before == after else [f"{path}: {before!r} -> {after!r}"[:160]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, help="earlier fingerprints to compare with")
    args = parser.parse_args()
    import kvslim

    from common import build_tokenizer, sample_text

    torch.set_num_threads(2)  # the same reduction order every run
    cases = CASES + (REAL if (SHARED / "models" / "llama-mha-gutenberg").exists() else [])
    results = {}
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        tok = build_tokenizer(root / "tokenizer")
        calib = root / "calib.txt"
        calib.write_text(sample_text(8000, seed=7))
        for source, options in cases:
            key = f"{source} {json.dumps(options, sort_keys=True)}"
            src = build_source(source, root, tok)
            out = root / "out" / key.replace(" ", "_").replace('"', "").replace(":", "=")
            kvslim.convert(str(src), out, calib_data=str(calib), **FAST, **options)
            results[key] = fingerprint(out, root)
            print(key, "ok", flush=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "fast": FAST, "results": results}, indent=1))
    if args.compare:
        before = json.loads(args.compare.read_text())["results"]
        differ = [k for k in results if before.get(k) != results[k]]
        missing = sorted(set(before) - set(results))
        weights_differ = False
        for k in differ:
            for f in sorted(set(results[k]) | set(before.get(k, {}))):
                old, new = before.get(k, {}).get(f), results[k].get(f)
                if old == new:
                    continue
                if isinstance(old, dict) and isinstance(new, dict):
                    print(f"{k} {f}: " + "; ".join(json_changes(old, new)))
                else:
                    weights_differ = True
                    print(f"DIFFERS: {k} {f}")
        print(f"{len(results) - len(differ)}/{len(results)} cases identical in every file; weight and other "
              f"files {'DIFFER' if weights_differ else 'identical'}; missing cases: {missing or 'none'}")
        sys.exit(1 if weights_differ or missing else 0)


if __name__ == "__main__":
    main()
