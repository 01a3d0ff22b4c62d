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
        plasticity_checkpoint.json  generation number, layout, state files, origin (written last)
      .lock                         flock held by the one writer

Whose checkpoint: the manifest records the weights' origin, the model directory they descend from (a
checkpoint served and trained on passes its own origin on). A sync into a checkpoint whose origin is
another is refused (CheckpointOriginError, nothing written) unless the caller passes replace=True: two
models sharing one checkpoint name never overwrite each other's work unasked, while a server resuming
from `<checkpoint>/current` writes back into `<checkpoint>`.

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

import dataclasses
import errno
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from plasticity_training.checkpoint_io import (
    TMP_SUFFIX, BufferPool, Stats, copy_file, diff_write, dirty_ranges, fsync_dir, full_write, same_layout, unlink,
    write_small)
from plasticity_training.checkpoint_layout import BLOCK_SIZE, MAX_SHARD_BYTES, FilePlan, index_bytes, plan_layout
from vllm_plasticity.contract.files import is_inside

FORMAT = "plasticity.checkpoint/1"
WINDOW_BYTES = 8 << 20  # compare/write granularity: two buffers of this size
CURRENT = "current"
GENERATIONS = ("gen-a", "gen-b")
STATE_DIR = "plasticity_state"
MANIFEST = "plasticity_checkpoint.json"
INDEX = "model.safetensors.index.json"
LOCK = ".lock"
# Copied from the served model's directory when present. Weights (*.safetensors, *.bin) never are.
SOURCE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json", "plasticity_spec.json",
)
MAX_SOURCE_FILE_BYTES = 64 << 20

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


class CheckpointOriginError(CheckpointError):
    """The target is the checkpoint of another model (its recorded origin differs) and replace was not asked."""


class CheckpointBusyError(CheckpointError):
    """Another process holds the checkpoint's lock (a sync is running)."""


class CheckpointSpaceError(CheckpointError):
    """Refused before writing anything: the disk has less free space than the files this sync writes whole,
    or a new checkpoint name would pass the limit on names (`max_names`)."""


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


class ChangeTracker:
    """Which tensors may differ from each generation this process wrote: a sync then reads and compares
    only those (and the header) instead of the whole standby file.

    The trainer calls `stepped(names)` after every optimizer step. A generation counts as known only while
    its manifest still carries the generation number this process wrote; a generation written by anyone
    else, torn by a crash, or never written here is compared in full. Writes to the weights by anything
    but the trainer are outside this contract (only the trainer writes them).
    """

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], tuple[int, set[str]]] = {}  # (target, generation dir) -> (number, changed)

    def stepped(self, names) -> None:
        names = set(names)  # once: every known generation gets the same names (a generator would be spent)
        for _, changed in self._known.values():
            changed.update(names)

    def since(self, target: Path, gen: str) -> set[str] | None:
        entry = self._known.get((str(target), gen))
        manifest = _read_manifest(target / gen)
        if entry is None or manifest is None or manifest.get("generation") != entry[0]:
            return None
        return set(entry[1])

    def forget(self, target: Path, gen: str) -> None:
        self._known.pop((str(target), gen), None)

    def written(self, target: Path, gen: str, number: int) -> None:
        self._known[(str(target), gen)] = (number, set())


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
        if not is_inside(target, root, allow_root=True):
            raise CheckpointPathError(f"checkpoint directory {target} is outside the allowed root {root}")
    for parent in target.parents:  # never a checkpoint inside another's generation (or the other itself)
        if _is_checkpoint(parent):
            raise CheckpointPathError(f"checkpoint directory {target} is inside the checkpoint {parent}; "
                                      "give a name of its own")
    source = Path(source_model_dir).expanduser().resolve()
    if is_inside(target, source, allow_root=True) and not allow_model_dir:
        raise CheckpointPathError(
            f"checkpoint directory {target} is inside the served model's directory {source}; "
            "write checkpoints to a directory of their own, or pass allow_model_dir=True")
    if target.is_dir() and not allow_model_dir:
        entries = {p.name for p in target.iterdir()}
        if entries and not _is_ours(entries):
            raise CheckpointPathError(f"{target} is a non-empty directory that is not a plasticity checkpoint "
                                      f"(no {CURRENT!r}, {GENERATIONS[0]!r} or {GENERATIONS[1]!r})")
    return target


def _is_ours(entries: set[str]) -> bool:
    """Whether a directory with these entries was made by sync_checkpoint (complete or not)."""
    return bool(entries & {CURRENT, LOCK, *GENERATIONS})


