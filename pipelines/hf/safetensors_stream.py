"""Read and write safetensors tensor by tensor, without memory-mapping whole files.

Reading with ``readinto`` (rather than ``mmap``) keeps the page cache out of the process's
resident memory, so converting a checkpoint holds only the tensors in flight. Every file's header
is checked against its size when it is opened: a truncated download is reported by name before
any conversion starts.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator

import torch

from pipelines.core.artifacts import read_json
from pipelines.core.errors import UserError, require

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _read_header(path: Path, key: str) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise UserError(f"{path} is truncated or not a safetensors file ({size} bytes)", key)
        (header_size,) = struct.unpack("<Q", prefix)
        if 8 + header_size > size:
            raise UserError(f"{path} is truncated: header needs {header_size} bytes, file has {size}", key)
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"{path} has a corrupt safetensors header ({error})", key) from None
    header.pop("__metadata__", None)
    data_start = 8 + header_size
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if data_start + end > size:
        raise UserError(f"{path} is truncated: tensors need {data_start + end} bytes, the file has "
                        f"{size}; download it again", key)
    return header, data_start


class SafetensorsFolder:
    """Tensors of a Hugging Face folder (``model.safetensors`` or a sharded index), read lazily."""

    def __init__(self, folder: str | os.PathLike, key: str = "source"):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            listed = read_json(index, key)
            weight_map = listed.get("weight_map") if isinstance(listed, dict) else None
            require(isinstance(weight_map, dict), f"{index} has no weight_map", key)
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(path.name for path in self.folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"no *.safetensors files in {self.folder}", key)
        self.entries: dict[str, tuple[Path, dict, int]] = {}
        for name in files:
            path = self.folder / name
            if not path.exists():
                raise UserError(f"{path} is listed in the index but missing", key)
            header, data_start = _read_header(path, key)
            for tensor_name, entry in header.items():
                self.entries[tensor_name] = (path, entry, data_start)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def files(self) -> list[Path]:
        return sorted({path for path, _, _ in self.entries.values()})

    def read_rows(self, name: str, first_row: int, out: torch.Tensor) -> None:
        """Read rows ``first_row : first_row + len(out)`` of tensor ``name`` into ``out`` in place."""
        path, entry, data_start = self.entries[name]
        dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
        if dtype != out.dtype or list(out.shape[1:]) != shape[1:] or not out.is_contiguous():
            raise ValueError(f"{name}: cannot read {shape} {dtype} rows into {tuple(out.shape)} {out.dtype}")
        row_bytes = out[0].numel() * out.element_size() if out.dim() > 1 else out.element_size()
        start = entry["data_offsets"][0] + first_row * row_bytes
        with open(path, "rb", buffering=0) as handle:
            handle.seek(data_start + start)
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            while view:
                read = handle.readinto(view)
                if not read:
                    raise UserError(f"{path} ended early while reading {name}", "source")
                view = view[read:]

    def shape(self, name: str) -> list[int]:
        return list(self.entries[name][1]["shape"])

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory."""
        path, entry, data_start = self.entries[name]
        start, end = entry["data_offsets"]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        with open(path, "rb") as handle:
            handle.seek(data_start + start)
            handle.readinto(memoryview(buffer.numpy()))
        return buffer.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_sharded(tensors: Iterator[tuple[str, torch.Tensor]], folder: Path,
                  max_shard_bytes: int = 4 << 30) -> dict:
    """Write ``(name, tensor)`` pairs as safetensors shards plus an index; return the index."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    total = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor.contiguous()
        shard_bytes += nbytes
        total += nbytes
    weight_map = {}
    count = len(shards)
    for number, shard in enumerate(shards, start=1):
        file_name = "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        save_file(shard, str(folder / file_name), metadata={"format": "pt"})
        # safetensors writes through a private temporary file (mode 0600): give it the mode any
        # other file written here gets, so a serving engine under another user can read it
        os.chmod(folder / file_name, 0o666 & ~_umask())
        weight_map.update({name: file_name for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    if count > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return index
