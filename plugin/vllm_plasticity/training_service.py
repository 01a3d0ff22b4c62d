"""Online training jobs and checkpoints behind /train and /checkpoint (routes in endpoints.py).

Runs in the API server process. Requests are validated here (types, vocabulary, lengths, optimizer keys,
non-finite numbers) before anything reaches the trainer, so bad input gets a 4xx with the reason and
changes nothing. Accepted jobs go into one queue; a single asyncio task drives them step by step:

    begin_job -> [pause generation?] step [publish, resume] x steps -> end_job

Each trainer request takes the trainer lock on its own, so a checkpoint waits at most one step, and a job
cancelled with DELETE /train/{job_id} stops before its next step. Limits on steps, samples, tokens and
queued jobs (PLASTICITY_TRAIN_MAX_*) are checked before a job is queued.

Publishing each step (kv_generations.py: the next requests' cache salt names the new generation) means no
later request reuses KV computed with the old weights; running requests carry on.

Checkpoints run in the same trainer, under the same lock as jobs, so a sync never overlaps a step: on
request (POST /checkpoint), after a quiet period with no training (batching many jobs into one write), and
at clean shutdown (a synchronous request from the API server's exit handler).

A job whose loss diverges ends as `diverged` (the rule: training/plasticity_training/divergence.py) and
is rolled back by the trainer where it kept a copy; one that was not rolled back holds the automatic
checkpoints (quiet timer, shutdown), so they never replace the last good checkpoint with its weights,
until a client asks for one with POST /checkpoint.

A checkpoint name holding another model's weights (its recorded origin differs: checkpoint.py) is never
overwritten unasked: POST /checkpoint answers 409 (name another path, or send "replace": true), and the
automatic checkpoints of the default name skip it with a warning (GET /checkpoint's `held` says why)
until a checkpoint into that name is written.
"""

from __future__ import annotations

import asyncio
import dataclasses
import collections
import itertools
import sys
import time
import uuid
from pathlib import Path
from fastapi import HTTPException
from pydantic import Field, StrictBool, StrictInt, model_validator

from vllm_plasticity.config import PlasticityConfig, TrainLimits
from vllm_plasticity.contract.files import is_inside
from vllm_plasticity.contract.messages import BeginJob, Checkpoint, EndJob, Ping, Step, TrainerError
from vllm_plasticity.api_processes import SharedWords
from vllm_plasticity.kv_generations import KVGenerations
from vllm_plasticity.contract.settings import (
    ContextMode, Number, Objective, OptimizerSettings, ParamsFilter, PreferenceSample, PreferenceSettings, Sample, Strict,
    sample_length, sample_tokens, select_params)
from vllm_plasticity import metrics
from vllm_plasticity.trainer_client import TrainerClient, TrainerUnavailable

RECENT_JOBS = 50
# The one place a trainer failure becomes an HTTP status (contract.messages.ErrorKind).
HTTP_STATUS: dict[str, int] = {"invalid": 400, "conflict": 409, "rejected": 422, "diverged": 422,
                               "out_of_memory": 507, "disk_full": 507, "other_model": 409, "internal": 500}


