"""When a CPU training server packs its layers again after a step (cpu_repack.py), relative to the trainer's
next step, to pausing, and to the job's end (training_service.TrainingService._publish / _settle).

A user relies on: a job without `pause` not waiting for each re-pack (the trainer computes the next step
while the worker packs; the /train speed goal of issue 28), a job with `pause` never serving half a step,
and, either way, every request after the job's answer served by the job's final weights under a new KV
generation. The trainer and the worker's re-pack are stand-ins that log what they are asked, in order; a
real server checks the weights themselves (tests/test_training.py)."""

from __future__ import annotations

import asyncio
import types

import pytest

from vllm_plasticity.contract.messages import BeginJob, EndJob, JobBegun, JobEnded, Step, StepDone
from vllm_plasticity.training_service import TrainingService, TrainRequest

STEP_SECONDS, REPACK_SECONDS = 0.05, 0.15  # a re-pack longer than a step: an overlap shows in the log


class LoggedTrainer:
    """The TrainerClient's interface: each step takes STEP_SECONDS and writes the weights at its end."""

    def __init__(self, log: list[str]) -> None:
        self.log, self.state, self.steps = log, "ready", 0

    async def ensure_started(self) -> None:
        pass

    def alive(self) -> bool:
        return True

    async def request(self, msg, timeout=None):
        if isinstance(msg, BeginJob):
            return JobBegun(samples=1, tokens=3, skipped_duplicates=0, parameters=1, trained=["layer.weight"])
        if isinstance(msg, Step):
            self.steps += 1
            self.log.append(f"step {self.steps} begins")
            await asyncio.sleep(STEP_SECONDS)
            self.log.append(f"step {self.steps} writes")
            return StepDone(loss=1.0, tokens=3, weight_version=self.steps, seconds=STEP_SECONDS)
        if isinstance(msg, EndJob):
            self.log.append("end job")
            return JobEnded(weight_version=self.steps)
        raise AssertionError(msg)


def service(tmp_path, log: list[str], fail_at: int | None = None) -> TrainingService:
    repacks = iter(range(1, 100))

    async def repack(trained):
        number = next(repacks)
        log.append(f"repack {number} begins")
        await asyncio.sleep(REPACK_SECONDS)
        if number == fail_at:
            raise RuntimeError("the worker could not pack")
        log.append(f"repack {number} ends")
        return {"layers": len(trained), "seconds": REPACK_SECONDS}

    async def pause_generation(**kwargs):
        log.append("pause")

    async def resume_generation():
        log.append("resume")

    engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(add_request_async=lambda request: None),
                                   pause_generation=pause_generation, resume_generation=resume_generation)
    svc = TrainingService(engine, LoggedTrainer(log), vocab_size=300, max_model_len=512,
                          checkpoint_dir=tmp_path / "ckpts", repack=repack)
    published = svc.kv_generations.publish

    def publish():
        published()
        log.append(f"publish {svc.kv_generations.generation}")

    svc.kv_generations.publish = publish
    return svc


def run_job(svc: TrainingService, log: list[str], **body):
    async def run():
        runner = asyncio.create_task(svc._run())  # the server's job runner (start() also starts a trainer)
        job = svc.submit(TrainRequest(context_ids=[5, 6], continuation_ids=[7, 8], force=True, **body))
        await job.done.wait()
        log.append(f"job {job.status}")
        await asyncio.sleep(2 * REPACK_SECONDS)  # anything still running would log after the job
        runner.cancel()
        return job
    return asyncio.run(run())


def test_without_pause_the_next_step_runs_while_the_worker_packs_and_the_job_ends_after_the_last_pack(tmp_path):
    log: list[str] = []
    job = run_job(service(tmp_path, log), log, steps=3)
    assert job.status == "succeeded" and len(job.repack_seconds) == 3
    # the overlap: step k+1 begins before re-pack k ends
    for k in (1, 2):
        assert log.index(f"step {k + 1} begins") < log.index(f"repack {k} ends"), log
    # re-packs run in the order of the steps, and the job answers only after the last one ended
    ends = [log.index(f"repack {k} ends") for k in (1, 2, 3)]
    assert ends == sorted(ends) and ends[-1] < log.index("job succeeded"), log
    # ... and after a publish that follows it: no request after the job reuses KV of an older copy
    last_publish = max(i for i, line in enumerate(log) if line.startswith("publish"))
    assert ends[-1] < last_publish < log.index("job succeeded"), log
    # the trainer's end of job (its state save) overlaps the last re-pack
    assert log.index("end job") < ends[-1], log


def test_with_pause_each_step_and_its_pack_land_between_two_engine_steps(tmp_path):
    log: list[str] = []
    job = run_job(service(tmp_path, log), log, steps=3, pause=True)
    assert job.status == "succeeded" and len(job.repack_seconds) == 3
    for k in (1, 2, 3):
        pause = log.index("pause", 0 if k == 1 else log.index(f"step {k - 1} writes"))
        written, packed = log.index(f"step {k} writes"), log.index(f"repack {k} ends")
        resumed = log.index("resume", packed)
        assert pause < written < packed < resumed, log
        assert "pause" not in log[pause + 1:resumed], log
        if k < 3:
            assert resumed < log.index(f"step {k + 1} begins"), log


@pytest.mark.parametrize("pause", [False, True])
def test_a_failed_pack_fails_the_job_and_leaves_nothing_running(tmp_path, pause):
    log: list[str] = []
    svc = service(tmp_path, log, fail_at=2)
    job = run_job(svc, log, steps=3, pause=pause)
    assert job.status == "failed" and "the worker could not pack" in job.error
    assert log[-1] == "job failed", log  # every re-pack ended before the job did
    assert "end job" in log  # the trainer's job is closed either way
    if pause:
        assert log.count("pause") == log.count("resume")
