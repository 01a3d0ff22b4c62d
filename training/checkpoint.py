"""Crash-safe, block-diff checkpoints of the live weights, in Hugging Face layout.

Where it runs: in the trainer process (plasticity_training.trainer), between training steps. It reads the
weights through the HF view (hf_view.build_hf_view: HF names, views of vLLM's live tensors, the fused
`qkv_proj`/`gate_up_proj` already split back into q/k/v and gate/up, vLLM's vocabulary padding already
cut off), so what it writes is a stock Hugging Face checkpoint. Imports torch, never vLLM or safetensors'
writer (the file format is written here, byte for byte, so that the layout is fixed; see below).

On-disk layout of a checkpoint directory (by default a directory of its own, not the served model's):

    <checkpoint>/
      current -> gen-b              symlink: THE directory to load. `vllm serve <checkpoint>/current`,
                                    AutoModelForCausalLM.from_pretrained("<checkpoint>/current")
      gen-a/  gen-b/                two generations; `current` names the newer complete one
        model.safetensors           (model-0000k-of-0000n.safetensors above 5 GiB) HF names and shapes
        model.safetensors.index.json      always written: vLLM loads only the files the index lists
        config.json, generation_config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json,
        chat_template.jinja, ...    copied from the served model's directory (small known files only)
        plasticity_state/           the caller's extra files (optimizer.safetensors, trainer_state.json):
                                    they flip with the weights, so weights and optimizer never disagree
        plasticity_checkpoint.json  generation number, layout, state files (written last)
      .lock                         flock held by the one writer

Crash safety: copy-on-write at the directory level (two generations and an atomic pointer), no journal.
A sync writes only the generation `current` does not name (the standby), fsyncs every file and directory
it wrote, then points `current` at it with rename(2) of a fresh symlink, which is atomic. Killed at any
instant before that rename, `current` still names the old generation, which no step of the sync touched;
after it, the new one, complete and fsynced. Why not a journal: the readers are stock tools
(transformers, `vllm serve`) that never replay one, so between a crash and a recovery run they would read
a half-applied file. Why not a fresh copy per sync: that is the full rewrite this module exists to avoid.

Block diff: the standby holds the weights of two syncs ago. A sync reads the standby's weight file in
8 MiB windows, compares it with the live bytes per 4 KiB block and pwrite()s only the blocks that differ.
So a sync writes the blocks changed in the last two syncs: one layer trained step after step writes that
layer; a step that changed nothing after one that changed a layer writes that layer once more (the
standby catches up), then nothing. The compare is exact (bytes, not hashes) and assumes nothing about
the standby's content, so a standby left half-written by a crash or a full disk is repaired by the next
sync. The file layout is deterministic (tensors sorted by element size then name, JSON header padded so
tensor data starts on a block boundary): the same tensor set always gets the same offsets. A weight file
whose size or header differs (another tensor set, shape or dtype) is written in full, to a temporary
file renamed into place in the standby. The first sync writes a full generation, flips, then seeds the
standby with a kernel-side copy (copy_file_range, a reflink on XFS/btrfs), so every later sync is
incremental. Cost of a sync: one sequential read of a generation's weights, an in-memory compare, the
changed blocks written, fsync. Disk: two copies of the model.

Contract: the weights must not change while a sync runs (the trainer calls it between steps; vLLM never
writes weights). A reader that resolves `current` once (os.path.realpath, `resolve_checkpoint`) reads a
generation that no sync touches before the second sync after that moment.

Usage:

    from plasticity_training.checkpoint import hf_tensors, load_checkpoint_state, sync_checkpoint

    report = sync_checkpoint(hf_tensors(core.model), "/data/ckpt", model_path,
                             extra_files={"trainer_state.json": state_json_bytes,
                                          "optimizer.safetensors": safetensors.torch.save(flat_state)},
                             allowed_root="/data")
    report.path                      # /data/ckpt/current: load it with transformers or vllm serve
    report.weight_bytes_written      # about the bytes of the tensors that changed
    load_checkpoint_state("/data/ckpt")["trainer_state.json"]
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import fcntl
import json
import mmap
import os
import shutil
import struct
import threading
import time
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

FORMAT = "plasticity.checkpoint/1"
BLOCK_SIZE = 4096
WINDOW_BYTES = 8 << 20  # compare/write granularity: two buffers of this size
MAX_SHARD_BYTES = 5 << 30
CURRENT = "current"
GENERATIONS = ("gen-a", "gen-b")
STATE_DIR = "plasticity_state"
MANIFEST = "plasticity_checkpoint.json"
INDEX = "model.safetensors.index.json"
LOCK = ".lock"
TMP_SUFFIX = ".plasticity-tmp"
# Copied from the served model's directory when present. Weights (*.safetensors, *.bin) never are.
SOURCE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json", "plasticity_spec.json",
)
MAX_SOURCE_FILE_BYTES = 64 << 20

_ST_DTYPE = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if isinstance(getattr(torch, _name, None), torch.dtype):
        _ST_DTYPE[getattr(torch, _name)] = _code


class CheckpointError(RuntimeError):
    """A sync was refused or failed. Unless the message says otherwise the previous checkpoint is intact."""


class CheckpointPathError(CheckpointError):
    """The target is outside the allowed root, is the served model's own directory, or is not ours."""


