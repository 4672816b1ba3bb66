"""Where a checkpoint comes from: a Hub id, a local directory, or a .gguf file.

Weights are read lazily, one tensor at a time (safetensors `safe_open`; GGUF through the `gguf`
package's memory map, dequantised per tensor: convert/gguf_source.py), so weight-only
conversions never hold the whole model in memory. GGUF architectures whose layout kvslim does not
read itself (adapter.gguf_lazy False) are dequantised whole by Transformers' loader instead.
Pickled checkpoints (`*.bin`, `*.pt`) are refused: unpickling untrusted files runs code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, KeysView, Protocol

import torch
from safetensors import SafetensorError, safe_open

from ..compat import http_errors
from .errors import ConversionError
from .writer import SAFETENSORS_DTYPES, StoredTensor

# Files copied from a source directory unchanged: tokenizer, chat template, processor files.
_PASSTHROUGH = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|vocab\.(json|txt)|merges\.txt|added_tokens\.json|"
    r"chat_template\.(jinja|json)|.*\.tiktoken|spiece\.model|sentencepiece.*\.model|"
    r"preprocessor_config\.json|processor_config\.json)$"
)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


class TensorReader(Protocol):
    def keys(self) -> KeysView[str]: ...
    def get(self, name: str) -> torch.Tensor: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def stored(self, name: str) -> StoredTensor | None: ...


class SafetensorsReader:
    """Lazy access to the tensors of one or more .safetensors shards."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}  # each file's (data start, header), read when first needed
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt")
                names = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as exc:
                raise ConversionError(
                    f"Cannot read '{path}': it is not a valid safetensors file ({exc}). "
                    "The file may be truncated or corrupt; download it again."
                ) from None
            self._handles[path] = handle
            for name in names:
                self._where[name] = path

    def keys(self) -> KeysView[str]:
        return self._where.keys()

    def get(self, name: str) -> torch.Tensor:
        handle = self._handles[self._where[name]]
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ConversionError(
                f"Cannot read tensor '{name}' from '{self._where[name]}' ({exc}); the file is corrupt."
            ) from None

    def dtype(self, name: str) -> torch.dtype:
        handle = self._handles[self._where[name]]
        return _SAFETENSORS_DTYPES[handle.get_slice(name).get_dtype()]

    def shape(self, name: str) -> tuple[int, ...]:
        """From the file's header: no tensor data is read."""
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def stored(self, name: str) -> StoredTensor | None:
        """Where the tensor's bytes lie in its file (the format: an 8-byte header length, the JSON
        header, then the data that the header's offsets are relative to); None for a dtype the
        output cannot name, which then goes through `get` as before."""
        path = self._where[name]
        if path not in self._headers:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                self._headers[path] = (8 + size, json.loads(f.read(size)))
        base, header = self._headers[path]
        entry = header[name]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            return None
        start, end = entry["data_offsets"]
        return StoredTensor(path, base + start, end - start, dtype, tuple(entry["shape"]))


_SAFETENSORS_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}  # header code -> dtype


