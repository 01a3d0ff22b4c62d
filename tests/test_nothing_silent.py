"""Issue #31 item 5, "nothing fails silently": the API server's shutdown checkpoint and its start of the
trainer report every failure (log and return value / GET /train/status), without a vLLM server."""

from __future__ import annotations

import asyncio
import threading
import types

import pytest

from vllm_plasticity.contract.messages import TrainerError, encode_reply
from vllm_plasticity.training_service import TrainingService


class FakeTrainer:
    """The TrainerClient's interface; `endpoint` is a ZMQ socket the test answers (or not)."""

    def __init__(self, endpoint=None, alive=True):
        self.endpoint, self._alive = endpoint, alive
        self.endpoints = [endpoint]
        self.state, self.last_error, self.pid, self.restarts, self.log_path = "ready", None, 1, 1, "trainer.log"
        self.pids = [self.pid]

    def alive(self):
        return self._alive

    async def ensure_started(self):
        raise RuntimeError("the manifest is unreadable")


def service(trainer, tmp_path) -> TrainingService:
    engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(add_request_async=lambda *a, **k: None))
    svc = TrainingService(engine, trainer, vocab_size=300, max_model_len=512, checkpoint_dir=tmp_path / "ckpts")
    svc.weight_version, svc.checkpointed_version = 3, 1  # trained since the last checkpoint
    return svc


def replying(endpoint: str, reply: bytes | None) -> threading.Thread:
    """A trainer stand-in: receives one request and answers `reply` (None: never answers)."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)

    def run():
        try:
            if sock.poll(5000):
                sock.recv()
                if reply is not None:
                    sock.send(reply)
        finally:
            sock.close()
            ctx.term()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture()
def endpoint(tmp_path):
    return f"ipc://{tmp_path}/trainer.sock"


def test_a_shutdown_checkpoint_the_trainer_never_answers_is_reported(tmp_path, endpoint, capfd):
    thread = replying(endpoint, None)
    svc = service(FakeTrainer(endpoint), tmp_path)
    reason = svc.checkpoint_at_exit(timeout=0.5)  # was: returned silently after the timeout
    thread.join()
    assert reason and "did not answer" in reason
    err = capfd.readouterr().err
    assert "ERROR: no checkpoint at exit" in err and "weight version 3 (last checkpoint: version 1)" in err


def test_a_refused_shutdown_checkpoint_is_reported_with_its_kind(tmp_path, endpoint, capfd):
    thread = replying(endpoint, encode_reply(TrainerError("disk_full", "no space left on the checkpoint disk")))
    reason = service(FakeTrainer(endpoint), tmp_path).checkpoint_at_exit(timeout=5)
    thread.join()
    assert reason and "disk_full" in reason and "no space left" in reason
    assert "ERROR: no checkpoint at exit" in capfd.readouterr().err


def test_a_dead_trainer_at_shutdown_is_reported(tmp_path, capfd):
    trainer = FakeTrainer(alive=False)
    trainer.state, trainer.last_error = "failed", "the trainer exited (killed by signal 9)"
    reason = service(trainer, tmp_path).checkpoint_at_exit()  # was: returned silently
    assert reason and "killed by signal 9" in reason
    assert "ERROR: no checkpoint at exit" in capfd.readouterr().err


def test_nothing_to_write_at_shutdown_is_no_failure(tmp_path, capfd):
    svc = service(FakeTrainer(alive=False), tmp_path)
    svc.checkpointed_version = svc.weight_version
    assert svc.checkpoint_at_exit() is None
    assert capfd.readouterr().err == ""


def test_a_trainer_that_fails_to_start_is_logged_and_shown_in_status(tmp_path, capfd):
    svc = service(FakeTrainer(), tmp_path)
    asyncio.run(svc._start_trainer())  # was: `except Exception: pass`
    status = svc.status()["trainer"]
    assert status["state"] == "failed" and "manifest is unreadable" in status["last_error"]
    assert "ERROR: the trainer did not start" in capfd.readouterr().err
