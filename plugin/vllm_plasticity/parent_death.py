"""Processes vLLM starts die with the process that started them.

Runs in every vLLM process: `register()` (the general-plugin entry point) calls `die_with_parent()`. A
SIGKILL of the API server alone (not its process group) used to leave the engine core and its workers
running, holding the model's memory and their `/dev/shm` files, with nothing left to stop them. Linux's
parent-death signal ends them instead: the kernel sends SIGKILL to a process when its parent ends, so the
engine core dies with the API server and each worker with the engine core (their `/dev/shm` files are then
removed by the next start with the same state directory: shm_ledger.py).

Which processes: those multiprocessing started (vLLM's engine core and workers). The API server itself is
the main process, left alone: its parent is the user's shell or a supervisor. vLLM starts its processes
with "spawn" on CPU (this plugin's `register()` runs again in each child, so the child sets the signal
itself) and may "fork" on CUDA (`register()` does not run again in a forked child: an at-fork hook,
installed once per process, sets the signal there). The signal follows the *thread* that started the
child: vLLM starts both kinds from its main thread, which lives as long as the process.

    >>> die_with_parent()     # idempotent; nothing off Linux or in a process multiprocessing did not start
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_installed = False
_forking_pid: int | None = None  # the process that is forking (set just before each fork)


def die_with_parent() -> None:
    """Arrange for this process (if multiprocessing started it) and every process it forks to be SIGKILLed
    when its parent ends. Idempotent; does nothing off Linux."""
    global _installed
    if _installed or not sys.platform.startswith("linux"):
        return
    _installed = True
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        set_parent_death_signal(parent.pid)
    os.register_at_fork(before=_note_forking_pid, after_in_child=_in_forked_child)


def set_parent_death_signal(parent_pid: int) -> None:
    """SIGKILL this process when its parent ends; now if `parent_pid` (the process that started it) has
    already ended, since then the signal would never come."""
    ppid = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not allowed here (a sandbox): the process keeps vLLM's own behaviour
    # Reparented already (before or during the call), or never a child of the starter that has now ended.
    # (A live starter that is not the parent, as with multiprocessing's forkserver, is no reason to die.)
    if os.getppid() != ppid or (ppid != parent_pid and not _alive(parent_pid)):
        os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _note_forking_pid() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _in_forked_child() -> None:
    # Only a Python-level fork (multiprocessing's "fork", os.fork) runs this; subprocess's fork+exec does not.
    if _forking_pid is not None:
        set_parent_death_signal(_forking_pid)
