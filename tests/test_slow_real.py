"""Opt-in checks on the real models in ../shared (KVSLIM_SLOW=1); unit tests never need them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("KVSLIM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MODEL = SHARED / "models" / "llama-mha-gutenberg"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("KVSLIM_SLOW") != "1" or not MODEL.is_dir(),
                       reason="opt-in: set KVSLIM_SLOW=1 with ../shared present"),
]


def test_gutenberg_mqa_aware_keeps_perplexity_close(tmp_path):
    import kvslim
    from kvslim.recipes.perplexity import load_causal_lm, perplexity, tokenize_corpus

    split = json.loads((MODEL / "split.json").read_text())
    books = SHARED / "data" / "text" / "gutenberg"
    held = [(books / b).read_text(encoding="utf-8") for b in split["heldout"]]
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join((books / b).read_text(encoding="utf-8")[:100_000] for b in split["train"][:10]))

    def ppl(path):
        model, tok = load_causal_lm(str(path))
        return perplexity(model, tokenize_corpus(held, tok, 8192), 256, None, tok.bos_token_id, progress=False).perplexity

    kvslim.convert(str(MODEL), tmp_path / "mean", to="mqa", method="mean", progress=False)
    kvslim.convert(str(MODEL), tmp_path / "aware", to="mqa", calib_data=str(calib), calib_samples=64,
                   calib_seq_len=256, refine_steps=100, progress=False)
    source, mean, aware = ppl(MODEL), ppl(tmp_path / "mean"), ppl(tmp_path / "aware")
    assert aware / source - 1 < 0.1 * (mean / source - 1), (source, mean, aware)
