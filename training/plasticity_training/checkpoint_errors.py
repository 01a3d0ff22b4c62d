"""Why a checkpoint sync was refused or failed: one exception class per reason, so the trainer maps each to
its error kind (trainer_core.checkpoint) without reading messages.

Runs in the trainer process (checkpoint.py and its parts raise these). Unless the message says otherwise
the previous checkpoint is intact.
"""

from __future__ import annotations


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
