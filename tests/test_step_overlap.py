"""A step in two requests (prepare: forward/backward; apply: the update), so that a CPU training server packs
the previous step's layers again while the trainer computes the next step, and never while it writes them.

The trainer side runs on a tiny private model (TrainerCore); the server side (TrainingService) with a trainer
and a repack that record when each piece of work starts and ends, without vLLM."""

from __future__ import annotations

import asyncio
import json
import types

import pytest
import torch

from plasticity_training.trainer_core import TrainerCore
from tiny_models import tiny, vllm_layout  # noqa: F401 (tiny is a fixture)
from vllm_plasticity.contract.messages import (ApplyStep, BeginJob, EndJob, JobBegun, JobEnded, PrepareStep, Step,
                                               StepDone, StepPrepared, TrainerError)
from vllm_plasticity.training_service import TrainingService, TrainJob, TrainRequest

SAMPLES = [{"context_ids": [5, 6, 7], "continuation_ids": [8, 9, 10]}]


def make_core(tiny, state_dir) -> TrainerCore:
    weights = vllm_layout(tiny)
    core = TrainerCore(tiny, weights, state_dir)
    core.weights = weights
    return core


def test_prepare_changes_no_weight_and_prepare_then_apply_equals_one_step(tiny, tmp_path):
    split, whole = make_core(tiny, tmp_path / "a"), make_core(tiny, tmp_path / "b")
    for core in (split, whole):
        core.begin_job(SAMPLES, optimizer={"lr": 1e-2})
    before = {k: v.clone() for k, v in split.weights.items()}
    for step in range(3):
        prepared = split.prepare_step()
        assert all(torch.equal(before[k], v) for k, v in split.weights.items())  # gradients only
        applied, reference = split.apply_step(), whole.step()
        assert prepared["loss"] == applied["loss"] == pytest.approx(reference["loss"], rel=1e-6)
        assert applied["weight_version"] == reference["weight_version"] == step + 1
        for k, v in split.weights.items():
            assert torch.allclose(v, whole.weights[k], atol=1e-7), k
        before = {k: v.clone() for k, v in split.weights.items()}
    assert any(not torch.equal(before[k], v) for k, v in vllm_layout(tiny).items())


def test_apply_without_a_prepared_step_is_refused_and_a_cancelled_one_is_dropped(tiny, tmp_path):
    core = make_core(tiny, tmp_path / "s")
    core.begin_job(SAMPLES, optimizer={"lr": 1e-2})
    with pytest.raises(TrainerError) as err:
        core.apply_step()
    assert err.value.kind == "conflict" and "prepare_step" in str(err.value)
    core.prepare_step()
    core.apply_step()
    with pytest.raises(TrainerError):  # one update per prepared step
        core.apply_step()
    before = {k: v.clone() for k, v in core.weights.items()}
    core.prepare_step()
    core.end_job(success=False)  # cancelled between the two: nothing applied, no gradient kept
    assert all(torch.equal(before[k], v) for k, v in core.weights.items())
    assert all(p.grad is None for p in core.named.values())
    assert core.state.weight_version == 1


class RecordingTrainer:
    """The TrainerClient's interface: answers like a trainer and records when each request runs."""

    def __init__(self, events: list, step_s: float = 0.05) -> None:
        self.events, self.step_s = events, step_s
        self.state, self.last_error, self.pid, self.restarts, self.log_path = "ready", None, 1, 0, "trainer.log"
        self.version = 0

    def alive(self):
        return True

    async def ensure_started(self):
        return None

    async def request(self, msg):
        if isinstance(msg, BeginJob):
            return JobBegun(samples=1, tokens=3, skipped_duplicates=0, skipped_zero_weight=0, parameters=1,
                            trained=["model.layers.0.mlp.down_proj.weight"], rollback_bytes=0, rollback_note=None)
        if isinstance(msg, (PrepareStep, Step)):
            self.events.append(("prepare start", self.version + 1))
            await asyncio.sleep(self.step_s)
            self.events.append(("prepare end", self.version + 1))
            if isinstance(msg, PrepareStep):
                return StepPrepared(loss=1.0, tokens=3, seconds=self.step_s)
        if isinstance(msg, (ApplyStep, Step)):
            self.version += 1
            self.events.append(("apply", self.version))
            return StepDone(loss=1.0, tokens=3, weight_version=self.version, seconds=self.step_s)
        if isinstance(msg, EndJob):
            self.events.append(("end job", self.version))
            return JobEnded(weight_version=self.version)
        raise AssertionError(f"unexpected request {msg}")