class TrainRequest(Strict):
    objective: Objective = Field("sft", description="sft: continuation loss; orpo, dpo: preference pairs")
    samples: list[Sample | PreferenceSample] | None = Field(None, min_length=1)
    context_ids: list[StrictInt] | None = Field(None, min_length=1, description="single-sample shorthand")
    continuation_ids: list[StrictInt] | None = Field(None, min_length=1, description="single-sample shorthand")
    steps: StrictInt = Field(1, ge=1, description="at most the server's limit (PLASTICITY_TRAIN_MAX_STEPS; "
                             "TrainingService.validate)")
    optimizer: OptimizerSettings = OptimizerSettings()
    params: ParamsFilter = ParamsFilter()
    force: StrictBool = Field(False, description="train even on samples already trained on")
    wait: StrictBool = Field(True, description="answer when the job ends (false: answer with the job id at once)")
    pause: StrictBool = Field(False, description="pause generation around each optimizer step")
    context_mode: ContextMode = "masked"
    rollback: StrictBool | None = Field(None, description="undo the job if its loss diverges: true keeps a copy of the "
                                        "trained tensors (refused when it does not fit), null where host memory allows, "
                                        "false never")
    beta: Number | None = Field(None, description="dpo: strength of the KL constraint (default 0.1)")
    lambda_: Number | None = Field(None, alias="lambda", description="orpo: weight of the odds-ratio term (default 0.1)")

    @property
    def preference(self) -> PreferenceSettings:
        given = {k: v for k, v in (("beta", self.beta), ("lambda", self.lambda_)) if v is not None}
        return PreferenceSettings(**given)

    @model_validator(mode="after")
    def _one_form(self):
        single = self.context_ids is not None or self.continuation_ids is not None
        if single and self.samples is not None:
            raise ValueError("give either samples or context_ids + continuation_ids, not both")
        if single:
            if self.context_ids is None or self.continuation_ids is None:
                raise ValueError("the shorthand needs both context_ids and continuation_ids")
            self.samples = [Sample(context_ids=self.context_ids, continuation_ids=self.continuation_ids)]
        if self.samples is None:
            raise ValueError("no samples: give samples, or context_ids + continuation_ids")
        kind, fields = ((Sample, "context_ids and continuation_ids") if self.objective == "sft"
                        else (PreferenceSample, "context_ids, chosen_ids and rejected_ids"))
        for i, sample in enumerate(self.samples):
            if not isinstance(sample, kind):
                raise ValueError(f"objective {self.objective!r} takes samples with {fields}; samples[{i}] is not one")
            if self.objective != "dpo" and getattr(sample, "ref_chosen_logp", None) is not None:
                raise ValueError(f"samples[{i}]: reference log-probs apply to the dpo objective only")
        if self.beta is not None and self.objective != "dpo":
            raise ValueError("beta applies to the dpo objective only")
        if self.lambda_ is not None and self.objective != "orpo":
            raise ValueError("lambda applies to the orpo objective only")
        if self.objective != "sft" and self.context_mode != "masked":
            raise ValueError(f"context_mode {self.context_mode!r} applies to sft only")
        self.preference  # the bounds of beta and lambda (PreferenceSettings): a bad value is refused here
        return self


class CheckpointRequest(Strict):
    path: str | None = Field(None, description="checkpoint name or path inside the checkpoint directory (default: main)")
    replace: StrictBool = Field(False, description="overwrite a checkpoint that holds another model's weights "
                                "(refused with 409 otherwise)")


class TrainJob:
    """One /train request's life: queued, running, then succeeded, failed, rejected, diverged or cancelled."""

    def __init__(self, request: TrainRequest, number: int) -> None:
        self.id = f"train-{number}-{uuid.uuid4().hex[:6]}"
        self.request = request
        self.status = "queued"
        self.losses: list[float] = []
        self.step_seconds: list[float] = []  # the trainer's forward/backward/optimizer time per step
        self.publish_seconds: list[float] = []  # the server's bookkeeping per step (kv_generations.publish)
        self.repack_seconds: list[float] = []  # CPU training servers: the worker packing the stepped layers again
        self.tokens = 0
        self.skipped_duplicates = 0
        self.skipped_zero_weight = 0
        self.preference_steps: list[dict] = []  # orpo, dpo: chosen/rejected log-probs and margin per step
        self.weight_version: int | None = None
        self.rollback_bytes = 0  # host memory the trainer kept to undo this job if it diverged
        self.rolled_back: bool | None = None  # diverged jobs: whether the trained tensors were restored
        self.error: str | None = None
        self.http_status = 200
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.cancel_requested = False
        self.done = asyncio.Event()

    def summary(self) -> dict:
        preference = {}
        if self.request.objective != "sft":
            preference = {key + "s": [step[key] for step in self.preference_steps]
                          for key in ("chosen_logp", "rejected_logp", "margin")}
        return {"job_id": self.id, "status": self.status, "objective": self.request.objective,
                "steps": len(self.losses), "losses": self.losses, **preference,
                "tokens": self.tokens, "weight_version": self.weight_version,
                "skipped_duplicates": self.skipped_duplicates, "skipped_zero_weight": self.skipped_zero_weight,
                **({"rolled_back": self.rolled_back} if self.rolled_back is not None else {}),
                **({"error": self.error} if self.error else {})}

    def detail(self) -> dict:
        return {**self.summary(), "requested_steps": self.request.steps, "samples": len(self.request.samples),
                "step_seconds": self.step_seconds, "publish_seconds": self.publish_seconds,
                "repack_seconds": self.repack_seconds, "rollback_bytes": self.rollback_bytes, "created": self.created, "started": self.started,
                "finished": self.finished}


