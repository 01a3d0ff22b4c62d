"""Shared-memory files a server's processes hold: recorded at start, removed once that server is gone.

Runs in the API server process (ServerState.start and its exit). vLLM's engine core and workers create
`/dev/shm` files (the `psm_*` broadcast buffers of its message queues, POSIX semaphores `sem.*`, and at
tensor-parallel size > 1 on CPU the all-reduce buffers `vllm_dist_<id>-tp:0-[0-1]-cpushm_<rank>`, which
vLLM never unlinks); a SIGKILL leaves all of them behind, and their names say nothing about who made them.
So when a server is ready it records, in `<state-dir>/shm-<pid>.json`, the `/dev/shm` files its own
process tree has mapped or open (read from /proc) and the tree's pids. Its clean exit removes those files
(`release_own_files`); every start removes the files listed by ledgers whose server is gone (and the
`sem.loky-<pid>-*` semaphores joblib named after one of its dead pids). A file a live process still maps
or holds is never removed, and a ledger stays, listing what is left, until its files are gone: an orphaned
engine core that still holds them (parent_death.py makes that rare) does not make them leak for good.
Files created later than the record (none in vLLM 0.32's steady state) are not covered; the weight arena
has its own sweep (contract.weights.sweep_stale_arenas).

    >>> ledger = record_shm_files(state_dir, os.getpid())   # once the engine is up
    >>> release_own_files(ledger)                           # at this server's clean exit
    >>> sweep_dead_servers(state_dir)                       # at the next start: [removed paths]
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vllm_plasticity.contract.files import write_atomically
from vllm_plasticity.contract.weights import ARENA_PREFIX, SHM_DIR, pid_alive

LEDGER_GLOB = "shm-*.json"
STDLIB_SHM_PREFIX = "psm_"  # multiprocessing.shared_memory's names (vLLM's message-queue buffers use it)
PROC = Path("/proc")


def record_shm_files(state_dir: Path, pid: int) -> Path:
    """Write the ledger of the /dev/shm files that `pid` and its descendants hold; returns its path."""
    tree = process_tree(pid)
    names = sorted(n for n in shm_files_held(tree) if not n.startswith(ARENA_PREFIX))
    path = Path(state_dir) / f"shm-{pid}.json"
    write_atomically(path, json.dumps({"pid": pid, "files": names, "pids": tree}))
    return path


def sweep_dead_servers(state_dir: Path) -> list[Path]:
    """Remove the files listed by ledgers of servers that are no longer running; a ledger goes once none
    of its files is left (one a live process still holds is kept, and its ledger with it)."""
    dead = []
    for ledger in Path(state_dir).glob(LEDGER_GLOB):
        entry = _read(ledger)
        if entry is None:
            ledger.unlink(missing_ok=True)  # unreadable: nothing it names can be trusted
            continue
        if not pid_alive(entry["pid"]):
            # joblib/loky name their semaphores after the creating process: those of the dead tree's pids.
            names = entry["files"] + [p.name for q in entry["pids"] if not pid_alive(q)
                                      for p in SHM_DIR.glob(f"sem.loky-{q}-*")]
            dead.append((ledger, entry, names))
    if not dead:
        return []
    held = shm_files_held(all_pids())  # a name reused by a live process is never removed
    removed = []
    for ledger, entry, names in dead:
        removed += _remove_unheld(ledger, entry, names, held)
    return removed


def release_own_files(ledger: Path) -> list[Path]:
    """At this server's clean exit (vLLM has stopped its engine by then): remove the files its ledger lists
    (vLLM unlinks most of them itself; not the tensor-parallel all-reduce buffers), then the ledger. A file
    a process outside this server's own tree holds is kept, and the ledger with it. Blocks made by Python's
    `multiprocessing.shared_memory` are left to this tree's resource tracker, which unlinks those still
    registered when it ends, after this (removing them first makes it warn about each)."""
    entry = _read(ledger)
    if entry is None:
        ledger.unlink(missing_ok=True)
        return []
    ours = process_tree(os.getpid())
    held = shm_files_held([p for p in all_pids() if p not in set(ours)])
    names = entry["files"]
    if any(map(_is_resource_tracker, ours)):
        names = [n for n in names if not n.startswith(STDLIB_SHM_PREFIX)]
    return _remove_unheld(ledger, entry, names, held)


def _is_resource_tracker(pid: int) -> bool:
    try:
        return b"multiprocessing.resource_tracker" in (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False


def _read(ledger: Path) -> dict | None:
    """{"pid", "files", "pids"} of a ledger; None when it cannot be read or trusted."""
    try:
        entry = json.loads(ledger.read_text())
        return {**entry, "pid": int(entry["pid"]), "files": [str(n) for n in entry["files"]],
                "pids": [int(p) for p in entry.get("pids", [])]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_unheld(ledger: Path, entry: dict, names: list[str], held: set[str]) -> list[Path]:
    """Unlink each of `names` in /dev/shm unless `held`; rewrite the ledger with what is left, or remove it."""
    removed, left = [], []
    for name in dict.fromkeys(names):
        path = SHM_DIR / name
        if "/" in name or name in ("", ".", "..") or not os.path.lexists(path):
            continue
        if name in held:
            left.append(name)
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    if left:
        write_atomically(ledger, json.dumps({**entry, "files": left}))
    else:
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