class DictReader:
    """Tensors already in memory (a dequantised GGUF model)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = tensors

    def keys(self) -> KeysView[str]:
        return self._tensors.keys()

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def stored(self, name: str) -> None:
        return None  # (in memory, not in a file)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)


@dataclass
class CheckpointSource:
    """A resolved checkpoint: its config, lazily readable weights and side files."""

    spec: str
    config: object
    reader: TensorReader
    directory: Path
    gguf_file: str | None = None
    side_files: list[Path] = field(default_factory=list)
    tokenizer: str | None = None  # where to load the tokenizer from instead (a source without one)

    @property
    def model_type(self) -> str:
        return self.config.model_type

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        if self.tokenizer:
            where, kwargs = self.tokenizer, {}
        else:
            where, kwargs = str(self.directory), {"gguf_file": self.gguf_file} if self.gguf_file else {}
        try:
            return AutoTokenizer.from_pretrained(where, **kwargs)
        except (OSError, ValueError, ImportError) as exc:  # missing files; "needs sentencepiece or tiktoken"
            if self.tokenizer:
                raise ConversionError(f"Cannot load the tokenizer '{self.tokenizer}' ({exc}).") from None
            raise ConversionError(
                f"'{self.spec}' has no usable tokenizer (tokenizer.json / tokenizer_config.json), which "
                "calibration needs to read text. Pass --tokenizer DIR_OR_HUB_ID (the tokenizer the model was "
                "trained with), or use --method mean, which needs no calibration."
            ) from None

    def save_side_files(self, out_dir: Path) -> None:
        """Tokenizer files and generation config, so the output is a complete model directory."""
        from transformers import GenerationConfig

        if self.gguf_file or self.tokenizer:  # the output should be a complete model directory
            self.load_tokenizer().save_pretrained(str(out_dir))
        for path in self.side_files:
            shutil.copy2(path, out_dir / path.name)
        gen_path = self.directory / "generation_config.json"
        if gen_path.exists():
            shutil.copy2(gen_path, out_dir / gen_path.name)
        else:
            GenerationConfig.from_model_config(self.config).save_pretrained(str(out_dir))

    def layer_names(self, layer_prefix: str) -> Iterator[str]:
        return (n for n in self.reader.keys() if n.startswith(layer_prefix))


def open_source(spec: str, revision: str | None = None, tokenizer: str | None = None) -> CheckpointSource:
    """Resolve `spec` (Hub id, directory or .gguf path) into a CheckpointSource; `tokenizer` (a
    directory or Hub id) stands in for a source that ships no tokenizer."""
    source = _open_source(spec, revision)
    source.tokenizer = tokenizer
    return source


def _open_source(spec: str, revision: str | None) -> CheckpointSource:
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ConversionError(f"GGUF file '{spec}' does not exist.")
        return _open_gguf(path)
    if path.is_dir():
        return _open_directory(path, spec)
    if path.exists():
        raise ConversionError(
            f"'{spec}' is a file, not a model. Give a model directory (with config.json and "
            "*.safetensors), a .gguf file, or a Hub id such as meta-llama/Llama-2-7b-hf."
        )
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1) or spec.count("/") > 1:
        raise ConversionError(f"Model directory '{spec}' does not exist.")
    return _open_directory(_download(spec, revision), spec)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", repo_id):
        raise ConversionError(
            f"'{repo_id}' is neither an existing path nor a valid Hub id (expected owner/name)."
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
    except GatedRepoError:
        raise ConversionError(
            f"'{repo_id}' is gated on the Hub: accept its license on the model page and log in "
            "with `hf auth login` (or set HF_TOKEN)."
        ) from None
    except RepositoryNotFoundError:
        raise ConversionError(
            f"Model '{repo_id}' was not found on the Hub (or it is private and you are not logged in)."
        ) from None
    except RevisionNotFoundError:
        raise ConversionError(f"Revision '{revision}' of '{repo_id}' does not exist.") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise ConversionError(
            f"Cannot fetch '{repo_id}': the Hugging Face Hub is not reachable (offline, or "
            "HF_HUB_OFFLINE=1) and the model is not in the local cache. Download it where the Hub "
            "is reachable, or pass a local directory or .gguf file."
        ) from None
    except HfHubHTTPError as exc:
        raise ConversionError(f"Downloading '{repo_id}' failed: {exc}") from None
    except http_errors() as exc:  # the endpoint cannot be reached (DNS, refused, TLS, timeout)
        raise ConversionError(f"Downloading '{repo_id}' failed: {type(exc).__name__}: {exc}. Check the network "
                              "and HF_ENDPOINT, or pass a local directory or .gguf file.") from None


def _open_directory(directory: Path, spec: str) -> CheckpointSource:
    from transformers import AutoConfig

    from ..modeling.hosted import register_for

    if not (directory / "config.json").is_file():
        ggufs = sorted(directory.glob("*.gguf"))
        if len(ggufs) == 1:
            return _open_gguf(ggufs[0])
        raise ConversionError(
            f"'{spec}' has no config.json: it is not a Transformers model directory"
            + (f" (it holds several .gguf files; pass one: {', '.join(p.name for p in ggufs)})" if ggufs else "")
            + "."
        )
    try:
        # kvslim's own hosted classes are not remote code: they are registered, never trusted
        register_for(str(json.loads((directory / "config.json").read_text()).get("model_type", "")))
        config = AutoConfig.from_pretrained(str(directory))  # never trust_remote_code
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"Cannot read the config of '{spec}': {exc}") from None
    files = _weight_files(directory, spec)
    side = [p for p in sorted(directory.iterdir()) if p.is_file() and _PASSTHROUGH.match(p.name)]
    return CheckpointSource(spec, config, SafetensorsReader(files), directory, None, side)


def _weight_files(directory: Path, spec: str) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise ConversionError(f"'{index}' is not a valid safetensors index ({exc}).") from None
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise ConversionError(f"'{spec}' is missing weight shards: {', '.join(missing)}.")
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in {".bin", ".pt", ".pth"})
    if pickled:
        raise ConversionError(
            f"'{spec}' only has pickled weights ({', '.join(pickled)}). kvslim never unpickles "
            "checkpoints (it can run arbitrary code); convert them to safetensors first, e.g. "
            "load the model you trust and call save_pretrained(..., safe_serialization=True)."
        )
    raise ConversionError(f"'{spec}' has no *.safetensors weights.")


def _open_gguf(path: Path) -> CheckpointSource:
    from transformers import AutoConfig

    from .adapters import registered_adapter

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)  # the header only
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise ConversionError(f"Cannot load GGUF file '{path}': {exc}") from None
    config.dtype = torch.float32  # tensors come out dequantised
    adapter = registered_adapter(config.model_type)
    if adapter is not None and adapter.gguf_lazy:
        from .gguf_source import GGUFTensorReader

        reader = GGUFTensorReader(path, config, adapter, adapter.model_kind)
    else:
        reader = DictReader(_dequantise_all(path, config))
    return CheckpointSource(str(path), config, reader, path.parent, path.name, [])


def _dequantise_all(path: Path, config) -> dict[str, torch.Tensor]:
    """Every tensor of the file at once, through Transformers' GGUF loader: for architectures
    whose GGUF layout kvslim does not read itself (adapter.gguf_lazy)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise ConversionError(f"Cannot load GGUF file '{path}': {exc}") from None
    tensors = dict(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    return tensors
