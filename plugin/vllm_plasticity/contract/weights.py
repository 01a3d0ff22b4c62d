"""Weights another process can change in place: export in the vLLM worker, map in the trainer.

Two sides of one contract, kept in one file so they cannot drift apart. Imports torch, never vLLM.

Worker side (runs inside vLLM's worker process, right after the weights are loaded and before
torch.compile sees them):
  * CPU: every parameter is moved into one page-aligned arena file in /dev/shm
    (`/dev/shm/plasticity-<pid>-<token>.weights`) and the Parameter's `.data` becomes a view of it. The
    Parameter objects stay the same, so vLLM's layers, tied embeddings and compiled graphs keep working;
    a write through another process's mapping of the file is the weight vLLM reads on the next forward.
  * CUDA: nothing moves; each parameter's CUDA IPC handle (torch's `reduce_tensor`) goes in the
    manifest. Not valid with sleep mode or expandable segments (the allocator may move the block).

Other side (the trainer, tests): `map_shared_weights(manifest)` returns {name: tensor} aliasing vLLM's.

    >>> manifest = WeightManifest.from_dict(json.loads(path.read_text()))
    >>> weights = map_shared_weights(manifest)
    >>> weights["lm_head.weight"][0, 0] += 1.0      # the next completion sees it

Why one arena and not torch's `share_memory_()`: torch's file_system strategy names files itself, leaks
them on crash and keys them to a manager process; one file we name (with the owner's pid) is mapped
with a single call, swept if its owner died, and has stable offsets for the block-diff checkpointer.
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import os
import pickle
import secrets
from pathlib import Path

import torch

FORMAT = "plasticity.weights/1"
SHM_DIR = Path("/dev/shm")
ARENA_PREFIX = "plasticity-"
ALIGN = 4096  # page-aligned offsets: every tensor starts on its own 4 KiB block


@dataclasses.dataclass
class TensorEntry:
    name: str  # vLLM parameter name, e.g. "model.layers.0.self_attn.qkv_proj.weight"
    dtype: str  # torch dtype name without "torch.", e.g. "float32"
    shape: list[int]
    offset: int = 0  # byte offset in the CPU arena
    nbytes: int = 0
    ipc: str | None = None  # CUDA: base64 of the pickled (rebuild_fn, args) from reduce_tensor


@dataclasses.dataclass
class WeightManifest:
    kind: str  # "cpu_shm" or "cuda_ipc"
    pid: int  # the worker process that owns the memory
    tensors: list[TensorEntry]
    arena: str | None = None  # CPU: path of the arena file
    arena_bytes: int = 0
    format: str = FORMAT

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WeightManifest":
        if d.get("format") != FORMAT:
            raise ValueError(f"Invalid weight manifest format: {d.get('format')!r} (expected {FORMAT!r})")
        d = dict(d)
        d["tensors"] = [TensorEntry(**t) for t in d["tensors"]]
        return cls(**d)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Invalid dtype in weight manifest: {name!r}")
    return dtype


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_arenas(shm_dir: Path = SHM_DIR) -> list[Path]:
    """Remove arena files whose owning process is gone (left by a SIGKILLed worker)."""
    removed = []
    for path in shm_dir.glob(ARENA_PREFIX + "*.weights"):
        try:
            pid = int(path.name[len(ARENA_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if not pid_alive(pid):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def share_cpu_parameters(module: torch.nn.Module, shm_dir: Path = SHM_DIR) -> WeightManifest:
    """Move every parameter of `module` into one shared-memory arena; return its manifest.

    Parameters keep their identity (only `.data` changes), so call this after weights are loaded and
    before anything captures their storage (torch.compile, oneDNN packing).
    """
    sweep_stale_arenas(shm_dir)
    params = list(module.named_parameters())  # tied parameters appear once
    entries, offset = [], 0
    for name, p in params:
        nbytes = p.numel() * p.element_size()
        entries.append(TensorEntry(name, str(p.dtype).removeprefix("torch."), list(p.shape), offset, nbytes))
        offset += -(-nbytes // ALIGN) * ALIGN
    total = max(offset, ALIGN)
    path = shm_dir / f"{ARENA_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.weights"
    with open(path, "wb") as f:
        f.truncate(total)
    # Removed at clean exit; a killed worker's file is swept by the next start (sweep_stale_arenas).
    atexit.register(_unlink_quietly, str(path))
    arena = torch.from_file(str(path), shared=True, size=total, dtype=torch.uint8)  # (total,)
    for entry, (_, p) in zip(entries, params):
        view = _arena_view(arena, entry)
        view.copy_(p.data)
        p.data = view
    return WeightManifest(kind="cpu_shm", pid=os.getpid(), tensors=entries, arena=str(path), arena_bytes=total)


def export_cuda_parameters(module: torch.nn.Module) -> WeightManifest:
    """CUDA IPC handles for every parameter of `module` (no copy, no move)."""
    from torch.multiprocessing.reductions import reduce_tensor

    entries = []
    for name, p in module.named_parameters():
        handle = base64.b64encode(pickle.dumps(reduce_tensor(p.data))).decode()
        nbytes = p.numel() * p.element_size()
        entries.append(TensorEntry(name, str(p.dtype).removeprefix("torch."), list(p.shape), 0, nbytes, handle))
    return WeightManifest(kind="cuda_ipc", pid=os.getpid(), tensors=entries)


def _arena_view(arena: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    return arena[entry.offset : entry.offset + entry.nbytes].view(_dtype(entry.dtype)).view(entry.shape)


def map_shared_weights(manifest: WeightManifest) -> dict[str, torch.Tensor]:
    """Tensors aliasing the worker's weights, by vLLM parameter name."""
    if not pid_alive(manifest.pid):
        raise RuntimeError(f"the vLLM worker (pid {manifest.pid}) that owns these weights is not running")
    if manifest.kind == "cpu_shm":
        if not manifest.arena or not Path(manifest.arena).exists():
            raise RuntimeError(f"weight arena {manifest.arena!r} does not exist")
        arena = torch.from_file(manifest.arena, shared=True, size=manifest.arena_bytes, dtype=torch.uint8)
        return {e.name: _arena_view(arena, e) for e in manifest.tensors}
    if manifest.kind == "cuda_ipc":
        out = {}
        for e in manifest.tensors:
            rebuild, args = pickle.loads(base64.b64decode(e.ipc))  # our own worker's handles, not user input
            out[e.name] = rebuild(*args)
        return out
    raise ValueError(f"Invalid weight manifest kind: {manifest.kind!r}")
