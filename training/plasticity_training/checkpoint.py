"""Crash-safe, block-diff checkpoints of the live weights, in Hugging Face layout.

Where it runs: in the trainer process (plasticity_training.trainer), between training steps. It reads the
weights through the HF view (hf_view.build_hf_view: HF names, views of vLLM's live tensors, the fused
`qkv_proj`/`gate_up_proj` already split back into q/k/v and gate/up, vLLM's vocabulary padding already
cut off), so what it writes is a stock Hugging Face checkpoint. Imports torch, never vLLM or safetensors'
writer (the file format is written here, byte for byte, so that the layout is fixed; see below).

This module is the generation protocol (the sync, step by step, and reading a checkpoint back); its parts,
one idea each:
    checkpoint_tensors.py   which tensors a checkpoint holds (hf_tensors)
    checkpoint_paths.py     the names inside a checkpoint, and where a sync may write (path policy)
    checkpoint_changes.py   which tensors changed since each generation this process wrote (ChangeTracker)
    checkpoint_layout.py    the weight files' byte layout;  checkpoint_io.py  the block diff and whole writes
    checkpoint_errors.py    one exception per reason a sync is refused or fails

On-disk layout of a checkpoint directory (by default a directory of its own, not the served model's):

    <checkpoint>/
      current -> gen-b              symlink: THE directory to load. `vllm serve <checkpoint>/current`,
                                    AutoModelForCausalLM.from_pretrained("<checkpoint>/current")
      gen-a/  gen-b/                two generations; `current` names the newer complete one
        model.safetensors           (model-0000k-of-0000n.safetensors above 5 GiB) HF names and shapes
        model.safetensors.index.json      always written: vLLM loads only the files the index lists
        config.json, generation_config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json,
        chat_template.jinja, ...    copied from the served model's directory (small known files only)
        plasticity_state/           the caller's extra files (optimizer.safetensors, trainer_state.json,
                                    plasticity_config.json):
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

import contextlib
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

from plasticity_training.checkpoint_changes import ChangeTracker
from plasticity_training.checkpoint_errors import (  # noqa: F401 (the errors are this module's API too)
    CheckpointBusyError, CheckpointDiskFullError, CheckpointError, CheckpointNonFiniteError, CheckpointOriginError,
    CheckpointPathError, CheckpointSpaceError, CheckpointWriteError)
from plasticity_training.checkpoint_io import (
    TMP_SUFFIX, BufferPool, Stats, copy_file, diff_write, dirty_ranges, fsync_dir, full_write, same_layout, unlink,
    write_small)
from plasticity_training.checkpoint_layout import BLOCK_SIZE, MAX_SHARD_BYTES, FilePlan, index_bytes, plan_layout
from plasticity_training.checkpoint_paths import (  # noqa: F401 (count_checkpoints: this module's API too)
    CURRENT, GENERATIONS, INDEX, LOCK, MANIFEST, STATE_DIR, check_names, check_target, count_checkpoints)
from plasticity_training.checkpoint_tensors import hf_tensors  # noqa: F401 (this module's API too)
from vllm_plasticity.contract.files import replacing

FORMAT = "plasticity.checkpoint/1"
WINDOW_BYTES = 8 << 20  # compare/write granularity: two buffers of this size
# Copied from the served model's directory when present. Weights (*.safetensors, *.bin) never are.
SOURCE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json", "plasticity_spec.json",
)
MAX_SOURCE_FILE_BYTES = 64 << 20


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


@dataclasses.dataclass
class _Files:
    """What one sync writes into a generation, all read before anything is written."""

    plans: list[FilePlan]  # the weight files' layouts (checkpoint_layout)
    index: bytes  # model.safetensors.index.json
    small: dict[str, bytes]  # the served model's config, tokenizer, ... (SOURCE_FILES)
    extras: dict[str, bytes]  # the caller's state files (plasticity_state/)
    warnings: list[str]


# ---- before anything is written -----------------------------------------------------------------


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system of `path`."""
    return shutil.disk_usage(path).free


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


