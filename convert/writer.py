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
from dataclasses import dataclass
from pathlib import Path

import torch

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

    def remove_stale(self) -> None:
        """Remove what killed runs left beside the target: kvslim's own hidden temporary directories
        whose writing process is gone."""
        for path in self.target.parent.glob(f".{glob.escape(self.target.name)}.kvslim-*-*"):
            if path != self.tmp and path.is_dir() and _stale(path):
                shutil.rmtree(path, ignore_errors=True)

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


# safetensors' dtype codes (https://github.com/huggingface/safetensors, the format's header)
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


HEADER_RESERVE = 128 * 1024  # bytes kept for a shard's header: ~1,000 tensor entries


@dataclass(frozen=True)
class StoredTensor:
    """A tensor that goes out exactly as a source file stores it: `nbytes` at `offset` of `path`.
    The writer has the kernel copy those bytes (copy_file_range), so they never pass through this
    process: a weight-only conversion's untouched MLP and embedding weights are most of its bytes."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


COPY_CHUNK = 64 * 1024**2  # of the copy without copy_file_range


def copy_range(src: Path, offset: int, nbytes: int, dst_fd: int, dst_offset: int) -> None:
    """Copy `nbytes` at `offset` of `src` to `dst_offset` of `dst_fd`: in the kernel where it can
    (copy_file_range, Linux), else through a 64 MiB buffer."""
    with open(src, "rb", buffering=0) as f:
        fd, done = f.fileno(), 0
        kernel = hasattr(os, "copy_file_range")
        while done < nbytes:
            n = 0
            if kernel:
                try:
                    n = os.copy_file_range(fd, dst_fd, nbytes - done, offset + done, dst_offset + done)
                except OSError:  # e.g. EXDEV (another file system, older kernels), EOPNOTSUPP
                    kernel = False
            if not kernel:
                chunk = os.pread(fd, min(COPY_CHUNK, nbytes - done), offset + done)
                n = os.pwrite(dst_fd, chunk, dst_offset + done) if chunk else 0
            if n == 0:
                raise ConversionError(f"'{src}' ends before the tensor at byte {offset + done} does: the file "
                                      "is truncated or corrupt; download it again.")
            done += n


class _ShardFile:
    """One safetensors file written a tensor at a time, each byte once. safetensors puts the header
    (names, shapes, offsets) first, before knowing which tensors follow, so the data goes after a
    reserved region and the header is written into it when the shard is complete, padded with the
    spaces the format allows. A header that outgrows the region, or a name added twice, is the
    rare case that rewrites the file. Memory holds one tensor, not a shard."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.file.seek(8 + HEADER_RESERVE)
        self.entries: dict[str, dict] = {}
        self.nbytes = 0
        self.duplicated = False

    def add(self, name: str, tensor: torch.Tensor | StoredTensor) -> None:
        if isinstance(tensor, StoredTensor):
            size = tensor.nbytes
            self.file.flush()
            copy_range(tensor.path, tensor.offset, size, self.file.fileno(), 8 + HEADER_RESERVE + self.nbytes)
            self.file.seek(8 + HEADER_RESERVE + self.nbytes + size)
        else:
            tensor = tensor.detach().to("cpu").contiguous()
            raw = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
            self.file.write(memoryview(raw))
            size = tensor.numel() * tensor.element_size()
        self.duplicated |= name in self.entries
        self.entries[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.nbytes, self.nbytes + size]}
        self.nbytes += size

    def finish(self) -> None:
        header = _header(self.entries)
        if not self.duplicated and len(header) <= HEADER_RESERVE:
            self.file.seek(0)
            self.file.write(HEADER_RESERVE.to_bytes(8, "little"))
            self.file.write(header + b" " * (HEADER_RESERVE - len(header)))
            self.file.close()
            return
        self.file.close()
        self._rewrite()

    def _rewrite(self) -> None:
        """The file again with a header of its own size. A name added twice keeps its last tensor
        (as a dict would); the bytes of the earlier one are left out, so the data has no holes."""
        where, offset = {}, 0
        for name, entry in sorted(self.entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = entry["data_offsets"]
            where[name] = (start, end)
            entry["data_offsets"] = [offset, offset + end - start]
            offset += end - start
        header = _header(self.entries)
        written = self.path.with_name(self.path.name + ".data")
        self.path.rename(written)
        with open(self.path, "wb") as out, open(written, "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            for start, end in sorted(where.values()):
                data.seek(8 + HEADER_RESERVE + start)
                left = end - start
                while left:
                    chunk = data.read(min(left, 64 * 1024**2))
                    out.write(chunk)
                    left -= len(chunk)
        written.unlink()


def _header(entries: dict[str, dict]) -> bytes:
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % 8)  # the data starts 8-byte aligned


class ShardedWriter:
    """Streams tensors into `model-XXXXX-of-YYYYY.safetensors` shards of bounded size; memory holds
    one tensor at a time, whatever the shard size."""

    def __init__(self, directory: Path, max_shard_bytes: int = 2 * 1024**3):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._open: _ShardFile | None = None
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor | StoredTensor) -> None:
        nbytes = tensor.nbytes
        try:
            if self._open is not None and self._open.entries and self._open.nbytes + nbytes > self.max_shard_bytes:
                self._finish_shard()
            if self._open is None:
                self._open = _ShardFile(self.directory / f"model-part-{len(self._shards) + 1:05d}.safetensors")
            self._open.add(name, tensor)
        except OSError as exc:
            raise ConversionError(f"Writing the output shards in '{self.directory}' failed: {exc}. "
                                  "Nothing was written to the output.") from exc
        self.total_bytes += nbytes

    def _finish_shard(self) -> None:
        shard, self._open = self._open, None
        if shard is None:
            return
        shard.finish()
        self._shards.append((shard.path, list(shard.entries)))

    def close(self) -> list[str]:
        """Finish the last shard, give the shards their final names and write the index. Returns file names."""
        try:
            self._finish_shard()
        except OSError as exc:
            raise ConversionError(f"Writing the output shards in '{self.directory}' failed: {exc}. "
                                  "Nothing was written to the output.") from exc
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