def count_checkpoints(root: str | os.PathLike) -> int:
    """The checkpoint names under `root`: directories sync_checkpoint made (not looking inside them)."""
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath != os.fspath(root) and _is_ours(set(dirnames) | set(filenames)):
            count += 1
            dirnames.clear()
        else:
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return count


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system of `path`."""
    return shutil.disk_usage(path).free


def _check_names(target: Path, allowed_root, max_names: int | None) -> None:
    if max_names is None or target.is_dir() and _is_ours({p.name for p in target.iterdir()}):
        return  # no limit, or a name that exists: writing it again adds nothing
    root = Path(allowed_root).expanduser().resolve() if allowed_root is not None else target.parent
    existing = count_checkpoints(root) if root.is_dir() else 0
    if existing >= max_names:
        raise CheckpointSpaceError(f"{root} already holds {existing} checkpoint names, the limit is {max_names} "
                                   "(PLASTICITY_CHECKPOINT_MAX_NAMES); write to an existing name or delete one")


def _check_space(target: Path, standby: Path, plans: list[FilePlan], small: dict[str, bytes], seeding: bool) -> None:
    """Refuse, with the figures, a sync whose whole-file writes need more than the free space (a diff write
    rewrites blocks in place and needs none; the first sync also copies its files to seed the standby)."""
    whole = sum(p.size for p in plans if not same_layout(standby / p.name, p))
    needed = whole * (2 if seeding else 1) + sum(map(len, small.values()))
    free = free_bytes(target)
    if needed > free:
        raise CheckpointSpaceError(f"the checkpoint in {target} needs {needed} bytes ({needed / 2**20:.1f} MiB) of new "
                                   f"files and the disk has {free} bytes ({free / 2**20:.1f} MiB) free; nothing was "
                                   "written and the previous checkpoint is intact")


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


# ---- the sync -----------------------------------------------------------------------------------


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
                      extras: dict[str, bytes], manifest: dict, block_size: int, stats: Stats, progress,
                      pool: BufferPool, changed: set[str] | None = None) -> None:
    """Make `gen_dir` (not named by `current`) a complete, fsynced checkpoint of the live weights."""
    gen_dir.mkdir(exist_ok=True)
    state_dir = gen_dir / STATE_DIR
    # From here until the manifest is rewritten this generation is incomplete; `current` does not name it.
    unlink(gen_dir / MANIFEST)
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
    bufs = pool.take(window)
    total, done = sum(p.size for p in plans), 0
    try:
        for plan in plans:
            path = gen_dir / plan.name
            report = None if progress is None else (lambda pos, base=done: progress(base + pos, total))
            if same_layout(path, plan):
                diff_write(path, plan, bufs, block_size, stats, report, dirty_ranges(plan, changed, block_size))
            else:
                full_write(path, plan, bufs, block_size, stats, report)
            done += plan.size
    finally:
        pool.give_back(bufs)
    write_small(gen_dir / INDEX, index, stats)
    for name, data in small.items():
        write_small(gen_dir / name, data, stats)
    for name, data in extras.items():
        write_small(state_dir / name, data, stats)
    fsync_dir(state_dir)
    write_small(gen_dir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode(), stats)
    fsync_dir(gen_dir)


def _flip(target: Path, name: str) -> None:
    """Point `current` at generation `name`: a new symlink renamed over the old one (atomic)."""
    tmp = target / (CURRENT + TMP_SUFFIX)
    unlink(tmp)
    os.symlink(name, tmp)
    os.replace(tmp, target / CURRENT)
    fsync_dir(target)


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
                    progress: Callable[[int, int], None] | None = None,
                    buffers: BufferPool | None = None, changes: ChangeTracker | None = None,
                    max_names: int | None = None, origin: str | None = None, replace: bool = False) -> SyncReport:
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
    buffers: a BufferPool kept by a caller that syncs repeatedly (its window buffers are reused).
    changes: the caller's ChangeTracker: only tensors it reports as stepped since the standby generation
        was written are compared (a one-layer change reads about that layer, not the model).
    max_names: how many checkpoints `allowed_root` may hold; a new name beyond that is refused.
    origin: the model directory the weights descend from (default: `model_origin(source_model_dir)`; a
        caller that serves one model for a long time passes the origin it read at start). Recorded in
        the manifest; a target whose recorded origin differs is refused unless `replace`.
    replace: overwrite the checkpoint of another model (its `current` then names these weights).

    Raises CheckpointPathError, CheckpointOriginError, CheckpointBusyError, CheckpointSpaceError (a new
    name past `max_names`, or less free disk than the whole files to write), CheckpointDiskFullError,
    CheckpointWriteError (the previous checkpoint intact in every case) and ValueError for tensors
    safetensors cannot hold.
    """
    t0 = time.perf_counter()
    if block_size < 512 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 512, not {block_size}")
    target = _check_target(target_dir, source_model_dir, allowed_root, allow_model_dir)
    _check_names(target, allowed_root, max_names)
    plans = plan_layout(tensors, block_size, max_shard_bytes)
    index = index_bytes(plans, tensors)
    small, warnings = _read_source_files(source_model_dir)
    extras = _read_extra_files(extra_files or {})

    stats, committed = Stats(), False
    created = not target.exists()
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
        origin = origin or model_origin(source_model_dir)
        if previous is not None and _origin(previous) != origin and not replace:
            raise CheckpointOriginError(f"the checkpoint {target.name!r} ({target}) holds another model's weights: "
                                        f"they descend from {_named(_origin(previous))}, these from {_named(origin)}; "
                                        "nothing was written and that checkpoint is intact")
        generation = (previous["generation"] + 1) if previous else 1
        manifest = {
            "format": FORMAT, "generation": generation, "created": time.time(), "block_size": block_size,
            "files": {p.name: {"size": p.size, "tensors": len(p.tensors)} for p in plans},
            "state_files": sorted(extras), "source_files": sorted(small),
            "source_model_dir": str(Path(source_model_dir).resolve()), "origin": origin,
        }
        try:
            _check_space(target, target / standby, plans, {**small, **extras}, live is None and seed_standby)
        except CheckpointSpaceError:
            if created:  # leave no empty name behind (it would count against max_names)
                unlink(target / LOCK)
                target.rmdir()
            raise
        changed = changes.since(target, standby) if changes is not None else None
        # Never a wreck on disk: every tensor this sync may write is finite (those it will not touch were
        # checked when they were written; reading 400 MB to check them again cost more than the sync).
        bad = [name for name, t in tensors.items() if (changed is None or name in changed)
               and t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise CheckpointNonFiniteError(f"the weights hold NaN/Inf in {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
                                           "nothing was written and the previous checkpoint is intact")
        if changes is not None:
            changes.forget(target, standby)  # until the flip: a failure leaves it unknown, compared in full
        _write_generation(target / standby, plans, index, small, extras, manifest, block_size, stats, progress,
                          buffers or BufferPool(), changed)
        _flip(target, standby)
        committed = True
        if changes is not None:
            changes.written(target, standby, generation)
        if live is None and seed_standby:  # first sync: make the other generation a copy, so the next diffs
            other = target / GENERATIONS[1]
            try:
                (other / STATE_DIR).mkdir(parents=True, exist_ok=True)
                for plan in plans:
                    stats.bytes_written += copy_file(target / standby / plan.name, other / plan.name)
                for name, data in [(INDEX, index), *small.items()]:
                    write_small(other / name, data, stats)
                for name, data in extras.items():
                    write_small(other / STATE_DIR / name, data, stats)
                fsync_dir(other / STATE_DIR)
                fsync_dir(other)  # no manifest: never a complete generation until a sync writes one
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


def model_origin(model_dir: str | os.PathLike) -> str:
    """The model directory the weights served from `model_dir` descend from: a checkpoint's recorded origin,
    any other directory itself (resolved, so two paths to one directory are one origin)."""
    try:
        return _origin(_read_manifest(resolve_checkpoint(model_dir)))
    except CheckpointError:
        return str(Path(model_dir).expanduser().resolve())


def _named(origin: str) -> str:
    # The name first: servers strip absolute paths from the messages clients see.
    return f"{Path(origin).name!r} ({origin})" if os.path.isabs(origin) else origin


def _origin(manifest: dict) -> str:
    # Checkpoints written before origins were recorded: the directory their weights were read beside.
    return manifest.get("origin") or manifest.get("source_model_dir") or "an unrecorded model"


def checkpoint_info(path: str | os.PathLike) -> dict:
    """The manifest of the generation `path` stands for (generation number, files, state files)."""
    gen = resolve_checkpoint(path)
    return {**_read_manifest(gen), "generation_dir": str(gen)}


def load_checkpoint_state(path: str | os.PathLike) -> dict[str, bytes]:
    """The extra files (optimizer, trainer state) saved with the weights of the checkpoint at `path`."""
    gen = resolve_checkpoint(path)
    manifest = _read_manifest(gen)
    return {name: (gen / STATE_DIR / name).read_bytes() for name in manifest["state_files"]}
