"""Training data for uptraining: load with `datasets`, tokenise, pack into fixed-length rows.

Packing keeps documents apart: each document's `position_ids` restart at 0, which Transformers
turns into a block-causal mask (attention never crosses a document boundary), and the first token
of a document is never a training target of the previous one (its label is -100).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from ..convert.errors import ConversionError
from ..convert.text import read_documents


class UptrainError(ConversionError):
    """The uptraining run cannot continue (bad input or a diverged loss); the message says why."""


class DataError(UptrainError):
    """Bad training data: the message says what was wrong."""


def load_documents(specs: str | list[str], streaming: bool = False) -> Iterable[str]:
    """Training documents (see kvslim.convert.text); with `streaming`, nothing is downloaded up front."""
    documents = read_documents(specs, role="Training data", streaming=streaming, error=DataError)
    return documents if streaming else list(documents)


def pack_documents(docs: Iterable[str], tokenizer, seq_len: int, max_rows: int | None = None) -> Iterator[dict]:
    """Rows of `seq_len` tokens: input_ids, position_ids (restarting per document), labels."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids: list[int] = []
    pos: list[int] = []
    starts: list[bool] = []
    rows = 0
    for text in docs:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens = ([bos] if bos is not None else []) + tokens + ([eos] if eos is not None and eos != bos else [])
        offset = 0
        while offset < len(tokens):
            take = tokens[offset: offset + seq_len - len(ids)]
            ids.extend(take)
            pos.extend(range(len(take)))
            starts.extend([True] + [False] * (len(take) - 1))
            offset += len(take)
            if len(ids) == seq_len:
                labels = [-100 if s else t for t, s in zip(ids, starts)]
                yield {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(pos), "labels": torch.tensor(labels)}
                rows += 1
                ids, pos, starts = [], [], []
                if max_rows is not None and rows >= max_rows:
                    return


def packed_rows(docs: Iterable[str], tokenizer, seq_len: int, max_rows: int | None = None) -> list[dict]:
    rows = list(pack_documents(docs, tokenizer, seq_len, max_rows))
    if not rows:
        raise DataError(f"The training data is empty or shorter than one sequence of {seq_len} tokens.")
    return rows


def collate(rows: list[dict]) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
