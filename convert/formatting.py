"""How kvslim writes numbers for people: byte sizes and counted nouns (one writer for the CLI,
records and model cards)."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; below 1 KiB, whole bytes ('512 B')."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """plural(1, 'KV head') -> '1 KV head'; plural(2, 'KV head') -> '2 KV heads'."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"
