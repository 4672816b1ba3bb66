"""Atomic, sharded output.

Everything is written into a hidden temporary directory next to the target and renamed into
place only when complete, so an interrupted or failed conversion (including a full disk) never
leaves something that looks like a finished model.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import ConversionError


OWNER_FILE = ".kvslim-owner"  # in a temporary directory while it is written: the writing process's id
STALE_AFTER_S = 3600  # a temporary directory of kvslim's without an owner file, untouched this long, is stale


class AtomicDirectory:
    """`with AtomicDirectory(target, marker=...) as tmp:` - write into tmp; it becomes target on success.

    `marker` is the file kvslim writes into every such directory (the conversion record, the
    uptraining summary, ...). With `overwrite`, only an empty directory or one holding `marker`
    is replaced: kvslim never deletes what it did not write. Temporary directories that earlier,
    killed runs left beside the target are removed.
    """

    def __init__(self, target: str | os.PathLike, overwrite: bool = False, *, marker: str):
        self.target = Path(target).expanduser().absolute()
        self.overwrite, self.marker = overwrite, marker
        self.tmp = self.target.parent / f".{self.target.name}.kvslim-tmp-{uuid.uuid4().hex[:8]}"

    def check(self) -> None:
        """Fail early, before any expensive work, if the target cannot be written."""
        if self.target.exists() and not self.target.is_dir():
            raise ConversionError(f"Output path '{self.target}' exists and is not a directory.")
        if self.target.exists() and not self.overwrite:
            raise ConversionError(
                f"Output directory '{self.target}' already exists; pass --overwrite to replace it "
                "or choose another path."
            )
        if self.target.exists():
            theirs = sorted(p.name for p in self.target.iterdir())
            if theirs and not (self.target / self.marker).is_file():
                shown = ", ".join(theirs[:5]) + (", ..." if len(theirs) > 5 else "")
                raise ConversionError(
                    f"--overwrite only replaces an empty directory or one kvslim wrote (it holds {self.marker}); "
                    f"'{self.target}' holds other files ({shown}). Choose another output path, or move "
                    "those files away yourself."
                )
        writable = next(p for p in (self.target.parent, *self.target.parent.parents) if p.exists())
        if not os.access(writable, os.W_OK | os.X_OK):
            raise ConversionError(
                f"Cannot write the output: '{writable}' is not writable by this user. Choose an output path "
                "in a directory you can write to."
            )

    def remove_stale(self) -> list[Path]:
        """Remove what killed runs left beside the target: kvslim's own hidden temporary directories
        whose writing process is gone."""
        removed = []
        for path in self.target.parent.glob(f".{glob.escape(self.target.name)}.kvslim-*-*"):
            if path == self.tmp or not path.is_dir() or not _stale(path):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed

    def __enter__(self) -> Path:
        self.check()
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.remove_stale()
            self.tmp.mkdir()
            (self.tmp / OWNER_FILE).write_text(str(os.getpid()))
        except OSError as exc:  # e.g. a read-only file system, which os.access does not see for root
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise ConversionError(f"Cannot create the output beside '{self.target}': {exc.strerror or exc}. "
                                  "Choose an output path in a directory you can write to.") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        (self.tmp / OWNER_FILE).unlink(missing_ok=True)
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.kvslim-old-{uuid.uuid4().hex[:8]}"
            self.target.rename(old)
        self.tmp.rename(self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def _stale(path: Path) -> bool:
    owner = path / OWNER_FILE
    try:
        pid = int(owner.read_text())
    except (OSError, ValueError):  # no owner file: an old dir of a finished swap, or of an older kvslim
        return time.time() - path.stat().st_mtime > STALE_AFTER_S
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class ShardedWriter:
    """Streams tensors into `model-XXXXX-of-YYYYY.safetensors` shards of bounded size."""

    def __init__(self, directory: Path, max_shard_bytes: int = 2 * 1024**3):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # clone: safetensors refuses views that share storage (tied weights, slices)
        self._pending[name] = tensor.detach().to("cpu").contiguous().clone()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.directory / f"model-part-{len(self._shards) + 1:05d}.safetensors"
        try:
            save_file(self._pending, str(path), metadata={"format": "pt"})
        except OSError as exc:
            raise ConversionError(f"Writing '{path}' failed: {exc}. Nothing was written to the output.") from exc
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, give the shards their final names and write the index. Returns file names."""
        self._flush()
        if len(self._shards) == 1:
            final = self.directory / "model.safetensors"
            self._shards[0][0].rename(final)
            return [final.name]
        n = len(self._shards)
        weight_map, names = {}, []
        for i, (path, keys) in enumerate(self._shards, start=1):
            final = self.directory / f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            names.append(final.name)
            weight_map.update({k: final.name for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names