class CheckpointNonFiniteError(CheckpointError):
    """The weights hold NaN/Inf: a checkpoint of them would be a wreck, so nothing is written."""


class CheckpointWriteError(CheckpointError):
    """The checkpoint directory could not be written (permissions, read-only file system, I/O error)."""


class CheckpointDiskFullError(CheckpointWriteError):
    """ENOSPC/EDQUOT while writing the standby generation."""


class CheckpointBusyError(CheckpointError):
    """Another process holds the checkpoint's lock (a sync is running)."""


@dataclasses.dataclass
class SyncReport:
    path: Path  # <checkpoint>/current: the directory to load
    generation_dir: Path  # the generation `current` names now
    generation: int  # 1 for the first sync, +1 each sync
    bytes_written: int  # everything: weight blocks, whole files, seeding copy, metadata, state files
    weight_bytes_written: int  # weight-file bytes only (changed blocks, or whole files)
    bytes_read: int  # weight-file bytes read for the compare
    blocks_changed: int  # weight-file blocks written
    blocks_total: int  # weight-file blocks in the checkpoint
    seconds: float
    full_rewrite: bool  # some weight file was written whole (first sync, changed layout)
    warnings: list[str] = dataclasses.field(default_factory=list)


# ---- what to write ------------------------------------------------------------------------------