def _write_generation(gen_dir: Path, files: _Files, manifest: dict, block_size: int, stats: Stats, progress,
                      pool: BufferPool, changed: set[str] | None = None) -> None:
    """Make `gen_dir` (not named by `current`) a complete, fsynced checkpoint of the live weights: the
    manifest goes first and comes back last, so until then the generation reads as incomplete."""
    gen_dir.mkdir(exist_ok=True)
    unlink(gen_dir / MANIFEST)
    _remove_leftovers(gen_dir, files)
    _write_weights(gen_dir, files.plans, block_size, stats, progress, pool, changed)
    write_small(gen_dir / INDEX, files.index, stats)
    for name, data in files.small.items():
        write_small(gen_dir / name, data, stats)
    for name, data in files.extras.items():
        write_small(gen_dir / STATE_DIR / name, data, stats)
    fsync_dir(gen_dir / STATE_DIR)
    write_small(gen_dir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode(), stats)
    fsync_dir(gen_dir)


def _remove_leftovers(gen_dir: Path, files: _Files) -> None:
    """What a killed sync, an older layout or dropped source and state files left in the generation."""
    wanted = {p.name for p in files.plans} | {INDEX, MANIFEST} | set(files.small)
    for path in gen_dir.iterdir():
        stale_weight = path.suffix == ".safetensors" and path.name not in wanted
        stale_source = path.name in SOURCE_FILES and path.name not in files.small
        if path.is_file() and (path.name.endswith(TMP_SUFFIX) or stale_weight or stale_source):
            path.unlink()
    (gen_dir / STATE_DIR).mkdir(exist_ok=True)
    for path in (gen_dir / STATE_DIR).iterdir():
        if path.is_file() and path.name not in files.extras:
            path.unlink()


def _write_weights(gen_dir: Path, plans: list[FilePlan], block_size: int, stats: Stats, progress, pool: BufferPool,
                   changed: set[str] | None) -> None:
    """Each weight file: the differing blocks where its layout is unchanged (only the `changed` tensors'
    ranges compared), else the whole file."""
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


def _flip(target: Path, name: str) -> None:
    """Point `current` at generation `name`: a new symlink renamed over the old one (atomic)."""
    with replacing(target / CURRENT) as tmp:
        unlink(tmp)  # a killed flip's link
        os.symlink(name, tmp)
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
    target = check_target(target_dir, source_model_dir, allowed_root, allow_model_dir)
    check_names(target, allowed_root, max_names)
    files = _files_to_write(tensors, source_model_dir, extra_files or {}, block_size, max_shard_bytes)
    stats = Stats()
    with _as_checkpoint_errors(target) as outcome, _writer_lock(target):
        live = _read_current(target)
        standby = GENERATIONS[1] if live == GENERATIONS[0] else GENERATIONS[0]
        seeding = live is None and seed_standby
        manifest = _next_manifest(target, live, files, source_model_dir, origin or model_origin(source_model_dir),
                                  replace, block_size)
        _check_space_or_leave_nothing(target, standby, files, seeding, outcome.created)
        changed = _tensors_to_compare(tensors, changes, target, standby)
        _write_generation(target / standby, files, manifest, block_size, stats, progress, buffers or BufferPool(),
                          changed)
        _flip(target, standby)
        outcome.committed = True
        if changes is not None:
            changes.written(target, standby, manifest["generation"])
        if seeding:  # first sync: make the other generation a copy, so the next syncs are block diffs
            _seed_standby(target / GENERATIONS[1], target / standby, files, stats)
    return SyncReport(path=target / CURRENT, generation_dir=target / standby, generation=manifest["generation"],
                      bytes_written=stats.bytes_written, weight_bytes_written=stats.weight_bytes_written,
                      bytes_read=stats.bytes_read, blocks_changed=stats.blocks_changed,
                      blocks_total=stats.blocks_total, seconds=time.perf_counter() - t0,
                      full_rewrite=stats.full_rewrite, warnings=files.warnings)


# ---- the steps of a sync, in order --------------------------------------------------------------


def _files_to_write(tensors, source_model_dir, extra_files, block_size: int, max_shard_bytes: int) -> _Files:
    plans = plan_layout(tensors, block_size, max_shard_bytes)
    small, warnings = _read_source_files(source_model_dir)
    return _Files(plans, index_bytes(plans, tensors), small, _read_extra_files(extra_files), warnings)


