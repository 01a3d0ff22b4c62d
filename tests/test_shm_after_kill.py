"""A SIGKILLed server leaves vLLM's shared-memory files in /dev/shm; the next server started with the same
state directory removes the ones the dead server recorded (plugin/shm_ledger.py)."""

from __future__ import annotations

import os
import signal

import pytest

from tests.conftest import SERVER_ARGS
from vllm_plasticity.launcher import ServerProcess, _wait_group_gone
from vllm_plasticity.contract.weights import SHM_DIR

pytestmark = pytest.mark.server


def test_shared_memory_of_a_killed_server_is_removed_at_the_next_start(servers_restart, default_model, tmp_path):
    servers_restart.stop()  # one engine at a time on this machine
    state = tmp_path / "state"
    before = set(os.listdir(SHM_DIR))
    killed = ServerProcess.plasticity(default_model, extra_args=[*SERVER_ARGS, "--state-dir", str(state)],
                                      log_path=tmp_path / "killed.log")
    try:
        killed.wait_ready()
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # the whole group: API server, engine core, workers
        killed.proc.wait()
        _wait_group_gone(killed.pid)
    left = {n for n in set(os.listdir(SHM_DIR)) - before if n.startswith(("psm_", "sem."))}
    assert left, "vLLM left nothing in /dev/shm: this test no longer shows the clean-up"
    assert (state / f"shm-{killed.pid}.json").exists()

    servers_restart.start("after-kill", lambda log_path: ServerProcess.plasticity(
        default_model, extra_args=[*SERVER_ARGS, "--state-dir", str(state)], log_path=log_path))
    try:
        assert not left & set(os.listdir(SHM_DIR))
        assert not (state / f"shm-{killed.pid}.json").exists()
    finally:
        servers_restart.stop()
