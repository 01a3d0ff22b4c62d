"""Where the trainer's state lives in the state directory: one subdirectory per served model, the weight
version's high-water mark beside them, and nothing left over from a write a crash interrupted.

Runs in the trainer process (trainer_core.TrainerCore opens it at start).

    <state-dir>/
      weight_version.json           {"high_water": N}: no version above N was ever handed out
      models/<name>-<hash>/         one served model's trainer_state.json, optimizer.safetensors,
                                    restored_from.json (name: the model directory's; hash: of its path)

Why per model: optimizer state is keyed by parameter name, so another model's state (same names, other
shapes) would load into the wrong tensors; a server started on another model with the same state
directory gets a directory of its own and leaves the first model's state as it was.

Why a high-water mark outside the model directories: a restart restores weights from disk (the model, or
a checkpoint with the state saved beside it), which may be older than the last version a crashed server
reached. The mark is written ahead of the versions it covers (VERSION_RESERVE at a time, so not on every
step) and settled to the exact version whenever state is saved; a trainer that finds a mark above its
restored version starts just above the mark, so the version never counts backwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

from vllm_plasticity.contract.files import TMP_SUFFIX, write_atomically

# The state files of one model (written with contract.files, whose temporaries end in TMP_SUFFIX).
STATE_FILES = ("trainer_state.json", "optimizer.safetensors", "restored_from.json")
VERSION_FILE = "weight_version.json"
MODELS = "models"
VERSION_RESERVE = 64  # versions covered by one write of the mark


def model_key(model_path: str | os.PathLike) -> str:
    """A directory name for the model served from `model_path`: readable, and unique per path. The path is
    made absolute but symlinks are kept, so `<checkpoint>/current` keeps one key across generations."""
    path = os.path.abspath(os.path.expanduser(os.fspath(model_path)))
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(path.rstrip("/")) or "model")[:64]
    return f"{name}-{hashlib.sha256(path.encode()).hexdigest()[:12]}"


def remove_interrupted_writes(directory: Path) -> list[Path]:
    """Remove the temporary files a killed atomic write of our own state files left in `directory`
    (`optimizer.safetensors.tmp`, ...). Only those exact names: nothing else in the directory is ours."""
    removed = []
    for name in (*STATE_FILES, VERSION_FILE):
        tmp = directory / (name + TMP_SUFFIX)
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink()
            removed.append(tmp)
    return removed


def open_model_state(root: Path, model_path: str | os.PathLike, fits: Callable[[Path], bool]) -> Path:
    """The state directory of the model at `model_path` (created), with interrupted writes removed.

    State written before it was kept per model (the files directly in `root`) is moved into this model's
    directory when its optimizer state `fits` this model, and left where it is otherwise."""
    root.mkdir(parents=True, exist_ok=True)
    remove_interrupted_writes(root)
    own = root / MODELS / model_key(model_path)
    if not own.is_dir():
        own.mkdir(parents=True)
        _adopt_unkeyed_state(root, own, fits)
    remove_interrupted_writes(own)
    return own


def _adopt_unkeyed_state(root: Path, own: Path, fits: Callable[[Path], bool]) -> None:
    legacy = [root / name for name in STATE_FILES if (root / name).is_file()]
    if not legacy:
        return
    optimizer = root / "optimizer.safetensors"
    if optimizer.exists() and not fits(optimizer):
        print(f"[trainer] {root} holds training state of another model (its optimizer state does not fit this "
              "one); left in place, this model starts its own in " f"{own}", file=sys.stderr, flush=True)
        return
    for path in legacy:
        os.replace(path, own / path.name)
        before = path.with_name(path.name + ".before-restore")
        if before.exists():
            os.replace(before, own / before.name)


class VersionMark:
    """The weight version's high-water mark for one state directory (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.path = root / VERSION_FILE
        try:
            self.high_water = int(json.loads(self.path.read_text())["high_water"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            self.high_water = 0

    def starting_version(self, restored: int) -> int:
        """The version to serve at start: the restored one, or just above the mark when some version above
        it was handed out before (the restored weights are not the weights that version named)."""
        return restored if restored >= self.high_water else self.high_water + 1

    def reach(self, version: int) -> None:
        """Called before `version` is reported anywhere: extends the mark ahead when it would pass it."""
        if version > self.high_water:
            self._write(version + VERSION_RESERVE)

    def settle(self, version: int) -> None:
        """Called when state is saved: nothing above `version` was handed out, so the mark can be exact."""
        if version != self.high_water:
            self._write(version)

    def _write(self, value: int) -> None:
        write_atomically(self.path, json.dumps({"high_water": value}))
        self.high_water = value
