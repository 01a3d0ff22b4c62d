"""The trainer's protocol: typed requests and replies over one ZMQ REQ/REP socket.

Any process: the API server (trainer_client.py, training_service.py) sends requests; the trainer subprocess
(plasticity_training/trainer.py) answers one at a time. A job is driven step by step, so the server can
pause generation, reset the prefix cache, take a checkpoint or stop a cancelled job between steps:

    Ping                                  -> Status
    BeginJob(samples, objective, preference, optimizer, params, force, context_mode, weight_version,
             rollback)                    -> JobBegun
    Step                                  -> StepDone       (one optimizer step, in place)
    EndJob(success)                       -> JobEnded       (state saved; a diverged job rolled back)
    Checkpoint(target, allowed_root, allow_model_dir, weight_version, max_names, replace, config)
                                          -> CheckpointWritten
    Shutdown                              -> Acknowledged   (state saved, the trainer exits)

On the wire: the request's JSON (its `op` names the type); the reply is {"ok": true, "reply": {...}} or
{"ok": false, "kind": ERROR_KIND, "error": "reason"}. The trainer knows no HTTP: a failure carries a
kind, and the API server alone maps kinds to status codes (training_service.HTTP_STATUS).

    >>> wire = encode(Step())
    >>> decode_request(wire)
    Step(op='step')
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from vllm_plasticity.contract.settings import (
    ContextMode, Objective, OptimizerSettings, ParamsFilter, PreferenceSample, PreferenceSettings, Sample, Strict)

# What went wrong, as the trainer sees it:
#   invalid        the request cannot be done as asked (a filter that selects nothing, a bad path)
#   conflict       it clashes with state (optimizer shape fixed, a job already open, a concurrent writer)
#   rejected       the step was computed and refused: non-finite loss, gradients or updated weights
#   diverged       the job's loss diverged (training/plasticity_training/divergence.py); the step not taken
#   out_of_memory  the trainer ran out of memory beside vLLM (nothing changed)
#   disk_full      the checkpoint ran out of disk, or would (free space, the limit on checkpoint names);
#                  the previous checkpoint intact
#   other_model    the checkpoint named holds another model's weights (its recorded origin differs) and
#                  replace was not asked; nothing written
#   internal       a bug or an unexpected state
ErrorKind = Literal["invalid", "conflict", "rejected", "diverged", "out_of_memory", "disk_full", "other_model",
                    "internal"]


class TrainerError(Exception):
    """A request the trainer refused or failed; `kind` says which way (see ErrorKind)."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# ---- requests -------------------------------------------------------------------------------------


class Ping(Strict):
    op: Literal["ping"] = "ping"


class BeginJob(Strict):
    op: Literal["begin_job"] = "begin_job"
    samples: list[Sample] | list[PreferenceSample]  # Sample for sft, PreferenceSample for orpo and dpo
    objective: Objective = "sft"
    preference: PreferenceSettings = PreferenceSettings()
    optimizer: OptimizerSettings = OptimizerSettings()
    params: ParamsFilter = ParamsFilter()
    force: bool = False  # train samples already trained on
    context_mode: ContextMode = "masked"
    weight_version: int = 0  # the server's: a restarted trainer adopts it (versions never count backwards)
    rollback: bool | None = None  # keep a copy to undo a diverged job: True always, None where it fits, False never


class Step(Strict):
    op: Literal["step"] = "step"


class EndJob(Strict):
    op: Literal["end_job"] = "end_job"
    success: bool = True  # record the job's samples as trained (dedup)


class Checkpoint(Strict):
    op: Literal["checkpoint"] = "checkpoint"
    target: str
    allowed_root: str
    allow_model_dir: bool = False
    weight_version: int = 0
    max_names: int | None = None  # checkpoints allowed under allowed_root (a new name beyond it: disk_full)
    replace: bool = False  # overwrite the checkpoint of another model (else: other_model)
    config: dict = {}  # the API server's process config (PlasticityConfig.as_json), saved with the weights


class Shutdown(Strict):
    op: Literal["shutdown"] = "shutdown"


Request = Annotated[Ping | BeginJob | Step | EndJob | Checkpoint | Shutdown, Field(discriminator="op")]
_requests = TypeAdapter(Request)


# ---- replies --------------------------------------------------------------------------------------


class Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Status(Reply):
    pid: int
    weight_version: int
    total_steps: int
    total_jobs: int
    trained_samples: int
    optimizer_state_bytes: int
    restored_from: str | None


class JobBegun(Reply):
    samples: int  # samples that will train (duplicates skipped)
    tokens: int  # continuation tokens the loss is on
    skipped_duplicates: int
    skipped_zero_weight: int = 0
    parameters: int  # parameter tensors the filter selected
    trained: list[str] = []  # their names (the server packs their layers again after each step on CPU)
    rollback_bytes: int = 0  # host memory of the copy kept to undo the job if it diverges (0: none kept)
    rollback_note: str | None = None  # why no copy was kept


class StepDone(Reply):
    loss: float | None  # None when every sample was a duplicate
    tokens: int
    weight_version: int
    seconds: float  # forward, backward and optimizer
    chosen_logp: float | None = None  # orpo, dpo: mean over samples of log p(chosen | context), before the step
    rejected_logp: float | None = None
    margin: float | None = None  # dpo: implicit reward margin; orpo: log odds ratio (sample means)


class JobEnded(Reply):
    weight_version: int
    rolled_back: bool = False  # a diverged job's trained tensors and optimizer state restored to its start


class CheckpointWritten(Reply):
    path: str
    generation: int
    bytes_written: int
    weight_bytes_written: int
    blocks_changed: int
    blocks_total: int
    seconds: float
    full_rewrite: bool
    weight_version: int


class Acknowledged(Reply):
    pass


REPLY_TYPE: dict[type, type[Reply]] = {Ping: Status, BeginJob: JobBegun, Step: StepDone, EndJob: JobEnded,
                                       Checkpoint: CheckpointWritten, Shutdown: Acknowledged}


# ---- the wire -------------------------------------------------------------------------------------


def encode(message: Strict) -> bytes:
    return message.model_dump_json().encode()


def decode_request(data: bytes) -> Ping | BeginJob | Step | EndJob | Checkpoint | Shutdown:
    """The typed request; pydantic's ValidationError for anything else."""
    return _requests.validate_json(data)


def encode_reply(reply: Reply | TrainerError) -> bytes:
    if isinstance(reply, TrainerError):
        return json.dumps({"ok": False, "kind": reply.kind, "error": str(reply)}).encode()
    return json.dumps({"ok": True, "reply": reply.model_dump(mode="json")}).encode()


def decode_reply(request: Strict, data: bytes) -> Reply:
    """The typed reply to `request`; raises TrainerError for a failure."""
    envelope = json.loads(data)
    if not envelope["ok"]:
        raise TrainerError(envelope["kind"], envelope["error"])
    return REPLY_TYPE[type(request)].model_validate(envelope["reply"])
