"""Where a checkpoint may be written: the names inside a checkpoint directory, and the rules a target
directory must pass before a sync writes anything (inside the allowed root, not the served model's own
directory, not inside another checkpoint, a name the file system takes, the limit on checkpoint names).

Runs in the trainer process (checkpoint.sync_checkpoint checks every target here); the API server checks
only that a request's path stays inside the checkpoint directory (training_service.checkpoint_target).

    >>> target = check_target("/data/ckpt/main", model_dir, allowed_root="/data/ckpt", allow_model_dir=False)
    >>> check_names(target, "/data/ckpt", max_names=16)
"""

from __future__ import annotations

import os
from pathlib import Path

from plasticity_training.checkpoint_errors import CheckpointPathError, CheckpointSpaceError
from vllm_plasticity.contract.files import is_inside

# The names inside a checkpoint directory (checkpoint.py describes the layout).
CURRENT = "current"  # symlink to the generation to load
GENERATIONS = ("gen-a", "gen-b")
STATE_DIR = "plasticity_state"  # in a generation: the caller's extra files
MANIFEST = "plasticity_checkpoint.json"  # in a generation, written last
INDEX = "model.safetensors.index.json"
LOCK = ".lock"  # flock held by the one writer
NAME_MAX, PATH_MAX = 255, 4095  # bytes, Linux


def check_target(target_dir, source_model_dir, allowed_root, allow_model_dir: bool) -> Path:
    """The resolved checkpoint directory `target_dir` names, or CheckpointPathError saying which rule it
    breaks."""
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
        if is_checkpoint(parent):
            raise CheckpointPathError(f"checkpoint directory {target} is inside the checkpoint {parent}; "
                                      "give a name of its own")
    source = Path(source_model_dir).expanduser().resolve()
    if is_inside(target, source, allow_root=True) and not allow_model_dir:
        raise CheckpointPathError(
            f"checkpoint directory {target} is inside the served model's directory {source}; "
            "write checkpoints to a directory of their own, or pass allow_model_dir=True")
    if target.is_dir() and not allow_model_dir:
        entries = {p.name for p in target.iterdir()}
        if entries and not is_ours(entries):
            raise CheckpointPathError(f"{target} is a non-empty directory that is not a plasticity checkpoint "
                                      f"(no {CURRENT!r}, {GENERATIONS[0]!r} or {GENERATIONS[1]!r})")
    return target


def check_names(target: Path, allowed_root, max_names: int | None) -> None:
    """CheckpointSpaceError when `target` is a new name and `allowed_root` already holds `max_names`."""
    if max_names is None or target.is_dir() and is_ours({p.name for p in target.iterdir()}):
        return  # no limit, or a name that exists: writing it again adds nothing
    root = Path(allowed_root).expanduser().resolve() if allowed_root is not None else target.parent
    existing = count_checkpoints(root) if root.is_dir() else 0
    if existing >= max_names:
        raise CheckpointSpaceError(f"{root} already holds {existing} checkpoint names, the limit is {max_names} "
                                   "(PLASTICITY_CHECKPOINT_MAX_NAMES); write to an existing name or delete one")


def count_checkpoints(root: str | os.PathLike) -> int:
    """The checkpoint names under `root`: directories sync_checkpoint made (not looking inside them)."""
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath != os.fspath(root) and is_ours(set(dirnames) | set(filenames)):
            count += 1
            dirnames.clear()
        else:
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return count


def is_ours(entries: set[str]) -> bool:
    """Whether a directory with these entries was made by sync_checkpoint (complete or not)."""
    return bool(entries & {CURRENT, LOCK, *GENERATIONS})


def is_checkpoint(path: Path) -> bool:
    """A checkpoint directory (a `current` link beside a generation) or one of its generations."""
    return ((path / CURRENT).is_symlink() and any((path / g).is_dir() for g in GENERATIONS)) or (path / MANIFEST).exists()