class _Outcome:
    """How far a sync got, for the message of an error: whether it created the checkpoint's directory, and
    whether the new generation was committed (`current` flipped) before the error."""

    def __init__(self, target: Path) -> None:
        self.created, self.committed = not target.exists(), False


@contextlib.contextmanager
def _as_checkpoint_errors(target: Path):
    """An OSError anywhere in the sync becomes the CheckpointError that says what it means for the data."""
    outcome = _Outcome(target)
    try:
        yield outcome
    except OSError as exc:
        raise _wrap(exc, target, outcome.committed) from exc


@contextlib.contextmanager
def _writer_lock(target: Path):
    """The checkpoint's flock (created with the directory): one writer at a time, released by the kernel if
    the writer is killed. Another writer holding it: CheckpointBusyError."""
    target.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(target / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointBusyError(f"another process is writing the checkpoint in {target}") from None
        yield
    finally:
        os.close(lock_fd)


def _next_manifest(target: Path, live: str | None, files: _Files, source_model_dir, origin: str, replace: bool,
                   block_size: int) -> dict:
    """The manifest of the generation this sync writes (the number after the live one's); refuses the
    checkpoint of another model unless `replace`."""
    previous = _read_manifest(target / live) if live else None
    if previous is not None and _origin(previous) != origin and not replace:
        raise CheckpointOriginError(f"the checkpoint {target.name!r} ({target}) holds another model's weights: "
                                    f"they descend from {_named(_origin(previous))}, these from {_named(origin)}; "
                                    "nothing was written and that checkpoint is intact")
    return {
        "format": FORMAT, "generation": (previous["generation"] + 1) if previous else 1, "created": time.time(),
        "block_size": block_size, "files": {p.name: {"size": p.size, "tensors": len(p.tensors)} for p in files.plans},
        "state_files": sorted(files.extras), "source_files": sorted(files.small),
        "source_model_dir": str(Path(source_model_dir).resolve()), "origin": origin,
    }


def _check_space_or_leave_nothing(target: Path, standby: str, files: _Files, seeding: bool, created: bool) -> None:
    try:
        _check_space(target, target / standby, files.plans, {**files.small, **files.extras}, seeding)
    except CheckpointSpaceError:
        if created:  # leave no empty name behind (it would count against max_names)
            unlink(target / LOCK)
            target.rmdir()
        raise


def _tensors_to_compare(tensors: Mapping[str, torch.Tensor], changes: ChangeTracker | None, target: Path,
                        standby: str) -> set[str] | None:
    """The tensors that may differ from the standby generation (None: all of them), after checking that
    each is finite: never a wreck on disk. Tensors left out were checked when they were written; reading
    400 MB to check them again cost more than the sync."""
    changed = None
    if changes is not None:
        manifest = _read_manifest(target / standby)
        changed = changes.since(target, standby, manifest.get("generation") if manifest else None)
    bad = [name for name, t in tensors.items() if (changed is None or name in changed)
           and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointNonFiniteError(f"the weights hold NaN/Inf in {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
                                       "nothing was written and the previous checkpoint is intact")
    if changes is not None:
        changes.forget(target, standby)  # until the flip: a failure leaves it unknown, compared in full
    return changed


def _seed_standby(other: Path, written: Path, files: _Files, stats: Stats) -> None:
    """Make `other` a copy of the generation just `written` (kernel-side), without a manifest: never a
    complete generation until a sync writes one, but its weight files match, so the next sync is a diff.
    A failure is a warning: the next sync then writes it in full."""
    try:
        (other / STATE_DIR).mkdir(parents=True, exist_ok=True)
        for plan in files.plans:
            stats.bytes_written += copy_file(written / plan.name, other / plan.name)
        for name, data in [(INDEX, files.index), *files.small.items()]:
            write_small(other / name, data, stats)
        for name, data in files.extras.items():
            write_small(other / STATE_DIR / name, data, stats)
        fsync_dir(other / STATE_DIR)
        fsync_dir(other)
    except OSError as exc:
        files.warnings.append(f"could not seed the standby generation {other} ({exc}); the next sync writes it in full")


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
