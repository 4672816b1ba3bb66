"""Text for calibration, evaluation and training: one reader for every place kvslim takes data.

A spec is a local file or directory (plain text, JSON/JSONL with a "text" field, parquet) or a
`datasets` id written as ``name[:config[:split]]``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Iterator

from .errors import ConversionError

log = logging.getLogger("kvslim")
TEXT_SUFFIXES = {".txt", ".text", ".md", ".tokens", ".raw"}
TABLE_SUFFIXES = {".json", ".jsonl", ".parquet"}
NOT_TEXT_WARNING = 0.05  # share of undecodable or control characters above which a file is called binary


def read_documents(specs: str | Iterable[str], *, role: str = "Calibration data", max_chars: int | None = None,
                   streaming: bool = False, error: type[ConversionError] = ConversionError) -> Iterator[str]:
    """Non-empty documents of every spec, in order. `role` names the data in messages, `error` is
    the exception raised for bad input; with `streaming` a datasets id is read as it goes and
    nothing is downloaded up front. Reading stops once `max_chars` characters were read."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    sources = [_open(spec, role, streaming, error) for spec in specs]  # every spec checked before any is read
    chars = 0
    for documents in sources:
        for text in documents:
            if isinstance(text, str) and text.strip():
                yield text
                chars += len(text)
                if max_chars and chars >= max_chars:
                    return


def read_texts(spec: str, max_chars: int | None = None, role: str = "Calibration data") -> list[str]:
    """All documents of `spec` as a list (see `read_documents`)."""
    docs = list(read_documents(spec, role=role, max_chars=max_chars))
    if not docs:
        raise ConversionError(f"{role} '{spec}' contains no readable text.")
    return docs


def _open(spec: str, role: str, streaming: bool, error) -> Iterable[str]:
    path = Path(spec).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        readable = [f for f in files if f.suffix.lower() in TEXT_SUFFIXES | TABLE_SUFFIXES]
        if not readable:
            raise error(f"{role} '{spec}' contains no .txt/.json/.jsonl/.parquet files.")
        return _files(readable, streaming, error)
    if spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in TEXT_SUFFIXES | TABLE_SUFFIXES:
        raise error(f"{role} '{spec}' does not exist.")
    return _dataset(spec, role, streaming, error)


def _files(files: list[Path], streaming: bool, error) -> Iterator[str]:
    for path in files:
        if path.suffix.lower() in TEXT_SUFFIXES:
            text = path.read_text(encoding="utf-8", errors="replace")
            _warn_if_not_text(path, text)
            yield text
            continue
        import datasets

        kind = "parquet" if path.suffix.lower() == ".parquet" else "json"
        table = datasets.load_dataset(kind, data_files=str(path), split="train", streaming=streaming)
        columns = table.column_names or ["text"]
        if "text" not in columns:
            raise error(f"'{path}' has no 'text' column (columns: {', '.join(columns)}).")
        yield from (row["text"] for row in table)


def _warn_if_not_text(path: Path, text: str) -> None:
    sample = text[:100_000]  # binary data is binary throughout; a sample keeps large corpora cheap
    bad = sum(1 for c in sample if c == "\ufffd" or (ord(c) < 32 and c not in "\n\r\t\f"))
    if sample and bad / len(sample) > NOT_TEXT_WARNING:
        log.warning("kvslim: '%s' is mostly not text (%.0f%% undecodable or control characters); statistics "
                    "measured on it will not describe real inputs. Pass plain UTF-8 text.", path, 100 * bad / len(sample))


def _dataset(spec: str, role: str, streaming: bool, error) -> Iterable[str]:
    import datasets

    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        table = datasets.load_dataset(name, config, split=split or "train", streaming=streaming)
    except Exception as exc:  # datasets raises many types (connection, not found, offline)
        raise error(
            f"Cannot load {role.lower()} dataset '{spec}' ({type(exc).__name__}: {exc}). Pass a local "
            "text/JSONL/parquet file or directory instead."
        ) from None
    columns = table.column_names or ["text"]
    column = "text" if "text" in columns else columns[0]
    return (row[column] for row in table)