def run_job(tmp_path, events, steps, pause=False, repack_fails_at=None) -> tuple[TrainJob, TrainingService]:
    trainer = RecordingTrainer(events)
    packed = {"count": 0}

    async def repack(trained):
        packed["count"] += 1
        version = packed["count"]
        events.append(("repack start", version))
        await asyncio.sleep(0.03)
        if version == repack_fails_at:
            raise RuntimeError("the worker could not pack the layers")
        events.append(("repack end", version))
        return {"layers": 1, "seconds": 0.03}

    async def paused(**kwargs):
        events.append(("pause", None))

    async def resumed():
        events.append(("resume", None))

    engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(add_request_async=lambda *a, **k: None),
                                   pause_generation=paused, resume_generation=resumed)

    async def main():
        svc = TrainingService(engine, trainer, vocab_size=300, max_model_len=512, checkpoint_dir=tmp_path / "ck",
                              repack=repack)
        job = TrainJob(TrainRequest(samples=SAMPLES, steps=steps, pause=pause), 1)
        try:
            await svc._run_job(job)
        except RuntimeError as exc:  # the queue's runner (_run) fails the job with it
            job.status, job.error = "failed", str(exc)
        return job, svc

    return asyncio.run(main())


def test_the_packing_of_a_step_overlaps_the_next_steps_compute_and_ends_before_its_update(tmp_path):
    events: list = []
    job, svc = run_job(tmp_path, events, steps=3)
    assert job.status == "succeeded", job.error
    at = {event: i for i, event in enumerate(events)}
    for k in (1, 2, 3):
        assert at[("repack start", k)] > at[("apply", k)]  # packs what step k wrote
    for k in (1, 2):
        assert at[("repack start", k)] < at[("prepare end", k + 1)]  # ... while step k + 1 computes
        assert at[("repack end", k)] < at[("apply", k + 1)]  # ... and is done before step k + 1 writes
    assert at[("repack end", 3)] < at[("end job", 3)]  # the job ends with its last step served
    assert job.weight_version == svc.weight_version == 3 and len(job.repack_seconds) == 3


def test_with_a_pause_each_step_is_one_request_inside_the_pause(tmp_path):
    events: list = []
    job, _ = run_job(tmp_path, events, steps=2, pause=True)
    assert job.status == "succeeded", job.error
    kinds = [e[0] for e in events]
    assert kinds == ["pause", "prepare start", "prepare end", "apply", "repack start", "repack end", "resume"] * 2 + \
        ["end job"]


def test_a_failed_packing_fails_the_job_and_still_ends_it_in_the_trainer(tmp_path):
    events: list = []
    job, _ = run_job(tmp_path, events, steps=3, repack_fails_at=1)
    assert job.status == "failed" and "could not pack" in job.error
    assert ("end job", 1) in events and ("apply", 2) not in events  # no update after an unpacked step


def test_the_trainer_answers_end_job_before_saving_state_and_saves_it_before_the_next_answer(tiny, tmp_path):
    """End of a job: the reply goes out first, the state save (and freeing the rollback copy) right after,
    before the trainer reads its next request; a direct caller (tests, shutdown) saves at once."""
    import threading

    import zmq

    from plasticity_training.trainer import serve
    from vllm_plasticity.contract.messages import Ping, Shutdown, decode_reply, encode

    core = make_core(tiny, tmp_path / "s")
    state = core.state_dir / "trainer_state.json"  # the model's own directory inside the state dir
    core.begin_job(SAMPLES, optimizer={"lr": 1e-2})
    core.step()
    core.end_job(defer_saving=True)
    assert not state.exists() and core.after_reply  # not yet: left for after the reply
    core.run_after_reply()
    assert json.loads(state.read_text())["total_jobs"] == 1

    endpoint = f"ipc://{tmp_path}/trainer.sock"
    thread = threading.Thread(target=serve, args=(core, endpoint), daemon=True)
    thread.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        def ask(msg):
            sock.send(encode(msg))
            assert sock.poll(60000), f"no reply to {msg}"
            return decode_reply(msg, sock.recv())

        ask(BeginJob(samples=SAMPLES, force=True))
        ask(Step())
        ask(EndJob(success=True))
        ask(Ping())  # answered only after the save the EndJob left behind
        assert core.after_reply == []
        assert json.loads(state.read_text())["total_jobs"] == 2
        ask(Shutdown())
    finally:
        sock.close()
        ctx.term()
    thread.join(timeout=30)