def hf_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF name -> tensor (a view, no copy) for every tensor `save_pretrained` would write.

    `model` is the HF view from build_hf_view (its parameters already carry HF names and are views of
    vLLM's tensors) or any HF causal LM. Persistent buffers are included, tied parameters appear once and
    lm_head.weight is left out when the config ties it to the embeddings (as save_pretrained does).
    A tensor is made contiguous (copied) only when it is not already.
    """
    config = getattr(model, "config", None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if tied and name == "lm_head.weight":
            continue
        if id(t) in seen:  # the same Parameter under a second name (tied weights)
            continue
        seen.add(id(t))
        t = t.detach()
        out[name] = t if t.is_contiguous() else t.contiguous()
    return out


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
        pos = len(header)
        for name in order:
            t = tensors[name]
            nbytes = t.numel() * t.element_size()
            if nbytes:
                if not t.is_contiguous():
                    t = t.contiguous()
                segments.append(_Segment(pos, pos + nbytes, _byte_view(t)))
            pos += nbytes
        plans.append(FilePlan(fname, header, pos, order, segments))
    return plans


def _index_bytes(plans: list[FilePlan], tensors: Mapping[str, torch.Tensor]) -> bytes:
    weight_map = {name: p.name for p in plans for name in p.tensors}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(index, indent=2) + "\n").encode()


# ---- paths and small files ----------------------------------------------------------------------


NAME_MAX, PATH_MAX = 255, 4095  # bytes, Linux


def _check_target(target_dir, source_model_dir, allowed_root, allow_model_dir: bool) -> Path:
    raw = os.fsencode(os.path.expanduser(os.fspath(target_dir)))
    if len(raw) > PATH_MAX or any(len(part) > NAME_MAX for part in raw.split(b"/")):
        raise CheckpointPathError(f"checkpoint path {os.fsdecode(raw[:80])!r}... is longer than the filesystem "
                                  f"allows ({NAME_MAX} bytes a name, {PATH_MAX} in all)")
    target = Path(target_dir).expanduser().resolve()
    if allowed_root is not None:
        root = Path(allowed_root).expanduser().resolve()
        if target != root and root not in target.parents:
            raise CheckpointPathError(f"checkpoint directory {target} is outside the allowed root {root}")
    for parent in target.parents:  # never a checkpoint inside another's generation (or the other itself)
        if _is_checkpoint(parent):
            raise CheckpointPathError(f"checkpoint directory {target} is inside the checkpoint {parent}; "
                                      "give a name of its own")
    source = Path(source_model_dir).expanduser().resolve()
    if (target == source or source in target.parents) and not allow_model_dir:
        raise CheckpointPathError(
            f"checkpoint directory {target} is inside the served model's directory {source}; "
            "write checkpoints to a directory of their own, or pass allow_model_dir=True")
    if target.is_dir() and not allow_model_dir:
        entries = {p.name for p in target.iterdir()}
        if entries and not entries & {CURRENT, LOCK, *GENERATIONS}:
            raise CheckpointPathError(f"{target} is a non-empty directory that is not a plasticity checkpoint "
                                      f"(no {CURRENT!r}, {GENERATIONS[0]!r} or {GENERATIONS[1]!r})")
    return target


def _is_checkpoint(path: Path) -> bool:
    """A checkpoint directory (a `current` link beside a generation) or one of its generations."""
    return ((path / CURRENT).is_symlink() and any((path / g).is_dir() for g in GENERATIONS)) or (path / MANIFEST).exists()


def _read_source_files(source_model_dir) -> tuple[dict[str, bytes], list[str]]:
    src = Path(source_model_dir)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"no config.json in the source model directory {src}")
    out, warnings = {}, []
    for name in SOURCE_FILES:
        path = src / name
        if path.is_file():
            if path.stat().st_size > MAX_SOURCE_FILE_BYTES:
                warnings.append(f"skipped {path}: larger than {MAX_SOURCE_FILE_BYTES} bytes")
                continue
            out[name] = path.read_bytes()
    return out, warnings


def _read_extra_files(extra_files: Mapping[str, bytes | str | os.PathLike]) -> dict[str, bytes]:
    out = {}
    for name, value in extra_files.items():
        if (not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\\" in name
                or name.endswith(TMP_SUFFIX)):
            raise ValueError(f"Invalid extra file name: {name!r} (a plain file name, not a path)")
        out[name] = bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else Path(value).read_bytes()
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _pread_exact(fd: int, buf: memoryview, offset: int) -> None:
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            raise CheckpointError(f"unexpected end of file at byte {offset + got}")
        got += n


def _write_small(path: Path, data: bytes, stats: "_Stats") -> None:
    """Write `data` to `path` (temp file, fsync, rename) unless it already holds exactly that."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    with _replacing(path) as fd:
        _pwrite_all(fd, memoryview(data), 0)
    stats.bytes_written += len(data)


@contextlib.contextmanager
def _replacing(path: Path):
    """Yield the fd of a temporary file that, once the block succeeds, is fsynced and renamed over `path`;
    on any failure it is removed and `path` is untouched."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        yield fd
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


# ---- the sync -----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Stats:
    bytes_written: int = 0
    weight_bytes_written: int = 0
    bytes_read: int = 0
    blocks_changed: int = 0
    blocks_total: int = 0
    full_rewrite: bool = False


class _Buffers:
    """Two window-sized byte buffers (live bytes, file bytes) seen as torch tensors and memoryviews."""

    def __init__(self, size: int) -> None:
        self.size = size
        # Page-aligned (anonymous mmap), not bytearray: copies between the page cache and a buffer that is
        # 16 bytes off a cache line ran 5x slower (1.8 vs 10 GB/s) on the AMD EPYC VM this was built on.
        self.live_raw, self.file_raw = mmap.mmap(-1, size), mmap.mmap(-1, size)
        self.live = torch.frombuffer(self.live_raw, dtype=torch.uint8)
        self.file = torch.frombuffer(self.file_raw, dtype=torch.uint8)
        self.live_mv, self.file_mv = memoryview(self.live_raw), memoryview(self.file_raw)


_POOL_LOCK = threading.Lock()
_POOL: list[_Buffers] = []  # one set kept between syncs: fresh pages cost more than the compare


def _take_buffers(size: int) -> _Buffers:
    with _POOL_LOCK:
        if _POOL and _POOL[-1].size == size:
            return _POOL.pop()
    return _Buffers(size)


def _give_back(bufs: _Buffers) -> None:
    with _POOL_LOCK:
        _POOL[:] = [bufs]


def _fill(plan: FilePlan, pos: int, n: int, out: torch.Tensor) -> None:
    """Copy the file bytes [pos, pos + n) of `plan` (header and live tensor bytes) into out[:n]."""
    end = pos + n
    i = bisect.bisect_right(plan.ends, pos)
    while i < len(plan.segments) and plan.segments[i].start < end:
        seg = plan.segments[i]
        a, b = max(pos, seg.start), min(end, seg.end)
        out[a - pos : b - pos].copy_(seg.data[a - seg.start : b - seg.start])
        i += 1


def _live_window(plan: FilePlan, pos: int, n: int, padded: int, bufs: _Buffers) -> tuple[torch.Tensor, memoryview]:
    """The file bytes [pos, pos + padded) as live data: (uint8 tensor, memoryview of the same bytes).

    A window inside one CPU tensor is that tensor's own memory (no copy); anything else (a window across
    tensors, the zero-padded last block, a GPU tensor) is copied into the live buffer.
    """
    if n == padded:
        i = bisect.bisect_right(plan.ends, pos)
        if i < len(plan.segments):
            seg = plan.segments[i]
            if seg.start <= pos and pos + n <= seg.end and seg.data.device.type == "cpu":
                view = seg.data[pos - seg.start : pos - seg.start + n]
                if view.data_ptr() % 64 == 0:  # cache-line aligned, else the copy below is faster
                    return view, memoryview(view.numpy())
    _fill(plan, pos, n, bufs.live)
    if padded > n:
        bufs.live[n:padded].zero_()
    return bufs.live[:padded], bufs.live_mv


def _same_layout(path: Path, plan: FilePlan) -> bool:
    try:
        if path.stat().st_size != plan.size:
            return False
        with open(path, "rb") as f:
            return f.read(len(plan.header)) == plan.header
    except FileNotFoundError:
        return False


def _diff_write(path: Path, plan: FilePlan, bufs: _Buffers, block_size: int, stats: _Stats, progress) -> None:
    """Bring `path` (same size and header as `plan`) to the live bytes, writing only differing blocks."""
    window = bufs.size
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass
        pos = 0
        while pos < plan.size:
            n = min(window, plan.size - pos)
            nblocks = -(-n // block_size)
            padded = nblocks * block_size
            live, live_mv = _live_window(plan, pos, n, padded, bufs)
            _pread_exact(fd, bufs.file_mv[:n], pos)
            stats.bytes_read += n
            if padded > n:  # the last, partial block: compare equal padding
                bufs.file[n:padded].zero_()
            a = live.view(torch.int64).view(nblocks, block_size // 8)
            b = bufs.file[:padded].view(torch.int64).view(nblocks, block_size // 8)
            changed = torch.nonzero((a != b).any(dim=1)).flatten()
            stats.blocks_total += nblocks
            if changed.numel():
                stats.blocks_changed += changed.numel()
                breaks = torch.nonzero(changed[1:] - changed[:-1] != 1).flatten() + 1
                starts = torch.cat([changed[:1], changed[breaks]]).tolist()
                ends = (torch.cat([changed[breaks - 1], changed[-1:]]) + 1).tolist()
                for s, e in zip(starts, ends):
                    lo, hi = s * block_size, min(e * block_size, n)
                    _pwrite_all(fd, live_mv[lo:hi], pos + lo)
                    stats.weight_bytes_written += hi - lo
                    stats.bytes_written += hi - lo
            pos += n
            if progress is not None:
                progress(pos)
        os.fsync(fd)  # also when nothing differed: blocks a killed sync wrote may not be on disk yet
    finally:
        os.close(fd)


def _full_write(path: Path, plan: FilePlan, bufs: _Buffers, block_size: int, stats: _Stats, progress) -> None:
    """Write `plan` whole to a temporary file (space reserved first), fsync, rename over `path`."""
    window = bufs.size
    with _replacing(path) as fd:
        try:
            os.posix_fallocate(fd, 0, plan.size)  # ENOSPC here, before anything is written
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        pos = 0
        while pos < plan.size:
            n = min(window, plan.size - pos)
            _fill(plan, pos, n, bufs.live)
            _pwrite_all(fd, bufs.live_mv[:n], pos)
            pos += n
            if progress is not None:
                progress(pos)
    blocks = -(-plan.size // block_size)
    stats.blocks_total += blocks
    stats.blocks_changed += blocks
    stats.weight_bytes_written += plan.size
    stats.bytes_written += plan.size
    stats.full_rewrite = True


def _copy_file(src: Path, dst: Path) -> int:
    """Kernel-side copy (copy_file_range: no user-space buffer, a reflink where the FS can), fsynced."""
    tmp = dst.with_name(dst.name + TMP_SUFFIX)
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            size = os.fstat(fi.fileno()).st_size
            done = 0
            try:
                while done < size:
                    n = os.copy_file_range(fi.fileno(), fo.fileno(), size - done)
                    if n == 0:
                        break
                    done += n
            except OSError as exc:
                if exc.errno not in (errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                fi.seek(done)
                fo.seek(done)
                shutil.copyfileobj(fi, fo, 8 << 20)
            fo.flush()
            os.fsync(fo.fileno())
    except BaseException:
        _unlink(tmp)
        raise
    os.replace(tmp, dst)
    return size


def _read_current(target: Path) -> str | None:
    try:
        dest = os.readlink(target / CURRENT)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"{target / CURRENT} is not a symlink: {exc}") from exc
    if dest not in GENERATIONS:
        raise CheckpointError(f"{target / CURRENT} points at {dest!r}, expected one of {GENERATIONS}")
    return dest


def _read_manifest(gen_dir: Path) -> dict | None:
    try:
        manifest = json.loads((gen_dir / MANIFEST).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return manifest if manifest.get("format") == FORMAT else None


def _write_generation(gen_dir: Path, plans: list[FilePlan], index: bytes, small: dict[str, bytes],
                      extras: dict[str, bytes], manifest: dict, block_size: int, stats: _Stats, progress) -> None:
    """Make `gen_dir` (not named by `current`) a complete, fsynced checkpoint of the live weights."""
    gen_dir.mkdir(exist_ok=True)
    state_dir = gen_dir / STATE_DIR
    # From here until the manifest is rewritten this generation is incomplete; `current` does not name it.
    _unlink(gen_dir / MANIFEST)
    wanted = {p.name for p in plans} | {INDEX, MANIFEST} | set(small)
    for path in gen_dir.iterdir():  # leftovers of a killed sync, an older layout or dropped source files
        stale_weight = path.suffix == ".safetensors" and path.name not in wanted
        stale_source = path.name in SOURCE_FILES and path.name not in small
        if path.is_file() and (path.name.endswith(TMP_SUFFIX) or stale_weight or stale_source):
            path.unlink()
    state_dir.mkdir(exist_ok=True)
    for path in state_dir.iterdir():
        if path.is_file() and path.name not in extras:
            path.unlink()

    window = max(block_size, min(WINDOW_BYTES // block_size, -(-max(p.size for p in plans) // block_size)) * block_size)
    bufs = _take_buffers(window)
    total, done = sum(p.size for p in plans), 0
    try:
        for plan in plans:
            path = gen_dir / plan.name
            report = None if progress is None else (lambda pos, base=done: progress(base + pos, total))
            if _same_layout(path, plan):
                _diff_write(path, plan, bufs, block_size, stats, report)
            else:
                _full_write(path, plan, bufs, block_size, stats, report)
            done += plan.size
    finally:
        _give_back(bufs)
    _write_small(gen_dir / INDEX, index, stats)
    for name, data in small.items():
        _write_small(gen_dir / name, data, stats)
    for name, data in extras.items():
        _write_small(state_dir / name, data, stats)
    _fsync_dir(state_dir)
    _write_small(gen_dir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode(), stats)
    _fsync_dir(gen_dir)


def _flip(target: Path, name: str) -> None:
    """Point `current` at generation `name`: a new symlink renamed over the old one (atomic)."""
    tmp = target / (CURRENT + TMP_SUFFIX)
    _unlink(tmp)
    os.symlink(name, tmp)
    os.replace(tmp, target / CURRENT)
    _fsync_dir(target)


def _wrap(exc: OSError, target: Path, committed: bool) -> CheckpointError:
    state = ("the new checkpoint was committed before the error" if committed
             else "the previous checkpoint is intact")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointDiskFullError(f"disk full while writing the checkpoint in {target}: {exc}; {state}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CheckpointWriteError(f"checkpoint directory {target} is not writable: {exc}; {state}")
    return CheckpointWriteError(f"writing the checkpoint in {target} failed: {exc}; {state}")


@torch.no_grad()
def sync_checkpoint(tensors: Mapping[str, torch.Tensor], target_dir: str | os.PathLike,
                    source_model_dir: str | os.PathLike,
                    extra_files: Mapping[str, bytes | str | os.PathLike] | None = None,
                    block_size: int = BLOCK_SIZE, *, allowed_root: str | os.PathLike | None = None,
                    allow_model_dir: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
                    seed_standby: bool = True,
                    progress: Callable[[int, int], None] | None = None) -> SyncReport:
    """Write `tensors` (HF name -> tensor, e.g. `hf_tensors(model)`) as the next checkpoint generation.

    target_dir: the checkpoint directory (created); load `<target_dir>/current`. It may not be, or be
        inside, `source_model_dir` unless `allow_model_dir` (the served model's files are never modified
        either way), must resolve inside `allowed_root` when given, and if it exists and is not empty it
        must already be a plasticity checkpoint.
    source_model_dir: the served model's directory: config, tokenizer, generation config and chat
        template are copied from it (read before anything is written).
    extra_files: name -> bytes or path, stored in `plasticity_state/` of the same generation (optimizer
        and trainer state), so they change exactly when the weights do.
    block_size: diff granularity in bytes (a power of two, >= 512).
    progress: called as progress(bytes_done, bytes_total) over the weight files, per 8 MiB window.

    Raises CheckpointPathError, CheckpointBusyError, CheckpointDiskFullError, CheckpointWriteError
    (the previous checkpoint intact in every case) and ValueError for tensors safetensors cannot hold.
    """
    t0 = time.perf_counter()
    if block_size < 512 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 512, not {block_size}")
    target = _check_target(target_dir, source_model_dir, allowed_root, allow_model_dir)
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointNonFiniteError(f"the weights hold NaN/Inf in {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
                                       "nothing was written and the previous checkpoint is intact")
    plans = plan_layout(tensors, block_size, max_shard_bytes)
    index = _index_bytes(plans, tensors)
    small, warnings = _read_source_files(source_model_dir)
    extras = _read_extra_files(extra_files or {})

    stats, committed = _Stats(), False
    try:
        target.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(target / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _wrap(exc, target, committed) from exc
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel if we are killed
        except BlockingIOError:
            raise CheckpointBusyError(f"another process is writing the checkpoint in {target}") from None
        live = _read_current(target)
        standby = GENERATIONS[1] if live == GENERATIONS[0] else GENERATIONS[0]
        previous = _read_manifest(target / live) if live else None
        generation = (previous["generation"] + 1) if previous else 1
        manifest = {
            "format": FORMAT, "generation": generation, "created": time.time(), "block_size": block_size,
            "files": {p.name: {"size": p.size, "tensors": len(p.tensors)} for p in plans},
            "state_files": sorted(extras), "source_files": sorted(small),
            "source_model_dir": str(Path(source_model_dir).resolve()),
        }
        _write_generation(target / standby, plans, index, small, extras, manifest, block_size, stats, progress)
        _flip(target, standby)
        committed = True
        if live is None and seed_standby:  # first sync: make the other generation a copy, so the next diffs
            other = target / GENERATIONS[1]
            try:
                (other / STATE_DIR).mkdir(parents=True, exist_ok=True)
                for plan in plans:
                    stats.bytes_written += _copy_file(target / standby / plan.name, other / plan.name)
                for name, data in [(INDEX, index), *small.items()]:
                    _write_small(other / name, data, stats)
                for name, data in extras.items():
                    _write_small(other / STATE_DIR / name, data, stats)
                _fsync_dir(other / STATE_DIR)
                _fsync_dir(other)  # no manifest: never a complete generation until a sync writes one
            except OSError as exc:
                warnings.append(f"could not seed the standby generation {other} ({exc}); "
                                "the next sync writes it in full")
    except OSError as exc:
        raise _wrap(exc, target, committed) from exc
    finally:
        os.close(lock_fd)
    return SyncReport(path=target / CURRENT, generation_dir=target / standby, generation=generation,
                      bytes_written=stats.bytes_written, weight_bytes_written=stats.weight_bytes_written,
                      bytes_read=stats.bytes_read, blocks_changed=stats.blocks_changed,
                      blocks_total=stats.blocks_total, seconds=time.perf_counter() - t0,
                      full_rewrite=stats.full_rewrite, warnings=warnings)


# ---- reading back -------------------------------------------------------------------------------


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The generation directory a checkpoint path stands for (resolve once, then read from it).

    `path` may be the checkpoint directory, its `current` link or a generation directory.
    """
    path = Path(path).expanduser()
    if (path / CURRENT).exists():
        path = path / CURRENT
    gen = path.resolve()
    if _read_manifest(gen) is None:
        raise CheckpointError(f"{path} is not a complete plasticity checkpoint (no {MANIFEST})")
    return gen


def checkpoint_info(path: str | os.PathLike) -> dict:
    """The manifest of the generation `path` stands for (generation number, files, state files)."""
    gen = resolve_checkpoint(path)
    return {**_read_manifest(gen), "generation_dir": str(gen)}


def load_checkpoint_state(path: str | os.PathLike) -> dict[str, bytes]:
    """The extra files (optimizer, trainer state) saved with the weights of the checkpoint at `path`."""
    gen = resolve_checkpoint(path)
    manifest = _read_manifest(gen)
    return {name: (gen / STATE_DIR / name).read_bytes() for name in manifest["state_files"]}