# The operator's defaults are PlasticityConfig's (config.py), written there once.
_DEFAULTS = PlasticityConfig()


class TrainingService:
    """The job queue and its single runner task; owns the TrainerClient and the weight version."""

    def __init__(self, engine_client, trainer: TrainerClient, vocab_size: int, max_model_len: int,
                 checkpoint_dir: Path, quiet_seconds: float = _DEFAULTS.checkpoint_quiet_seconds,
                 allow_model_dir: bool = _DEFAULTS.checkpoint_into_model_dir,
                 limits: TrainLimits = _DEFAULTS.train_limits, param_names: list[str] = (), repack=None,
                 checkpoint_max_names: int | None = _DEFAULTS.checkpoint_max_names,
                 process_config: dict | None = None, shared_words: SharedWords | None = None) -> None:
        self.engine_client, self.trainer = engine_client, trainer
        # async (trained names) -> {"layers", "seconds"}: on a CPU server with packed kernels, the worker packs
        # the layers a step wrote again (cpu_repack.py); None where the served kernels read the weights in place
        self.repack = repack
        self.kv_generations = KVGenerations.install(engine_client, shared_words)  # shared: api_processes.py
        self.vocab_size, self.max_model_len, self.limits = vocab_size, max_model_len, limits
        self.param_names = list(param_names)  # the served weights' names (weight manifest): filters are checked on them
        self._job_numbers = itertools.count(1)
        self.checkpoint_dir, self.quiet_seconds, self.allow_model_dir = Path(checkpoint_dir), quiet_seconds, allow_model_dir
        self.checkpoint_max_names = checkpoint_max_names  # PLASTICITY_CHECKPOINT_MAX_NAMES
        # The server's PlasticityConfig (as_json): every checkpoint records it beside the weights.
        self.process_config = process_config if process_config is not None else _DEFAULTS.as_json()
        # Why the automatic checkpoints are held: the served weights come from a diverged job that was not
        # rolled back. Cleared by a checkpoint a client asks for (POST /checkpoint).
        self.checkpoints_held: str | None = None
        # Why the automatic checkpoints skip the default name: it holds another model's weights. Cleared when a
        # checkpoint into that name is written (POST /checkpoint with "replace": true).
        self.default_name_taken: str | None = None
        self.trainer_lock = asyncio.Lock()  # a job or a checkpoint holds the trainer, never both
        self.checkpointed_version: int | None = None  # weight version of the last checkpoint
        self.next_checkpoint_at: float | None = None
        self.last_checkpoint: dict | None = None
        self.checkpoint_totals = {"checkpoints": 0, "bytes_written": 0, "seconds": 0.0}
        self.queue: asyncio.Queue[TrainJob] = asyncio.Queue()
        self.jobs: collections.OrderedDict[str, TrainJob] = collections.OrderedDict()
        self.weight_version: int | None = None
        self.current: TrainJob | None = None
        self._runner: asyncio.Task | None = None
        self._scheduler: asyncio.Task | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._runner = loop.create_task(self._run())
        self._scheduler = loop.create_task(self._checkpoint_scheduler())
        loop.create_task(self._start_trainer())

    async def _start_trainer(self) -> None:
        """Start the trainer with the server, so the first job does not wait for it. A failure does not stop
        the server: it is logged and shown in GET /train/status (trainer.state, last_error), and the next
        job starts the trainer again."""
        try:
            await self.trainer.ensure_started()
            # The weights served at start are already on disk (the model, or the checkpoint served).
            self.weight_version = self.checkpointed_version = (await self.trainer.request(Ping())).weight_version
            metrics.weight_version(self.weight_version)
        except Exception as exc:  # TrainerUnavailable, a TrainerError to the ping, a bug: all reported
            reason = str(exc) if isinstance(exc, (TrainerUnavailable, TrainerError)) else f"{type(exc).__name__}: {exc}"
            self.trainer.state, self.trainer.last_error = "failed", reason
            print(f"plasticity: ERROR: the trainer did not start: {reason}; the next /train job tries again "
                  "(GET /train/status)", file=sys.stderr, flush=True)

    def _advance_version(self, version: int | None) -> int | None:
        """The server owns the weight version: it only moves forward (a trainer restarted from older saved
        state reports a lower one; the trainer adopts ours, see the checkpoint and begin_job messages)."""
        if version is not None:
            self.weight_version = max(self.weight_version or 0, version)
            metrics.weight_version(self.weight_version)
        return self.weight_version

    def validate(self, req: TrainRequest) -> None:
        """Everything a job is refused for, before it is queued (4xx, nothing changes)."""
        lim = self.limits
        if req.steps > lim.max_steps:
            raise HTTPException(400, f"steps {req.steps} is more than this server's limit {lim.max_steps} "
                                     "(PLASTICITY_TRAIN_MAX_STEPS)")
        if len(req.samples) > lim.max_samples:
            raise HTTPException(400, f"{len(req.samples)} samples is more than this server's limit {lim.max_samples} "
                                     "per request (PLASTICITY_TRAIN_MAX_SAMPLES)")
        tokens = sum(map(sample_tokens, req.samples))
        if tokens > lim.max_tokens:
            raise HTTPException(400, f"{tokens} tokens (context + continuation, all samples) is more than this "
                                     f"server's limit {lim.max_tokens} per request (PLASTICITY_TRAIN_MAX_TOKENS)")
        queued = sum(1 for j in self.jobs.values() if j.status == "queued")
        if queued >= lim.max_queued:
            raise HTTPException(429, f"{queued} jobs are already queued (PLASTICITY_TRAIN_MAX_QUEUED); "
                                     "retry when one has run, or cancel one with DELETE /train/{job_id}")
        if self.param_names and not select_params(self.param_names, req.params):
            raise HTTPException(400, f"the params filter {req.params.model_dump()} selects no parameter of this model")
        for i, s in enumerate(req.samples):
            bad = [t for t in s.context_ids + [t for seq in s.sequences() for t in seq] if not 0 <= t < self.vocab_size]
            if bad:
                raise HTTPException(400, f"samples[{i}]: token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
            longest = sample_length(s)
            if longest > self.max_model_len:
                raise HTTPException(400, f"samples[{i}]: context + continuation is {longest} tokens, "
                                         f"more than the model's maximum length {self.max_model_len}")

    def submit(self, req: TrainRequest) -> TrainJob:
        job = TrainJob(req, next(self._job_numbers))
        self.jobs[job.id] = job
        while len(self.jobs) > RECENT_JOBS and next(iter(self.jobs.values())).done.is_set():
            self.jobs.popitem(last=False)
        self.queue.put_nowait(job)
        return job

    def cancel(self, job_id: str) -> dict:
        """Cancel a queued job (it never runs) or a running one (it stops before its next step; every step
        taken is whole, so the weights are those of a consistent version)."""
        job = self.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} (the server keeps the most recent jobs only)")
        if job.done.is_set():
            raise HTTPException(409, f"job {job_id} has already ended ({job.status})")
        job.cancel_requested = True
        if job.status == "queued":
            self._cancelled(job)
            job.finished = time.time()
            job.done.set()
            metrics.job_ended(job.status)
        return job.summary()

    @staticmethod
    def _cancelled(job: TrainJob) -> None:
        job.status, job.http_status = "cancelled", 409
        job.error = f"cancelled by DELETE /train/{job.id} after {len(job.losses)} of {job.request.steps} steps"

    async def _run(self) -> None:
        while True:
            job = await self.queue.get()
            if job.done.is_set():  # cancelled while queued
                continue
            self.current = job
            try:
                await self._run_job(job)
                if job.losses:  # weights changed: a scheduled checkpoint follows after the quiet period
                    self.next_checkpoint_at = time.time() + self.quiet_seconds
            except Exception as exc:  # never let one job kill the runner
                job.status, job.error, job.http_status = "failed", f"{type(exc).__name__}: {exc}", 500
            finally:
                job.finished = time.time()
                metrics.job_ended(job.status)
                self.current = None
                job.done.set()

    async def _trainer_request(self, msg: Strict):
        # One trainer request at a time, jobs' steps and checkpoints alike; a job takes the lock per
        # request, so a checkpoint or another client's status is answered between two steps of a long job.
        async with self.trainer_lock:
            return await self.trainer.request(msg)

    async def _run_job(self, job: TrainJob) -> None:
        req = job.request
        job.status, job.started = "running", time.time()
        try:
            await self.trainer.ensure_started()
        except TrainerUnavailable as exc:
            job.status, job.error, job.http_status = "failed", str(exc), 503
            return
        self.trainer.state = "busy"
        try:
            # A BeginJob that fails opens nothing in the trainer (all or nothing), so only an open job is ended.
            begin = await self._trainer_request(BeginJob(
                samples=req.samples, objective=req.objective, preference=req.preference,
                optimizer=req.optimizer, params=req.params, force=req.force,
                context_mode=req.context_mode, weight_version=self.weight_version or 0, rollback=req.rollback))
            job.tokens, job.skipped_duplicates, job.skipped_zero_weight = (begin.tokens, begin.skipped_duplicates,
                                                                           begin.skipped_zero_weight)
            job.rollback_bytes = begin.rollback_bytes
            success, end = False, None
            repacks: list[asyncio.Future] = []  # re-packs still running in the worker (`_publish`)
            try:
                for _ in range(req.steps if begin.samples else 0):
                    if job.cancel_requested:
                        break
                    if req.pause:
                        await self.engine_client.pause_generation(mode="keep", clear_cache=False)
                    try:
                        reply = await self._trainer_request(Step())
                        # Paused: the step and its re-pack land between two engine steps. Otherwise the
                        # re-pack runs in the worker while the trainer computes the next step.
                        await self._publish(job, begin.trained, repacks, wait=req.pause)
                    finally:
                        if req.pause:
                            await self.engine_client.resume_generation()
                    job.losses.append(reply.loss)
                    if req.objective != "sft":
                        job.preference_steps.append({"chosen_logp": reply.chosen_logp,
                                                     "rejected_logp": reply.rejected_logp, "margin": reply.margin})
                    job.step_seconds.append(reply.seconds)
                    metrics.train_step(reply.seconds, reply.loss, reply.tokens)
                    job.weight_version = self._advance_version(reply.weight_version)
                success = not job.cancel_requested
            except TrainerError as exc:
                if exc.kind == "diverged":
                    job.rolled_back = False
                    job.error = f"{exc}; not rolled back: {begin.rollback_note or 'no copy was kept'}"
                raise
            finally:
                # The trainer saves its state while the last re-pack runs; the job ends once both are done.
                ending = asyncio.ensure_future(self._trainer_request(EndJob(success=success))) if self.trainer.alive() else None
                try:
                    await self._settle(repacks)
                finally:
                    if ending is not None:
                        end = await ending
                        job.weight_version = self._advance_version(end.weight_version)
                        if end.rolled_back:  # the restore wrote the weights: serve and publish them like a step
                            await self._publish(job, begin.trained, repacks, wait=True)
                            job.rolled_back = True
            if job.cancel_requested:
                self._cancelled(job)
            else:
                job.status = "succeeded"
        except TrainerError as exc:  # refused: nothing of that request changed (earlier steps stay)
            if exc.kind == "diverged":
                job.status, job.http_status = "diverged", HTTP_STATUS[exc.kind]
                self._diverged(job, str(exc))
            else:
                # a failure (out of memory, a bug) fails the job; a refusal before any step rejects it
                job.status = "rejected" if not job.losses and exc.kind not in ("out_of_memory", "internal") else "failed"
                job.error, job.http_status = str(exc), HTTP_STATUS[exc.kind]
        except TrainerUnavailable as exc:
            job.status, job.error, job.http_status = "failed", str(exc), 503
        finally:
            if self.trainer.state == "busy":
                self.trainer.state = "ready"

    async def _publish(self, job: TrainJob, trained: list[str], repacks: list[asyncio.Future], *,
                       wait: bool) -> None:
        """The trainer wrote the weights (a step, a rollback): the served kernels take them, and later
        requests never reuse KV computed before.

        On a CPU server with packed kernels the worker packs the stepped layers again (one engine round trip,
        run between two engine steps; round trips run in the order sent). With `wait` false the re-pack is
        left running in `repacks` and the caller goes on: the next step's forward and backward overlap it.
        If that step writes while the worker packs, the served copy mixes two steps until the next re-pack:
        the hogwild of a job without `pause`, as in-place serving has it. `_settle` waits for them."""
        if self.repack is not None:
            repack = asyncio.ensure_future(self.repack(trained))
            repack.add_done_callback(lambda done: None if done.cancelled() or done.exception() is not None
                                     else job.repack_seconds.append(done.result()["seconds"]))
            repacks.append(repack)
            if wait:
                await self._settle(repacks, publish=False)  # published below
        t0 = time.perf_counter()
        self.kv_generations.publish()
        job.publish_seconds.append(time.perf_counter() - t0)

    async def _settle(self, repacks: list[asyncio.Future], *, publish: bool = True) -> None:
        """Wait for the re-packs still running (the first failure is raised once all have ended). Then, with
        `publish`, publish again: a request admitted while a re-pack was running may have computed KV with
        the previous copy under the new generation, and nothing after the job may reuse it."""
        if not repacks:
            return
        waited = list(repacks)
        repacks.clear()
        results = await asyncio.gather(*waited, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
        if publish:
            self.kv_generations.publish()

    def _diverged(self, job: TrainJob, reason: str) -> None:
        if job.rolled_back:
            job.error = (f"{reason}; rolled back: the trained tensors and the optimizer state are those of the "
                         f"job's start (as weight version {job.weight_version})")
            return
        job.error = job.error or reason
        self.checkpoints_held = (f"the served weights come from {job.id}, which diverged and was not rolled back; "
                                 "scheduled and shutdown checkpoints are held until POST /checkpoint")
        job.error += f"; {self.checkpoints_held}"

    # ---- checkpoints ---------------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return self.weight_version is not None and self.weight_version != self.checkpointed_version

    def checkpoint_target(self, path: str | None) -> Path:
        """The checkpoint directory a request names: inside the configured directory, never outside (the
        trainer's sync_checkpoint checks the rest: not inside another checkpoint, names the OS accepts)."""
        root = self.checkpoint_dir.resolve()
        try:
            target = (root / (path or "main")).resolve()  # an absolute `path` replaces root: checked below
        except (OSError, ValueError) as exc:  # a NUL byte; names the OS refuses are checked by the trainer
            raise HTTPException(400, f"checkpoint path {str(path)[:80]!r}: {getattr(exc, 'strerror', None) or exc}") from None
        if not is_inside(target, root):
            raise HTTPException(400, f"checkpoint path {path!r} is not inside the checkpoint directory {root} "
                                     "(give a name or a path below it)")
        return target

    def _checkpoint_message(self, target: Path, replace: bool = False) -> Checkpoint:
        return Checkpoint(target=str(target), allowed_root=str(self.checkpoint_dir.resolve()),
                          allow_model_dir=self.allow_model_dir, weight_version=self.weight_version or 0,
                          max_names=self.checkpoint_max_names, replace=replace, config=self.process_config)

    @property
    def automatic_held(self) -> str | None:
        """Why the automatic checkpoints (quiet timer, shutdown) are not written now, or None."""
        return "; ".join(filter(None, (self.checkpoints_held, self.default_name_taken))) or None

    def _default_name_refused(self, error: str) -> None:
        self.default_name_taken = f"automatic checkpoints are skipped: {error}"
        print(f"plasticity: WARNING: {self.default_name_taken}", file=sys.stderr, flush=True)

    async def checkpoint(self, path: str | None = None, reason: str = "request", replace: bool = False) -> dict:
        target = self.checkpoint_target(path)
        default = target == self.checkpoint_target(None)
        async with self.trainer_lock:
            try:
                await self.trainer.ensure_started()
                written = await self.trainer.request(self._checkpoint_message(target, replace))
            except TrainerUnavailable as exc:
                metrics.checkpoint_failed()
                raise HTTPException(503, f"checkpoint not written: {exc}") from exc
            except TrainerError as exc:
                metrics.checkpoint_failed()
                if exc.kind == "other_model" and default:
                    self._default_name_refused(str(exc))
                raise HTTPException(HTTP_STATUS[exc.kind], f"checkpoint not written: {exc}") from None
        reply = written.model_dump()
        self.checkpointed_version = self._advance_version(written.weight_version)
        self.next_checkpoint_at = None
        self.last_checkpoint = {**reply, "reason": reason, "time": time.time()}
        self.checkpoint_totals["checkpoints"] += 1
        self.checkpoint_totals["bytes_written"] += written.bytes_written
        self.checkpoint_totals["seconds"] += written.seconds
        metrics.checkpoint_written(written.seconds, written.bytes_written)
        if reason == "request":  # asked for: these weights are the client's choice, automatic ones resume
            self.checkpoints_held = None
        if default:  # the default name holds this model's weights now
            self.default_name_taken = None
        return reply

    async def _checkpoint_scheduler(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            due = self.next_checkpoint_at is not None and time.time() >= self.next_checkpoint_at
            if due and self.dirty and self.current is None and self.queue.empty() and not self.automatic_held:
                try:
                    await self.checkpoint(reason="scheduled")
                except HTTPException as exc:  # reported in GET /checkpoint; retried after another quiet period
                    self.last_checkpoint = {"error": exc.detail, "reason": "scheduled", "time": time.time()}
                    self.next_checkpoint_at = time.time() + self.quiet_seconds

    def checkpoint_at_exit(self, timeout: float = 600.0) -> str | None:
        """Synchronous, for the API server's exit handler: write a checkpoint if training changed weights.

        Returns None when the weights on disk are the served ones (written now, or nothing to write), else
        the reason the trained weights were not written, which is also logged as an ERROR (a held
        checkpoint, which was asked for, only as a note): training since the last checkpoint is lost with
        this process, and the operator must learn it from the log rather than on the next start."""
        if not self.dirty:
            return None
        if self.automatic_held:
            print(f"plasticity: no checkpoint at exit: {self.automatic_held}", file=sys.stderr, flush=True)
            return self.automatic_held
        if self.current is not None:
            reason = f"job {self.current.id} was still running"
        elif not self.trainer.alive():
            reason = f"the trainer is not running ({self.trainer.last_error or self.trainer.state})"
        else:
            reason = self._exit_checkpoint(timeout)
        if reason is None:
            return None
        lost = f"weight version {self.weight_version} (last checkpoint: version {self.checkpointed_version})"
        print(f"plasticity: ERROR: no checkpoint at exit: {reason}; the trained weights of {lost} are not on disk",
              file=sys.stderr, flush=True)
        return reason

    def _exit_checkpoint(self, timeout: float) -> str | None:
        """Ask the trainer for a checkpoint of the default name over a blocking socket (the event loop is
        gone at exit); None when it was written, else why not."""
        import zmq

        from vllm_plasticity.contract.messages import decode_reply, encode

        ctx = zmq.Context()
        socks = []
        try:
            message = self._checkpoint_message(self.checkpoint_target(None))
            for endpoint in self.trainer.endpoints:  # every shard's trainer takes part (rank 0's reply counts)
                socks.append(ctx.socket(zmq.REQ))
                socks[-1].setsockopt(zmq.LINGER, 0)
                socks[-1].connect(endpoint)
                socks[-1].send(encode(message))
            deadline = time.monotonic() + timeout
            replies = []
            for sock in socks:
                if not sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                    return f"the trainer did not answer within {timeout:.0f}s"
                replies.append(sock.recv())
            written = decode_reply(message, replies[0])
        except TrainerError as exc:  # refused (another model's checkpoint, a full disk)
            return f"the trainer refused it ({exc.kind}): {exc}"
        except Exception as exc:  # the socket, a reply that is not one
            return f"{type(exc).__name__}: {exc}"
        finally:
            for sock in socks:
                sock.close()
            ctx.term()
        self.checkpointed_version = self._advance_version(written.weight_version)
        print(f"plasticity: checkpoint at exit: {written.path} (generation {written.generation}, weight version "
              f"{written.weight_version})", file=sys.stderr, flush=True)
        return None

    def checkpoint_status(self) -> dict:
        return {"directory": str(self.checkpoint_dir), "quiet_seconds": self.quiet_seconds, "dirty": self.dirty,
                "held": self.automatic_held, "max_names": self.checkpoint_max_names,
                "next_scheduled": self.next_checkpoint_at if self.dirty else None,
                "last": self.last_checkpoint, "totals": self.checkpoint_totals}

    def status(self) -> dict:
        t = self.trainer
        return {"trainer": {"state": t.state, "pid": t.pid, "pids": t.pids, "restarts": max(0, t.restarts - 1),
                            "last_error": t.last_error, "log": str(t.log_path)},
                "weight_version": self.weight_version,
                # what one request may ask (clients such as `plasticity train` size their batches by it)
                "limits": {**dataclasses.asdict(self.limits), "max_model_len": self.max_model_len},
                "current_job": self.current.id if self.current else None,
                "queue": [j.id for j in self.jobs.values() if j.status == "queued"],
                "recent_jobs": [j.summary() for j in reversed(self.jobs.values())][:10]}
