"""GGUF weights read one tensor at a time, like safetensors shards.

The `gguf` package memory-maps the file; a tensor is dequantised (to float32) only when the
converter asks for it, so a conversion holds about one layer, not the whole dequantised model.
Names follow the `gguf` package's own HF -> GGUF name map for the file's architecture. llama.cpp
stores the query and key rows of some architectures permuted for its RoPE kernel (which ones
is the adapter's `gguf_permuted_qk`); reading undoes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import KeysView

import numpy as np
import torch

from .errors import ConversionError


def gguf_architecture(reader) -> str:
    field = reader.fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


class GGUFTensorReader:
    """Lazy access to a GGUF file's tensors under the Transformers names of `config`'s model."""

    def __init__(self, path: Path, config, adapter, kind: str = "causal"):
        from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map

        from .meta import meta_model

        file = GGUFReader(str(path))  # memory-mapped: no tensor data is read here
        arch = gguf_architecture(file)
        arch_id = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
        if arch_id is None:
            raise ConversionError(f"GGUF architecture '{arch}' is unknown to the installed gguf package.")
        # only the tensors' views of the map are kept: the parsed metadata (the tokenizer's
        # vocabulary as many small arrays, ~160 MB for SmolLM2) is let go
        tensors = {t.name: t for t in file.tensors}
        del file
        shapes = {name: tuple(t.shape) for name, t in meta_model(config, kind).state_dict().items()}
        if getattr(config, "tie_word_embeddings", False):
            shapes.pop("lm_head.weight", None)  # the output reuses the embedding
        names = get_tensor_name_map(arch_id, config.num_hidden_layers)
        self._where, self._shapes, missing = {}, {}, []
        for name, shape in shapes.items():
            gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name in tensors:
                self._where[name], self._shapes[name] = tensors[gguf_name], shape
            else:
                missing.append(name)
        if missing:
            raise ConversionError(f"The GGUF file has no tensor for {', '.join(missing[:5])}"
                                  + (f" and {len(missing) - 5} more" if len(missing) > 5 else "") + ".")
        self._heads: dict[str, int] = {}  # tensors stored permuted -> their head count
        if arch in adapter.gguf_permuted_qk:
            layout = adapter.layout(config)
            for i in range(layout.num_layers):
                self._heads[adapter.tensor_name(i, adapter.q_proj)] = layout.num_heads
                self._heads[adapter.tensor_name(i, adapter.k_proj)] = layout.num_kv_heads

    def keys(self) -> KeysView[str]:
        return self._where.keys()

    def get(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        tensor = self._where[name]
        data = dequantize(tensor.data, tensor.tensor_type)  # a new array, or (float32) a view of the map
        if np.may_share_memory(data, tensor.data) or not data.flags.writeable or data.dtype != np.float32:
            data = np.array(data, dtype=np.float32)  # off the (read-only) map
        out = torch.from_numpy(data).reshape(self._shapes[name])
        heads = self._heads.get(name)
        if heads:  # llama.cpp interleaved each head's two rotate-half halves; put them back
            rows, rest = out.shape[0], out.shape[1:]
            out = out.reshape(heads, rows // heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest).contiguous()
        return out

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32  # dequantised

    def stored(self, name: str) -> None:
        return None  # stored quantised: never the bytes of the output

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]
