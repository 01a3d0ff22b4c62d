"""HTTP routes on vLLM's own port: the `vllm.endpoint_plugins` entry point.

Runs in the API server process. vLLM loads this plugin only when `VLLM_PLUGINS` names "plasticity"
(`plasticity serve` sets it). `attach_router` adds the routes; `init_state` builds the one
`ServerState` object the routes share and asks the worker what it serves. Readout and steering routes
(and the wrapped completion routes) live in readout_routes.py.

vLLM's own `--api-key` middleware guards only /v1-style paths, so every route here depends on
`require_api_key`, which checks the same keys (`--api-key` / VLLM_API_KEY) the same way.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import math
import os
import secrets
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request

from vllm_plasticity import __version__, chat_convert, metrics
from vllm_plasticity.chat_convert import ConvertRequest
from vllm_plasticity.config import PlasticityConfig, process_config
from vllm_plasticity.contract.files import write_atomically
from vllm_plasticity.api_processes import ApiProcesses, ForwardToOwner, exit_checkpoint_warning
from vllm_plasticity.kv_generations import KVGenerations
from vllm_plasticity.readout_routes import WRAPPED_COMPLETION_PATHS, attach_readout_routes
from vllm_plasticity.readout_service import ReadoutService
from vllm_plasticity.ui_routes import attach_ui_routes
from vllm_plasticity.training_service import CheckpointRequest, TrainingService, TrainRequest
from vllm_plasticity.trainer_client import TrainerClient
from vllm_plasticity.trainer_group import TrainerGroup
from vllm_plasticity.shm_ledger import record_shm_files, release_own_files, sweep_dead_servers
from vllm_plasticity.contract.weights import sweep_stale_arenas

router = APIRouter(tags=["plasticity"])


@functools.cache
def stored_parameter_count(model_path: str) -> int | None:
    """Elements in the served model directory's safetensors files (headers only): the model's size
    whatever the tensor-parallel size or vLLM's CPU kernel packing (which empties the worker's weight
    tensors), so /plasticity/info does not count one shard, or nothing. None: not a local directory of
    safetensors (the worker's own count is used)."""
    from safetensors import safe_open

    files = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    total = 0
    for file in files:
        with safe_open(str(file), "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total or None


def trainable_architectures() -> str:
    """The architectures a training server takes, for refusal messages: every row of the architecture table
    (a stock one by the name its checkpoints carry), so the project's own architectures are named too."""
    from vllm_plasticity.contract.architectures import served_names

    return served_names()


class ServerState:
    """Everything the plasticity routes share, created once per API server process (with several, only the
    owner's is more than its place among them: api_processes.py)."""

    def __init__(self, engine_client: Any, args: Namespace, config: PlasticityConfig, app: FastAPI | None = None) -> None:
        self.engine_client = engine_client
        self.args = args
        self.config = config
        self.app = app
        self.processes = ApiProcesses.one()
        self.model_path: str = str(getattr(args, "model", ""))
        keys = getattr(args, "api_key", None) or os.environ.get("VLLM_API_KEY")
        keys = [keys] if isinstance(keys, str) else list(keys or [])
        self.api_key_hashes = [hashlib.sha256(k.encode()).digest() for k in keys]
        self.worker_info: dict = {}
        self.weight_manifest: dict | None = None  # rank 0's
        self.weight_manifest_path = None
        self.shard_manifests: list[dict] = []  # every rank's, in rank order (one at tensor-parallel size 1)
        self.shard_manifest_paths: list[Path] = []
        self.training: TrainingService | None = None
        self.training_unavailable: str | None = None
        self.readout: ReadoutService | None = None

    async def rpc(self, method: str, *args: Any) -> Any:
        """Call a worker-extension verb on every worker and return rank 0's result."""
        return (await self.rpc_all(method, *args))[0]

    async def rpc_all(self, method: str, *args: Any) -> list:
        """Call a worker-extension verb on every worker: their results in rank order."""
        if self.engine_client is None:
            raise HTTPException(503, "no engine: this server has no model to act on")
        return list(await self.engine_client.collective_rpc(method, args=args))

    async def start(self) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.processes = ApiProcesses.join(self.config.state_dir, getattr(self.args, "api_server_count", None))
        atexit.register(self.processes.close)
        if self.processes.forwards:  # another process of this server owns the trainer, the banks, the steering
            if self.config.training:  # ... but the requests this one admits are salted with the weights' generation
                KVGenerations.install(self.engine_client, self.processes.words)
            return
        try:
            await self._start_owner()
        finally:
            if self.processes.address and self.app is not None:  # the others forward here from now on
                await self.processes.serve_owner_socket(self.app)

    async def _start_owner(self) -> None:
        # Labelled with the model name vLLM's own series carry (ModelConfig.served_model_name).
        metrics.install(getattr(getattr(self.engine_client, "model_config", None), "served_model_name", None)
                        or self.model_path)
        sweep_stale_arenas()
        sweep_dead_servers(self.config.state_dir)  # what a SIGKILLed server of this state dir left in /dev/shm
        # vLLM's processes are up (init_state runs after the engine starts): note what they hold in /dev/shm.
        ledger = record_shm_files(self.config.state_dir, self.processes.server_pid)
        atexit.register(release_own_files, ledger)  # a clean exit leaves nothing for a sweep (runs last: LIFO)
        try:
            self.worker_info = await self.rpc("plasticity_info")
        except Exception as exc:  # vLLM started without our --worker-extension-cls
            self.worker_info = {"error": f"worker extension unavailable: {exc}"}
            return
        self.readout = ReadoutService(self)
        if self.config.share_weights:
            manifests = await self.rpc_all("plasticity_weight_manifest")
            if all(m is not None for m in manifests):
                self.shard_manifests = manifests
                for manifest in manifests:  # one per worker: its pid names it
                    path = self.config.state_dir / f"weights-{manifest['pid']}.json"
                    write_atomically(path, json.dumps(manifest))
                    self.shard_manifest_paths.append(path)
                self.weight_manifest, self.weight_manifest_path = manifests[0], self.shard_manifest_paths[0]
            # vLLM's workers do not always run their exit handlers on shutdown; the API server does
            # (uvicorn handles SIGTERM/SIGINT), so it removes the shared files it was told about.
            atexit.register(self.remove_shared_files)
        if self.config.training:
            self._start_training()
            warning = exit_checkpoint_warning(self.processes, getattr(self.args, "shutdown_timeout", None))
            if warning:
                print(f"plasticity: WARNING: {warning}", file=sys.stderr, flush=True)

    def _start_training(self) -> None:
        if self.weight_manifest_path is None:
            self.training_unavailable = (f"training needs weights shared in place, and {self.worker_info.get('architecture')} "
                                         f"does not share them (serve one of {trainable_architectures()} with "
                                         "plasticity serve)")
            return
        model_config = self.engine_client.model_config
        if len(self.shard_manifest_paths) > 1:  # one trainer per shard (trainer_group.py)
            trainer = TrainerGroup(self.config.state_dir, self.shard_manifest_paths, self.model_path)
        else:
            trainer = TrainerClient(self.config.state_dir, self.weight_manifest_path, self.model_path)
        atexit.register(trainer.kill)  # the trainer is our child: stopped by PID with the server
        self.training = TrainingService(self.engine_client, trainer, model_config.get_vocab_size(),
                                        model_config.max_model_len, self.config.resolved_checkpoint_dir,
                                        self.config.checkpoint_quiet_seconds, self.config.checkpoint_into_model_dir,
                                        self.config.train_limits,
                                        [t["name"] for t in self.weight_manifest["tensors"]],
                                        repack=(lambda trained: self.rpc("plasticity_repack", trained))
                                        if self.worker_info.get("repacked_after_step") else None,
                                        checkpoint_max_names=self.config.checkpoint_max_names,
                                        process_config=self.config.as_json(), shared_words=self.processes.words)
        atexit.register(self.training.checkpoint_at_exit)  # runs before trainer.kill (atexit is LIFO)
        self.training.start()

    def remove_shared_files(self) -> None:
        for manifest, manifest_path in zip(self.shard_manifests, self.shard_manifest_paths):
            for path in (manifest.get("arena"), manifest_path):
                if path:
                    Path(path).unlink(missing_ok=True)


def get_state(request: Request) -> ServerState:
    state = getattr(request.app.state, "plasticity", None)
    if state is None:
        raise HTTPException(503, "plasticity is not initialised yet")
    return state


def require_api_key(request: Request, state: ServerState = Depends(get_state)) -> ServerState:
    """401 unless the request carries one of the server's API keys (when it has any)."""
    if state.api_key_hashes:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.encode()).digest()
        if scheme.lower() != "bearer" or not any(secrets.compare_digest(digest, h) for h in state.api_key_hashes):
            raise HTTPException(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")
    return state


def require_training(state: ServerState = Depends(require_api_key)) -> TrainingService:
    if not state.config.training:
        raise HTTPException(403, "training is disabled on this server: start it with `plasticity serve --training` "
                                 "(or PLASTICITY_TRAINING=1)")
    if state.training is None:
        raise HTTPException(503, state.training_unavailable or "training is not available")
    return state.training


@router.post("/train")
async def train(req: TrainRequest, training: TrainingService = Depends(require_training)) -> dict:
    """Train the served model in place on token IDs.

    Body: {"samples": [{"context_ids": [...], "continuation_ids": [...], "weight": 1}], "steps": 1,
    "optimizer": {...}, "params": {...}, "force": false, "wait": true, "pause": false, "context_mode": "masked"},
    or the single-sample shorthand {"context_ids": [...], "continuation_ids": [...]}; with "objective": "dpo" or
    "orpo", samples are {"context_ids", "chosen_ids", "rejected_ids"} (and "beta" / "lambda" may be set).
    """
    try:
        training.validate(req)
    except HTTPException:
        metrics.job_ended("refused")
        raise
    job = training.submit(req)
    if not req.wait:
        return job.summary()
    await job.done.wait()
    if job.http_status >= 400:
        raise HTTPException(job.http_status, f"{job.id}: {job.error}")
    return job.summary()


@router.post("/train/convert")
async def convert_chat(req: ConvertRequest, request: Request, state: ServerState = Depends(require_api_key)) -> dict:
    """OpenAI fine-tuning lines (chat or preference) -> the /train samples they make with the served chat
    template, the conversion `plasticity train` runs (chat_convert.py). Trains nothing; a training server's
    limits (tokens per request, model length) are checked so the samples can be sent as they are."""
    training = require_training(state)
    return await chat_convert.convert(request.app, req, state.model_path, training.max_model_len, training.limits.max_tokens,
                                      request.headers.get("authorization"))


@router.get("/train/status")
async def train_status(training: TrainingService = Depends(require_training)) -> dict:
    """Trainer state (starting, ready, busy, failed, stopped), weight version, queue and recent jobs."""
    return training.status()


@router.get("/train/status/{job_id}")
async def train_job_status(job_id: str, training: TrainingService = Depends(require_training)) -> dict:
    """One job: loss per step, timings, outcome."""
    job = training.jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r} (the server keeps the most recent jobs only)")
    return job.detail()


@router.delete("/train/{job_id}")
async def cancel_train_job(job_id: str, training: TrainingService = Depends(require_training)) -> dict:
    """Cancel a job: a queued one never runs; a running one stops before its next step (steps already
    taken stay, each one whole). 404 for an unknown job, 409 for one that has ended."""
    return training.cancel(job_id)


@router.post("/checkpoint")
async def write_checkpoint(req: CheckpointRequest | None = None, training: TrainingService = Depends(require_training)) -> dict:
    """Write the live weights (HF safetensors, block-level diff), optimizer and trainer state, atomically.

    Answers {"path", "bytes_written", "blocks_changed", "blocks_total", "seconds", "weight_version", ...};
    `path` (the `current` link of the checkpoint) loads in transformers and in `plasticity serve`.
    A name that holds another model's checkpoint is refused with 409 unless the body says "replace": true.
    """
    return await training.checkpoint(req.path if req else None, replace=req.replace if req else False)


@router.get("/checkpoint")
async def checkpoint_status(training: TrainingService = Depends(require_training)) -> dict:
    """The last checkpoint, the next scheduled one, and totals."""
    return training.checkpoint_status()


@router.get("/plasticity/info")
async def info(state: ServerState = Depends(require_api_key)) -> dict:
    """Plugin version, what is served, and which features this server has enabled."""
    return {
        "version": __version__,
        "model": state.model_path,
        **{k: state.worker_info.get(k) for k in ("architecture", "dtype", "device")},
        "num_parameters": stored_parameter_count(state.model_path) or state.worker_info.get("num_parameters"),
        "plasticity_architecture": bool(state.worker_info.get("plasticity_architecture")),
        "weights_shareable": bool(state.worker_info.get("weights_shareable")),
        "weights_in_place": bool(state.worker_info.get("weights_in_place")),
        "repacked_after_step": bool(state.worker_info.get("repacked_after_step")),
        "weight_manifest": str(state.weight_manifest_path) if state.weight_manifest_path else None,
        "shard_manifests": [str(p) for p in state.shard_manifest_paths],  # rank order: one per worker
        "features": state.config.features(),
        "readout": state.worker_info.get("readout"),
        "state_dir": str(state.config.state_dir),
        **({"error": state.worker_info["error"]} if "error" in state.worker_info else {}),
    }


class PlasticityEndpoints:
    """The `vllm.endpoint_plugins` factory vLLM instantiates (see vllm/plugins/endpoint_plugins)."""

    name = "plasticity"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        self.app = app  # the owner of several API server processes serves it on its socket too
        app.include_router(router)
        ui_router = APIRouter(tags=["plasticity"])
        attach_ui_routes(ui_router)
        app.include_router(ui_router)
        readout_router = APIRouter(tags=["plasticity"])  # per app: it wraps this app's completion routes
        attach_readout_routes(app, readout_router, require_api_key)
        app.include_router(readout_router)
        # The plugin's own routes go to the owner from the other processes; the wrapped completion routes
        # decide per request (readout_routes.call_with_readout).
        own = [r for r in (*router.routes, *ui_router.routes, *readout_router.routes)
               if getattr(r, "path", None) not in WRAPPED_COMPLETION_PATHS]
        app.add_middleware(ForwardToOwner, routes=own)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        server = ServerState(engine_client, args, process_config(), getattr(self, "app", None))
        state.plasticity = server
        await server.start()
