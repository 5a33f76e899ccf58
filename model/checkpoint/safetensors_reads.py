"""Reads chosen tensors of a safetensors file with positioned reads into fresh tensors: no memory map.

A memory-mapped read (the `safetensors` package) hands out views of the file's pages: every page a
process touches counts in its resident memory for as long as the file stays mapped, and a copy of it
(a layout change, a dtype change) doubles it. Workers load shards of hundreds of GB; they read each
tensor straight into the anonymous memory that will hold it, so loading grows the process by the tensors
it keeps and nothing else (bench/int8.py measures the peak).

The file format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, N
bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the
data, offsets relative to its start. Nothing in the header is trusted: its length is bounded, every
entry's dtype, shape and offsets must agree with each other and lie inside the file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

MAX_HEADER_BYTES = 100 << 20  # the header of a Grok-1 expert file is a few kB
DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
          "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
          "F64": torch.float64}


class SafetensorsError(ValueError):
    """The file is not a well-formed safetensors file (the message says what is wrong)."""


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsFile:
    """The header of one file, validated; `read(name)` loads one tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{size} bytes: too short for a safetensors header")
            header_len = int.from_bytes(head, "little")
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise SafetensorsError(f"header length {header_len} exceeds the file ({size} bytes) or "
                                       f"{MAX_HEADER_BYTES} bytes")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise SafetensorsError(f"header is not JSON ({exc})") from None
        if not isinstance(header, dict):
            raise SafetensorsError("header is not a JSON object")
        data_start = 8 + header_len
        self.entries: dict[str, TensorEntry] = {}
        for name, raw in header.items():
            if name == "__metadata__":
                continue
            self.entries[name] = _entry(name, raw, data_start, size)

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name`, read into new memory (aligned by PyTorch's allocator)."""
        entry = self.entries[name]
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        if entry.nbytes:
            buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy().data).cast("B")
            fd = os.open(self.path, os.O_RDONLY)
            try:
                done = 0
                while done < entry.nbytes:
                    got = os.preadv(fd, [buffer[done:]], entry.offset + done)
                    if got <= 0:
                        raise SafetensorsError(f"'{name}': file ended after {done} of {entry.nbytes} bytes")
                    done += got
            finally:
                os.close(fd)
        return tensor


def _entry(name: str, raw: object, data_start: int, size: int) -> TensorEntry:
    if not isinstance(raw, dict):
        raise SafetensorsError(f"'{name}': header entry is not an object")
    dtype = DTYPES.get(str(raw.get("dtype")))
    shape, offsets = raw.get("shape"), raw.get("data_offsets")
    if dtype is None:
        raise SafetensorsError(f"'{name}': unsupported dtype {raw.get('dtype')!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise SafetensorsError(f"'{name}': shape {shape!r} is not a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise SafetensorsError(f"'{name}': data_offsets {offsets!r} are not [begin, end]")
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if offsets[1] - offsets[0] != nbytes:
        raise SafetensorsError(f"'{name}': {offsets[1] - offsets[0]} bytes stored for shape {shape} of {dtype}")
    if data_start + offsets[1] > size:
        raise SafetensorsError(f"'{name}': data ends at byte {data_start + offsets[1]}, past the file ({size})")
    return TensorEntry(dtype, tuple(shape), data_start + offsets[0], nbytes)
