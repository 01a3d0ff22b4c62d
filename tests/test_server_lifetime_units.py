"""A server's processes and its /dev/shm files end with it, without a server: processes multiprocessing
starts die with their parent (parent_death.py; vLLM's engine core and workers), and a clean exit removes the
files its ledger lists, vLLM's tensor-parallel all-reduce buffers included (shm_ledger.release_own_files)."""

from __future__ import annotations

import getpass
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from multiprocessing import resource_tracker
from pathlib import Path

import pytest

from vllm_plasticity.contract.weights import SHM_DIR

# A stand-in for the API server: it starts one child the way vLLM does (spawn on CPU, fork on CUDA), in
# which register() has run (spawn: it runs again in the child; fork: it ran in the parent only).
# `register` names what runs: the plugin's entry point itself (imports vLLM: ~15 s here) or the part of it
# that matters here.
STARTER = textwrap.dedent("""
    import multiprocessing, os, sys, time

    def register(how):
        if how == "register":
            import vllm_plasticity
            vllm_plasticity.register()
        else:
            from vllm_plasticity.parent_death import die_with_parent
            die_with_parent()

    def engine(method, how):
        if method == "spawn":
            register(how)
        print("child", os.getpid(), flush=True)
        time.sleep(300)

    if __name__ == "__main__":
        method, how = sys.argv[1:]
        if method == "fork":  # the main process: only installs what its forked children need
            register(how)
        child = multiprocessing.get_context(method).Process(target=engine, args=(method, how))
        child.start()
        time.sleep(300)
""")


