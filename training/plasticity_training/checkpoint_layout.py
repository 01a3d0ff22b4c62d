"""The safetensors layout a checkpoint writes, byte for byte and deterministically.

Runs in the trainer process (checkpoint.py plans every sync with it). The same tensor set (names, dtypes,
shapes) always gets the same file names, header bytes and offsets, which is what lets a sync compare a
generation's file with the live bytes block by block (checkpoint_io.py): tensors sorted by element size
then name, the JSON header padded with spaces so tensor data starts on a block boundary, shards filled
greedily below MAX_SHARD_BYTES.

    >>> plans = plan_layout(hf_tensors(model), block_size=4096)
    >>> plans[0].name, plans[0].size
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Mapping

import torch

BLOCK_SIZE = 4096
MAX_SHARD_BYTES = 5 << 30

_ST_DTYPE = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if isinstance(getattr(torch, _name, None), torch.dtype):
        _ST_DTYPE[getattr(torch, _name)] = _code


@dataclasses.dataclass
class _Segment:
    start: int  # byte offset in the file
    end: int
    data: torch.Tensor  # flat uint8, end - start bytes (may live on the GPU)


@dataclasses.dataclass
class FilePlan:
    """One safetensors file: its name, exact header bytes and where every tensor's bytes go."""

    name: str
    header: bytes  # 8-byte little-endian length + JSON + space padding
    size: int
    tensors: list[str]
    segments: list[_Segment]
    spans: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # tensor -> its bytes in the file
    ends: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.ends = [s.end for s in self.segments]


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1)  # a view when contiguous
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def plan_layout(tensors: Mapping[str, torch.Tensor], block_size: int = BLOCK_SIZE,
                max_shard_bytes: int = MAX_SHARD_BYTES) -> list[FilePlan]:
    """The deterministic file layout for `tensors`: same names, dtypes and shapes -> same bytes offsets.

    Shards are filled greedily in name order (one file below `max_shard_bytes`). Inside a file tensors
    are sorted by element size (largest first, so every tensor is aligned to its element size) then name,
    and the header is padded with spaces so tensor data starts on a block boundary.
    """
    if not tensors:
        raise ValueError("no tensors to checkpoint")
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"Invalid tensor name: {name!r}")
        if t.dtype not in _ST_DTYPE:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
    groups: list[list[str]] = [[]]
    used = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if groups[-1] and used + nbytes > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes
    n = len(groups)
    align = min(block_size, 1 << 16)
    plans = []
    for i, group in enumerate(groups):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        order = sorted(group, key=lambda k: (-tensors[k].element_size(), k))
        meta: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in order:
            t = tensors[name]
            nbytes = t.numel() * t.element_size()
            meta[name] = {"dtype": _ST_DTYPE[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        body = json.dumps(meta, separators=(",", ":")).encode()
        total = 8 + len(body)
        body += b" " * (-total % align)
        header = struct.pack("<Q", len(body)) + body
        segments = [_Segment(0, len(header), torch.frombuffer(bytearray(header), dtype=torch.uint8))]
        spans = {}
        pos = len(header)
        for name in order:
            t = tensors[name]
            nbytes = t.numel() * t.element_size()
            spans[name] = (pos, pos + nbytes)
            if nbytes:
                if not t.is_contiguous():
                    t = t.contiguous()
                segments.append(_Segment(pos, pos + nbytes, _byte_view(t)))
            pos += nbytes
        plans.append(FilePlan(fname, header, pos, order, segments, spans))
    return plans


def index_bytes(plans: list[FilePlan], tensors: Mapping[str, torch.Tensor]) -> bytes:
    weight_map = {name: p.name for p in plans for name in p.tensors}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(index, indent=2) + "\n").encode()
