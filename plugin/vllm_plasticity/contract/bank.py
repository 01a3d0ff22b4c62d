"""The bank format: concept vectors on disk, the contract between extraction and the server's readout,
and the one rule for where a bank fits in the server's readout table.

Any process (extraction writes banks; the API server checks them; vLLM's worker loads them). Imports torch
and safetensors, never vLLM.

    BANK_DIR/
      readout.safetensors   layer_<idx>.vectors: (n_concepts, hidden_size), one unit vector per concept
      readout.json          {"concepts": [...], "layers": [...], "hidden_size", "dtype", "model",
                             "method", "created"}

The hidden state of layer L is the residual stream at the output of decoder layer L (before the final
norm), layers indexed from 0; a concept's score is the dot product of that state with its unit vector.
Row i of every layer's tensor belongs to `concepts[i]`. The extraction settings are kept
in the safetensors header metadata under "extraction" (a JSON string), so readout.json stays exactly the
keys above.

    >>> save_bank("bank", ["calm", "joy"], {12: vectors}, model="/models/x", method="pooled")
    >>> bank = load_bank("bank")
    >>> bank.vectors[12] @ hidden_state          # (n_concepts,) scores
    >>> free_columns([range(0, 100)], 100, capacity=256)   # where a 100-concept bank goes
    range(100, 200)
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path

import torch
from torch import Tensor

from vllm_plasticity.contract.files import write_atomically, write_file_atomically

VECTORS_FILE = "readout.safetensors"
MANIFEST_FILE = "readout.json"
BANK_FILES = (MANIFEST_FILE, VECTORS_FILE)  # every file load_bank opens
UNIT_TOLERANCE = 1e-3  # |norm - 1| allowed on load (bf16 banks round to ~4e-3: stored fp32 here)


class BankError(ValueError):
    """A bank directory that does not follow the format; the message names the file and the fault."""


@dataclasses.dataclass(frozen=True)
class Bank:
    concepts: list[str]
    layers: list[int]
    vectors: dict[int, Tensor]  # layer -> (n_concepts, hidden_size)
    hidden_size: int
    dtype: str
    model: str
    method: str
    created: str
    extraction: dict  # settings the extraction ran with (may be empty)


def free_columns(taken: list[range], n: int, capacity: int) -> range | None:
    """Where a bank of `n` concepts goes in the readout table: the first free run of `n` columns beside
    the `taken` ones, or None. A bank needs one contiguous run (the tap reads it as one slice), so free
    columns scattered between banks do not add up; the API server and the worker both ask this."""
    start = 0
    for r in sorted(taken, key=lambda r: r.start):
        if r.start - start >= n:
            break
        start = max(start, r.stop)
    return range(start, start + n) if start + n <= capacity else None


def capacity_message(name: str, n: int, capacity: int) -> str:
    return (f"bank {name!r} has {n} concepts and no run of {n} free columns is left in the readout capacity "
            f"{capacity} (unload a bank, or raise PLASTICITY_READOUT_CAPACITY)")


def layer_key(layer: int) -> str:
    return f"layer_{layer}.vectors"


def save_bank(path: str | os.PathLike, concepts: list[str], vectors: dict[int, Tensor], *, model: str, method: str,
              extraction: dict | None = None, created: str | None = None) -> Path:
    """Write a bank (vectors are renormalised and stored fp32). Files are replaced atomically, the
    safetensors file first, so a reader never sees a manifest naming layers the tensors lack."""
    from safetensors.torch import save_file

    path = Path(path)
    if not vectors:
        raise ValueError("Invalid vectors: no layer given")
    if len(set(concepts)) != len(concepts):
        raise ValueError(f"Invalid concepts: duplicate names in {concepts}")
    layers = sorted(vectors)
    hidden = None
    tensors = {}
    for L in layers:
        v = vectors[L].detach().float().cpu()
        if v.ndim != 2 or v.shape[0] != len(concepts) or (hidden is not None and v.shape[1] != hidden):
            raise ValueError(f"Invalid vectors for layer {L}: shape {tuple(v.shape)}, expected "
                             f"({len(concepts)}, {hidden if hidden is not None else 'hidden'})")
        if not torch.isfinite(v).all() or bool((v.norm(dim=1) == 0).any()):
            raise ValueError(f"Invalid vectors for layer {L}: a row is zero or not finite")
        hidden = v.shape[1]
        tensors[layer_key(L)] = (v / v.norm(dim=1, keepdim=True)).contiguous()
    manifest = {
        "concepts": list(concepts),
        "layers": layers,
        "hidden_size": hidden,
        "dtype": "float32",
        "model": model,
        "method": method,
        "created": created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path.mkdir(parents=True, exist_ok=True)
    metadata = {"extraction": json.dumps(extraction or {}, sort_keys=True)}
    write_file_atomically(path / VECTORS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    write_atomically(path / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    return path


def load_bank(path: str | os.PathLike) -> Bank:
    """Read and check a bank: every listed layer present, shapes (n_concepts, hidden_size), unit rows."""
    from safetensors import safe_open

    path = Path(path)
    for name in (VECTORS_FILE, MANIFEST_FILE):
        if not (path / name).is_file():
            raise BankError(f"{path / name}: missing (a bank is a directory with {VECTORS_FILE} and {MANIFEST_FILE})")
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except json.JSONDecodeError as e:
        raise BankError(f"{path / MANIFEST_FILE}: not JSON ({e})") from None
    missing = [k for k in ("concepts", "layers", "hidden_size", "dtype", "model", "method", "created") if k not in manifest]
    if missing:
        raise BankError(f"{path / MANIFEST_FILE}: missing keys {missing}")
    concepts, layers, hidden = list(manifest["concepts"]), [int(L) for L in manifest["layers"]], int(manifest["hidden_size"])
    if not concepts or not layers:
        raise BankError(f"{path / MANIFEST_FILE}: an empty bank ({len(concepts)} concepts, {len(layers)} layers)")
    if not all(isinstance(c, str) and c for c in concepts):
        raise BankError(f"{path / MANIFEST_FILE}: concept names must be non-empty strings")
    duplicates = sorted({c for c in concepts if concepts.count(c) > 1})
    if duplicates:
        raise BankError(f"{path / MANIFEST_FILE}: duplicate concept names {duplicates[:5]}")
    vectors = {}
    with safe_open(str(path / VECTORS_FILE), framework="pt") as f:
        extraction = json.loads((f.metadata() or {}).get("extraction", "{}"))
        keys = set(f.keys())
        for L in layers:
            if layer_key(L) not in keys:
                raise BankError(f"{path / VECTORS_FILE}: no tensor {layer_key(L)!r} for listed layer {L}")
            v = f.get_tensor(layer_key(L))
            if tuple(v.shape) != (len(concepts), hidden):
                raise BankError(f"{path / VECTORS_FILE}: {layer_key(L)} has shape {tuple(v.shape)}, "
                                f"expected ({len(concepts)}, {hidden})")
            norms = v.float().norm(dim=1)
            if not bool(((norms - 1).abs() <= UNIT_TOLERANCE).all()):
                worst = int((norms - 1).abs().argmax())
                raise BankError(f"{path / VECTORS_FILE}: {layer_key(L)} row {worst} ({concepts[worst]}) has norm "
                                f"{float(norms[worst]):.4f}, expected unit vectors")
            vectors[L] = v
    return Bank(concepts=concepts, layers=layers, vectors=vectors, hidden_size=hidden, dtype=str(manifest["dtype"]),
                model=str(manifest["model"]), method=str(manifest["method"]), created=str(manifest["created"]),
                extraction=extraction)