def running(pid: int) -> bool:
    """Alive and not a zombie (a reaped-late child counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("method,how", [("spawn", "die_with_parent"), ("fork", "die_with_parent"), ("spawn", "register")])
def test_a_child_dies_when_its_starter_is_sigkilled(tmp_path, method, how):
    script = tmp_path / "starter.py"
    script.write_text(STARTER)
    starter = subprocess.Popen([sys.executable, str(script), method, how], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        line = starter.stdout.readline()
        assert line.startswith("child "), line
        child = int(line.split()[1])
        assert running(child)
        starter.send_signal(signal.SIGKILL)  # the starter's own PID only, as `kill -9 <server pid>`
        starter.wait()
        assert wait_gone(child), f"the {method} child outlived its starter"
    finally:
        starter.kill()
        starter.wait()
        if child is not None and running(child):
            os.kill(child, signal.SIGKILL)


def test_the_main_process_does_not_die_with_its_own_parent():
    # The API server is the main process: its parent is the user's shell, which may end first (nohup).
    code = ("import ctypes, multiprocessing; from vllm_plasticity.parent_death import die_with_parent; "
            "die_with_parent(); v = ctypes.c_int(-1); "
            "ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); print(v.value)")  # PR_GET_PDEATHSIG
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def test_a_clean_exit_removes_the_files_its_ledger_lists_unless_another_process_holds_them(tmp_path):
    from vllm_plasticity.shm_ledger import record_shm_files, release_own_files

    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    # What a TP=2 CPU server leaves on every stop: vLLM maps these in its workers and never unlinks them.
    tp = [SHM_DIR / f"vllm_dist_{tag}-tp:0-[0-1]-cpushm_{r}" for r in (0, 1)]
    outside = SHM_DIR / f"test_outside_{tag}"
    # A multiprocessing.shared_memory block: this tree's resource tracker unlinks it when it ends, later.
    tracked = SHM_DIR / f"psm_test_tracked_{tag}"
    resource_tracker.ensure_running()
    for path in (*tp, outside, tracked):
        path.write_bytes(b"\0" * 4096)
    # A worker of this server (a child) maps the TP buffers; an unrelated process (not in this tree) the other.
    hold = "import mmap, sys, time; fs = [open(p, 'r+b') for p in sys.argv[1:]]; " \
           "ms = [mmap.mmap(f.fileno(), 0) for f in fs]; print('held', flush=True); time.sleep(120)"
    worker = subprocess.Popen([sys.executable, "-c", hold, *map(str, tp)], stdout=subprocess.PIPE, text=True)
    detach = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]], "
              "stdout=subprocess.PIPE, text=True); print(p.pid, flush=True); print(p.stdout.readline(), end='', flush=True)")
    middle = subprocess.Popen([sys.executable, "-c", detach, hold, str(outside)], stdout=subprocess.PIPE, text=True)
    stranger = int(middle.stdout.readline())
    try:
        assert worker.stdout.readline().strip() == "held" and middle.stdout.readline().strip() == "held"
        middle.wait()  # `stranger` is now an orphan: not in this process's tree
        recorded = record_shm_files(tmp_path, worker.pid)  # what a server records of its worker at start
        assert json.loads(recorded.read_text())["files"] == sorted(p.name for p in tp)
        # This process's ledger (only this test's files: a server this session runs holds others), naming
        # the stranger's file too, as if this server had held it at start.
        ledger = tmp_path / f"shm-{os.getpid()}.json"
        ledger.write_text(json.dumps({"pid": os.getpid(), "files": [p.name for p in (*tp, outside, tracked)],
                                      "pids": [os.getpid(), worker.pid]}))
        removed = release_own_files(ledger)
        assert removed == tp and not any(p.exists() for p in tp)
        assert outside.exists() and json.loads(ledger.read_text())["files"] == [outside.name]
        assert tracked.exists()  # left to the resource tracker, not listed again
    finally:
        worker.kill()
        worker.wait()
        if running(stranger):
            os.kill(stranger, signal.SIGKILL)
        for path in (*tp, outside, tracked):
            path.unlink(missing_ok=True)


def test_a_stopped_server_leaves_nothing_in_the_temp_directory(tmp_path):
    """vLLM leaves a ZMQ socket per process pair and a `vllm_dist_*` file in its temp directory at every start
    (over 800 in /tmp after one full test run before this): a ServerProcess's server gets a directory of its
    own, removed at its stop, while torch.compile's kernel cache stays in the outer temp directory."""
    from vllm_plasticity.launcher import ServerProcess

    # Stands in for `vllm serve`: leaves a socket and a file where vLLM leaves them, and reports where they went.
    leave = ("import os, socket, sys, tempfile, time; d = tempfile.gettempdir(); "
             "s = socket.socket(socket.AF_UNIX); s.bind(os.path.join(d, 'e.sock')); "
             "open(os.path.join(d, 'vllm_dist_x'), 'w').close(); "
             "print(d, os.environ['TORCHINDUCTOR_CACHE_DIR'], flush=True); time.sleep(300)")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}  # unset: its default place
    server = ServerProcess([sys.executable, "-c", leave], 0, {**env, "TMPDIR": str(tmp_path)},
                           log_path=tmp_path / "server.log")
    try:
        deadline = time.monotonic() + 30
        while not server.log_tail() and time.monotonic() < deadline:
            time.sleep(0.1)
        used, inductor = server.log_tail().split()
        assert Path(used).parent == tmp_path and sorted(os.listdir(used)) == ["e.sock", "vllm_dist_x"]
        assert inductor == str(tmp_path / f"torchinductor_{getpass.getuser()}")
    finally:
        server.stop(grace=5)
    assert sorted(os.listdir(tmp_path)) == ["server.log"]


def test_a_server_that_exits_before_it_is_ready_leaves_no_temp_directory(tmp_path):
    from vllm_plasticity.launcher import ServerError, ServerProcess

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    server = ServerProcess([sys.executable, "-c", "raise SystemExit(3)"], 0, {**env, "TMPDIR": str(tmp_path)},
                           log_path=tmp_path / "server.log")
    with pytest.raises(ServerError, match="exited with code 3"):
        server.wait_ready(timeout=60)
    assert sorted(os.listdir(tmp_path)) == ["server.log"]
