"""A server SIGKILLed by its own PID (not its process group) takes its engine core and workers along
(parent_death.py), and the next server started with the same state directory removes the /dev/shm files
the dead one recorded (shm_ledger.py), the tensor-parallel all-reduce buffers included; a server stopped
cleanly leaves none of them (shm_ledger.release_own_files)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.conftest import SERVER_ARGS
from tests.test_server_lifetime_units import running
from vllm_plasticity.launcher import ServerProcess
from vllm_plasticity.contract.weights import SHM_DIR

pytestmark = [pytest.mark.server, pytest.mark.slow]

VLLM_SHM = ("psm_", "sem.", "vllm_dist_")  # vLLM's message queues, semaphores, TP all-reduce buffers
TP2 = dict(extra_args=[*SERVER_ARGS, "--tensor-parallel-size", "2"],
           env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})  # one core per rank (one NUMA node here)


def tp2_server(model, state, log_path) -> ServerProcess:
    return ServerProcess.plasticity(model, extra_args=[*TP2["extra_args"], "--state-dir", str(state)],
                                    env=TP2["env"], log_path=log_path)


def test_a_server_killed_by_its_own_pid_leaves_no_process_and_no_shared_memory(servers_restart, default_model, tmp_path):
    servers_restart.stop()  # one engine at a time on this machine
    state = tmp_path / "state"
    before = set(os.listdir(SHM_DIR))
    killed = tp2_server(default_model, state, tmp_path / "killed.log")
    try:
        killed.wait_ready()
        ledger = state / f"shm-{killed.pid}.json"
        recorded = json.loads(ledger.read_text())
        children = [p for p in recorded["pids"] if p != killed.pid]
        assert len(children) >= 3, children  # engine core and two workers (and multiprocessing's tracker)
        os.kill(killed.pid, signal.SIGKILL)  # `kill -9 <server pid>`: the API server alone
        killed.proc.wait()
        deadline = time.monotonic() + 20
        while any(map(running, children)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in children if running(p)], "vLLM processes outlived the killed API server"
    finally:
        killed.stop(grace=0)  # SIGKILL whatever is left of its group at once; removes its temp directory
    new = {n for n in set(os.listdir(SHM_DIR)) - before if n.startswith(VLLM_SHM)}
    left = new & set(recorded["files"])
    assert any(n.startswith("vllm_dist_") for n in left), f"no TP buffers left: this test no longer shows the sweep ({new})"
    assert {n for n in new if n.startswith("vllm_dist_")} <= left  # the ledger names every TP buffer
    assert ledger.exists()

    # The next start with the same state directory removes them; its own clean stop leaves nothing.
    servers_restart.start("after-kill", lambda log_path: tp2_server(default_model, state, log_path))
    try:
        assert not left & set(os.listdir(SHM_DIR))
        assert not ledger.exists()
    finally:
        servers_restart.stop()
    after = {n for n in set(os.listdir(SHM_DIR)) - before if n.startswith("vllm_dist_")}  # psm_: launcher.stop sweeps
    assert not after, f"a cleanly stopped TP=2 server left {sorted(after)}"
    assert not list(state.glob("shm-*.json"))
