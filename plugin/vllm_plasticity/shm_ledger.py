"""Shared-memory files a server's processes hold: recorded at start, removed once that server is dead.

Runs in the API server process (ServerState.start). vLLM's engine core and workers create `/dev/shm`
files (the `psm_*` broadcast buffers of its message queues, POSIX semaphores `sem.*`) and unlink them on a
clean exit; a SIGKILL of the server leaves them behind, and their names say nothing about who made them.
So when a server is ready it records, in `<state-dir>/shm-<pid>.json`, the `/dev/shm` files its own
process tree has mapped or open (read from /proc) and the tree's pids, and at every start it removes the
files listed by ledgers whose server is gone (and the `sem.loky-<pid>-*` semaphores joblib named after
one of its dead pids), unless a live process still maps or holds them. Files created later than
the record (none in vLLM 0.32's steady state) are not covered; the weight arena has its own sweep
(contract.weights.sweep_stale_arenas).

    >>> record_shm_files(state_dir, os.getpid())     # once the engine is up
    >>> sweep_dead_servers(state_dir)                # at the next start: [removed paths]
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vllm_plasticity.contract.files import write_atomically
from vllm_plasticity.contract.weights import ARENA_PREFIX, SHM_DIR, pid_alive

LEDGER_GLOB = "shm-*.json"
PROC = Path("/proc")


def record_shm_files(state_dir: Path, pid: int) -> Path:
    """Write the ledger of the /dev/shm files that `pid` and its descendants hold; returns its path."""
    tree = process_tree(pid)
    names = sorted(n for n in shm_files_held(tree) if not n.startswith(ARENA_PREFIX))
    path = Path(state_dir) / f"shm-{pid}.json"
    write_atomically(path, json.dumps({"pid": pid, "files": names, "pids": tree}))
    return path


def sweep_dead_servers(state_dir: Path) -> list[Path]:
    """Remove the files listed by ledgers of servers that are no longer running (and those ledgers)."""
    dead = []
    for ledger in Path(state_dir).glob(LEDGER_GLOB):
        try:
            entry = json.loads(ledger.read_text())
            pid, names = int(entry["pid"]), [str(n) for n in entry["files"]]
            pids = [int(p) for p in entry.get("pids", [])]
        except (OSError, ValueError, KeyError, TypeError):
            ledger.unlink(missing_ok=True)  # unreadable: nothing it names can be trusted
            continue
        if not pid_alive(pid):
            # joblib/loky name their semaphores after the creating process: those of the dead tree's pids.
            names += [p.name for q in pids if not pid_alive(q) for p in SHM_DIR.glob(f"sem.loky-{q}-*")]
            dead.append((ledger, names))
    if not dead:
        return []
    held = shm_files_held(all_pids())  # a name reused by a live process is never removed
    removed = []
    for ledger, names in dead:
        for name in names:
            path = SHM_DIR / name
            if "/" not in name and name not in held and path.exists():
                path.unlink(missing_ok=True)
                removed.append(path)
        ledger.unlink(missing_ok=True)
    return removed


def all_pids() -> list[int]:
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]


def process_tree(root: int) -> list[int]:
    """`root` and every live descendant, from /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        try:
            stat = (PROC / str(pid) / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4; the command name may hold spaces
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def shm_files_held(pids: list[int]) -> set[str]:
    """Names of /dev/shm files that any of `pids` maps or has open."""
    prefix = str(SHM_DIR) + "/"
    names = set()
    for pid in pids:
        try:
            with open(PROC / str(pid) / "maps") as f:
                for line in f:  # address perms offset dev inode [pathname]
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].startswith(prefix):
                        names.add(fields[5].strip()[len(prefix):].removesuffix(" (deleted)"))
            fds = list((PROC / str(pid) / "fd").iterdir())
        except OSError:  # the process ended while we looked
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(prefix):
                names.add(target[len(prefix):].removesuffix(" (deleted)"))
    return names
