"""Perplexity of a causal LM on text, with the windowing stated in the result."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..convert.errors import ConversionError

log = logging.getLogger("kvslim")
# one default for every evaluation (eval, report, the model card of push): 512-token windows over the
# first 16K tokens of the data
EVAL_WINDOW, EVAL_TOKENS = 512, 16384


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens_scored: int
    windows: int
    window: int
    stride: int | None
    mode: str  # "non-overlapping windows, BOS prepended" or "sliding window"

    def to_dict(self) -> dict:
        return asdict(self)


def load_causal_lm(spec: str, dtype: torch.dtype = torch.float32, revision: str | None = None):
    """(model, tokenizer) from a directory, .gguf file or Hub id; never trusts remote code."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..modeling import register

    register()  # kvslim's hosted classes load without remote code
    path = Path(spec).expanduser()
    kwargs: dict = {"dtype": dtype}
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ConversionError(f"GGUF file '{spec}' does not exist.")
        where, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.is_dir():
        where = str(path)
    else:
        from ..convert.sources import open_source

        where = str(open_source(spec, revision).directory)  # resolves / downloads with clear errors
    model = AutoModelForCausalLM.from_pretrained(where, **kwargs).eval()
    tok_kwargs = {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}
    tokenizer = AutoTokenizer.from_pretrained(where, **tok_kwargs)
    return model, tokenizer


def tokenize_corpus(texts: list[str], tokenizer, max_tokens: int | None) -> list[int]:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if max_tokens and len(ids) >= max_tokens:
            return ids[:max_tokens]
    return ids


def bos_windows(token_ids: list[int], window: int, bos_token_id: int | None) -> torch.Tensor:
    """Non-overlapping (n, window) rows: BOS (when the model has one), then window - 1 text tokens."""
    body = window - (bos_token_id is not None)
    n = len(token_ids) // body
    if n == 0:
        raise ConversionError(f"Evaluation text is too short: {len(token_ids)} tokens, one window needs {body}.")
    rows = torch.tensor(token_ids[: n * body]).view(n, body)
    if bos_token_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_token_id), rows], dim=1)
    return rows


@torch.no_grad()
def perplexity(
    model, token_ids: list[int], window: int = 512, stride: int | None = None,
    bos_token_id: int | None = None, batch_size: int = 8, progress: bool = True,
) -> PerplexityResult:
    """Perplexity over `token_ids`.

    Without `stride`: non-overlapping windows of `window` tokens, each starting with BOS (when
    the model has one) followed by `window - 1` text tokens; every text token is scored once.
    With `stride`: a sliding window of `window` tokens advancing by `stride`, scoring only the
    tokens not scored before (more context per token, slower).
    """
    device = next(model.parameters()).device
    if stride is None:
        rows = bos_windows(token_ids, window, bos_token_id)
        n = rows.shape[0]
        nll, count = 0.0, 0
        for batch in tqdm(rows.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
            batch = batch.to(device)
            logits = model(input_ids=batch).logits.float()
            target = batch[:, 1:]
            lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, target[..., None])[..., 0]
            nll -= lp.sum().item()
            count += target.numel()
        mode = "non-overlapping windows" + (", BOS prepended" if bos_token_id is not None else "")
        return PerplexityResult(math.exp(nll / count), nll / count, count, n, window, None, mode)

    ids = ([bos_token_id] if bos_token_id is not None else []) + list(token_ids)
    if stride < 1 or stride > window:
        raise ConversionError(f"--stride must be between 1 and the window ({window}), got {stride}.")
    nll, count, windows, scored_to = 0.0, 0, 0, 1
    starts = range(0, max(len(ids) - 1, 1), stride)
    for start in tqdm(starts, desc="perplexity (sliding)", unit="window", disable=not progress):
        end = min(start + window, len(ids))
        chunk = torch.tensor(ids[start:end], device=device)[None]
        logits = model(input_ids=chunk).logits.float()[0]
        first = max(scored_to, start + 1)  # first position (absolute) not scored yet
        lp = torch.log_softmax(logits[first - start - 1 : end - start - 1], dim=-1)
        tgt = chunk[0, first - start : end - start]
        nll -= lp.gather(-1, tgt[:, None]).sum().item()
        count += tgt.numel()
        scored_to = end
        windows += 1
        if end == len(ids):
            break
    return PerplexityResult(math.exp(nll / count), nll / count, count, windows, window, stride, "sliding window")


def evaluate_perplexity(
    model_spec: str, data: str | list[str], window: int = EVAL_WINDOW, stride: int | None = None,
    max_tokens: int | None = EVAL_TOKENS, batch_size: int = 8, progress: bool = True,
) -> dict:
    """CLI/API entry: perplexity and KV bytes per token of a model on text files or a dataset."""
    from ..convert.text import read_texts
    from .summary import describe

    if window < 2:
        raise ConversionError(f"--window {window} is too short: a window holds its first token and at least one "
                              "scored token; use 2 or more (512 is typical).")
    if stride is not None and not 1 <= stride <= window:
        raise ConversionError(f"--stride {stride} must be between 1 and the window ({window}).")
    specs = [data] if isinstance(data, str) else list(data)
    texts = [t for s in specs for t in read_texts(s, role="Evaluation data")]
    model, tokenizer = load_causal_lm(model_spec)
    limit = getattr(model.config, "max_position_embeddings", None)
    past_context = isinstance(limit, int) and window > limit
    if past_context:
        log.warning("kvslim: --window %d is longer than the model's context (%d positions); positions past it "
                    "are extrapolated and the perplexity is not comparable to in-context numbers.", window, limit)
    ids = tokenize_corpus(texts, tokenizer, max_tokens)
    bos = tokenizer.bos_token_id
    try:
        result = perplexity(model, ids, window, stride, bos, batch_size, progress)
    except IndexError:  # learned position tables (GPT-2, OPT) end at the context
        if not past_context:
            raise
        raise ConversionError(f"--window {window} is longer than this model can read ({limit} positions); "
                              f"use --window {limit} or less.") from None
    summary = describe(model.config, model_spec)
    return {"model": model_spec, "data": specs, **result.to_dict(),
            "kv_bytes_per_token": summary.kv_bytes_per_token, "attention": summary.attention}
