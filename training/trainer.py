"""The training subprocess: APOLLO steps on a Hugging Face view of vLLM's live weights, served over ZMQ.

Runs in its own process, started by the API server (vllm_plasticity.trainer_client) as

    python -m plasticity_training.trainer --endpoint ipc:///.../trainer.sock --manifest weights.json \
        --model-path MODEL --state-dir DIR

It maps the worker's weights (weight manifest), builds the HF model on views of them (hf_view.py) and
answers one JSON request at a time on a ZMQ REP socket. A job is driven step by step by the server, so
the server can pause generation, reset the prefix cache and report progress between steps:

    {"op": "ping"}                                   -> {"ok": true, "pid", "weight_version", ...}
    {"op": "begin_job", "samples": [...], "optimizer": {...}, "params": {...}, "force": false,
     "context_mode": "masked"|"no_grad"}             -> {"ok", "samples", "tokens", "skipped_duplicates"}
    {"op": "step"}                                   -> {"ok", "loss", "tokens", "weight_version", "seconds"}
    {"op": "end_job", "success": true}               -> {"ok", "weight_version"}   (state saved here)
    {"op": "logprobs", "input_ids": [...]}           -> {"ok", "logprobs": [...]}
    {"op": "checkpoint", "target": DIR, "allowed_root": DIR, "allow_model_dir": false}
                                                     -> {"ok", "path", "bytes_written", "blocks_changed", ...}
    {"op": "save_state"} / {"op": "shutdown"}
Errors: {"ok": false, "status": 4xx/5xx, "error": "reason"}; a rejected step changes no weight.

State files in --state-dir (written atomically: temp file, fsync, rename):
    trainer_state.json        weight version, step and job counts, hashes of trained samples (dedup)
    optimizer.safetensors     APOLLO state keyed by parameter name ("<name>::<key>")
Both are also saved inside every checkpoint (checkpoint.py), and restored from it when the served model
is a checkpoint: weights and optimizer state then always come from the same moment.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from plasticity_training import checkpoint as ckpt
from plasticity_training.apollo import Apollo, NonFiniteGradientError, NonFiniteUpdateError, flatten_state, unflatten_state
from plasticity_training.hf_view import build_hf_view, token_logprobs

# Settings that fix the optimizer state's shapes: a job may not change them once state exists.
SHAPE_SETTINGS = ("rank", "mini")
OPTIMIZER_DEFAULTS = dict(lr=1e-5, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, warmup_steps=0, rank=64,
                          scale=1.0, proj_refresh=200, norm_growth_limit=1.01, mini=False, grad_clip=1.0)
PARAM_KINDS = ("attention", "mlp", "embeddings", "norms")


class JobError(Exception):
    """A request the trainer refuses; `status` is the HTTP status the server answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def sample_hash(context_ids: list[int], continuation_ids: list[int]) -> str:
    blob = json.dumps([context_ids, continuation_ids], separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def param_kind(hf_name: str) -> str:
    """attention, mlp, embeddings or norms, for an HF Llama/Qwen parameter name."""
    if "embed_tokens" in hf_name or hf_name.startswith("lm_head"):
        return "embeddings"
    if "norm" in hf_name:  # input/post-attention norms, q_norm/k_norm, the final norm
        return "norms"
    if ".self_attn." in hf_name:
        return "attention"
    if ".mlp." in hf_name:
        return "mlp"
    raise ValueError(f"unclassified parameter {hf_name!r}")


def layer_index(hf_name: str) -> int | None:
    parts = hf_name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[:2] == ["model", "layers"] else None


def select_params(names: list[str], spec: dict) -> list[str]:
    """The parameter names a `params` filter selects.

    spec: {"layers": [first, last] (inclusive) or null, "attention": bool, "mlp": bool,
    "embeddings": bool, "norms": bool}; everything by default. With a layer range only parameters
    inside those decoder layers are candidates (embeddings and the final norm are outside any layer).
    """
    layers = spec.get("layers")
    chosen = []
    for name in names:
        if not spec.get(param_kind(name), True):
            continue
        if layers is not None:
            idx = layer_index(name)
            if idx is None or not layers[0] <= idx <= layers[1]:
                continue
        chosen.append(name)
    return chosen


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclasses.dataclass
class TrainerState:
    weight_version: int = 0
    total_steps: int = 0
    total_jobs: int = 0
    total_tokens: int = 0
    trained: list[str] = dataclasses.field(default_factory=list)  # sample hashes, in training order
    optimizer_settings: dict | None = None  # the shape settings the saved optimizer state was made with
    checkpoints: int = 0

    @classmethod
    def load(cls, path: Path) -> "TrainerState":
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def save(self, path: Path) -> None:
        _atomic_write(path, lambda p: p.write_text(json.dumps(dataclasses.asdict(self))))


class TrainerCore:
    """The trainer's logic without the socket: one HF view, one optimizer, one job at a time."""

    def __init__(self, model_path: str | Path, weights: dict[str, torch.Tensor], state_dir: str | Path) -> None:
        self.model_path = Path(model_path)
        self.model = build_hf_view(model_path, weights)
        self.vocab_size = self.model.config.vocab_size
        self.pad_id = self.model.config.pad_token_id or 0
        self.named = dict(self.model.named_parameters())  # tied weights appear once
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.restored_from = self._restore_from_checkpoint()
        self.state = TrainerState.load(self.state_dir / "trainer_state.json")
        self.trained = set(self.state.trained)
        self.optimizer: Apollo | None = None
        self.job: dict | None = None

    def _restore_from_checkpoint(self) -> str | None:
        """Serving a checkpoint: its trainer and optimizer state replace the state directory's.

        The weights being served are the checkpoint's, so state from any other moment would disagree with
        them; files it replaces are kept as *.before-restore.
        """
        try:
            files = ckpt.load_checkpoint_state(self.model_path)
        except ckpt.CheckpointError:
            return None  # not a plasticity checkpoint: keep the state directory's own state
        marker = self.state_dir / "restored_from.json"
        generation = str(ckpt.resolve_checkpoint(self.model_path))
        if marker.exists() and json.loads(marker.read_text()).get("generation") == generation:
            return generation  # restored before; later state in the state dir is newer than the checkpoint
        for name in ("trainer_state.json", "optimizer.safetensors"):
            path = self.state_dir / name
            if path.exists():
                os.replace(path, path.with_name(name + ".before-restore"))
            if name in files:
                _atomic_write(path, lambda p, data=files[name]: p.write_bytes(data))
        _atomic_write(marker, lambda p: p.write_text(json.dumps({"generation": generation})))
        return generation

    # ---- optimizer ---------------------------------------------------------------------------
    def _ensure_optimizer(self, settings: dict) -> Apollo:
        shape = {k: settings[k] for k in SHAPE_SETTINGS}
        saved = self.state.optimizer_settings
        if self.optimizer is None:
            if saved is not None and saved != shape:
                raise JobError(409, f"optimizer state exists with {saved}; this job asks {shape} "
                                    "(rank and mini are fixed once state exists)")
            self.optimizer = Apollo(list(self.named.items()), **settings)
            path = self.state_dir / "optimizer.safetensors"
            if path.exists():
                from safetensors.torch import load_file

                self.optimizer.load_named_state_dict(unflatten_state(load_file(path)))
            self.state.optimizer_settings = shape
        elif saved != shape:
            raise JobError(409, f"optimizer state exists with {saved}; this job asks {shape} "
                                "(rank and mini are fixed once state exists)")
        else:
            for group in self.optimizer.param_groups:  # per-job settings: lr, betas, ...
                group.update({k: v for k, v in settings.items() if k not in ("grad_clip", "seed")})
            self.optimizer.grad_clip = settings.get("grad_clip")
        return self.optimizer

    # ---- jobs ------------------------------------------------------------------------------------
    def begin_job(self, samples: list[dict], optimizer: dict | None = None, params: dict | None = None,
                  force: bool = False, context_mode: str = "masked", weight_version: int = 0) -> dict:
        if self.job is not None:
            raise JobError(409, "a job is already running in the trainer")
        if context_mode not in ("masked", "no_grad"):
            raise JobError(400, f"context_mode must be 'masked' or 'no_grad', not {context_mode!r}")
        max_len = self.model.config.max_position_embeddings
        for i, s in enumerate(samples):
            ids = s["context_ids"] + s["continuation_ids"]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise JobError(400, f"samples[{i}]: token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
            if len(ids) > max_len:
                raise JobError(400, f"samples[{i}]: {len(ids)} tokens exceed the model's maximum length {max_len}")
        # A trainer killed mid-job stepped past its last saved version: never count backwards.
        self.state.weight_version = max(self.state.weight_version, weight_version)
        selected = select_params(list(self.named), params or {})
        if not selected:
            raise JobError(400, f"the params filter {params} selects no parameter")
        settings = {**OPTIMIZER_DEFAULTS, **(optimizer or {})}
        try:
            self._ensure_optimizer(settings)
        except ValueError as exc:  # Apollo's own validation
            raise JobError(400, str(exc)) from exc

        hashes = [sample_hash(s["context_ids"], s["continuation_ids"]) for s in samples]
        keep = [s for s, h in zip(samples, hashes) if force or h not in self.trained]
        selected_set = set(selected)
        for name, p in self.named.items():
            p.requires_grad_(name in selected_set)
        self.job = {"samples": keep, "hashes": [h for s, h in zip(samples, hashes) if force or h not in self.trained],
                    "context_mode": context_mode, "tokens": sum(len(s["continuation_ids"]) for s in keep)}
        return {"samples": len(keep), "tokens": self.job["tokens"], "skipped_duplicates": len(samples) - len(keep),
                "parameters": len(selected)}

    def _loss(self, samples: list[dict], context_mode: str) -> torch.Tensor:
        """Mean cross-entropy over all continuation tokens; the context only conditions."""
        n_tokens = sum(len(s["continuation_ids"]) for s in samples)
        if context_mode == "no_grad":
            total = 0.0
            for s in samples:  # the context's keys/values computed without a graph (truncated gradient)
                ctx = torch.tensor([s["context_ids"]])  # (1, C)
                cont = torch.tensor([s["continuation_ids"]])  # (1, K)
                with torch.no_grad():
                    out = self.model(input_ids=ctx, use_cache=True)
                logits = self.model(input_ids=cont, past_key_values=out.past_key_values).logits  # (1, K, V)
                # The first continuation token is predicted by the context's last position.
                first = out.logits[:, -1:].detach()
                all_logits = torch.cat([first, logits[:, :-1]], dim=1)  # (1, K, V)
                total = total + torch.nn.functional.cross_entropy(all_logits[0].float(), cont[0], reduction="sum")
            return total / n_tokens
        # masked: one padded batch; labels are -100 on the context and the padding (exact gradient).
        seqs = [s["context_ids"] + s["continuation_ids"] for s in samples]
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(seqs), T), -100, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, (s, seq) in enumerate(zip(samples, seqs)):
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
            labels[b, len(s["context_ids"]) : len(seq)] = torch.tensor(s["continuation_ids"])
        logits = self.model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                 ignore_index=-100, reduction="sum") / n_tokens

    def step(self) -> dict:
        """One forward/backward/APOLLO step on the job's samples, applied in place to vLLM's weights."""
        if self.job is None:
            raise JobError(409, "no job: send begin_job first")
        if not self.job["samples"]:
            return {"loss": None, "tokens": 0, "weight_version": self.state.weight_version, "seconds": 0.0}
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(self.job["samples"], self.job["context_mode"])
        if not torch.isfinite(loss):
            raise JobError(422, f"non-finite loss ({loss.item()}); step rejected, weights unchanged")
        loss.backward()
        try:
            self.optimizer.step()  # checks every gradient and every updated value before it touches any weight
        except (NonFiniteGradientError, NonFiniteUpdateError) as exc:
            self.optimizer.zero_grad(set_to_none=True)
            raise JobError(422, f"{exc}; step rejected, weights unchanged") from exc
        self.optimizer.zero_grad(set_to_none=True)
        self.state.weight_version += 1
        self.state.total_steps += 1
        return {"loss": loss.item(), "tokens": self.job["tokens"], "weight_version": self.state.weight_version,
                "seconds": time.perf_counter() - t0}

    def end_job(self, success: bool = True) -> dict:
        job, self.job = self.job, None
        if job is not None and success:
            self.state.total_jobs += 1
            self.state.total_tokens += job["tokens"]
            for h in job["hashes"]:
                if h not in self.trained:
                    self.trained.add(h)
                    self.state.trained.append(h)
        self.save_state()
        return {"weight_version": self.state.weight_version}

    def save_state(self) -> None:
        if self.optimizer is not None:
            from safetensors.torch import save_file

            flat = {k: v.contiguous().cpu() for k, v in flatten_state(self.optimizer.named_state_dict()).items()}
            _atomic_write(self.state_dir / "optimizer.safetensors", lambda p: save_file(flat, str(p)))
        self.state.save(self.state_dir / "trainer_state.json")

    def checkpoint(self, target: str, allowed_root: str, allow_model_dir: bool = False, weight_version: int = 0) -> dict:
        """Write the live weights, trainer state and optimizer state as the next checkpoint generation.

        Allowed between two steps of a job (the server sends requests one at a time, so the weights are
        those of one whole version). `weight_version` is the server's: a trainer restarted from older saved
        state adopts it, so a checkpoint is never labelled with a version older than its weights.
        """
        self.state.weight_version = max(self.state.weight_version, weight_version)
        self.save_state()
        extra = {name: self.state_dir / name for name in ("trainer_state.json", "optimizer.safetensors")
                 if (self.state_dir / name).exists()}
        try:
            report = ckpt.sync_checkpoint(ckpt.hf_tensors(self.model), target, self.model_path, extra_files=extra,
                                          allowed_root=allowed_root, allow_model_dir=allow_model_dir)
        except ckpt.CheckpointPathError as exc:
            raise JobError(400, str(exc)) from exc
        except ckpt.CheckpointBusyError as exc:
            raise JobError(409, str(exc)) from exc
        except ckpt.CheckpointDiskFullError as exc:
            raise JobError(507, str(exc)) from exc
        except ckpt.CheckpointError as exc:
            raise JobError(500, str(exc)) from exc
        self.state.checkpoints += 1
        self.state.save(self.state_dir / "trainer_state.json")
        return {"path": str(report.path), "generation": report.generation, "bytes_written": report.bytes_written,
                "weight_bytes_written": report.weight_bytes_written, "blocks_changed": report.blocks_changed,
                "blocks_total": report.blocks_total, "seconds": report.seconds, "full_rewrite": report.full_rewrite,
                "weight_version": self.state.weight_version}

    def status(self) -> dict:
        return {"pid": os.getpid(), "weight_version": self.state.weight_version, "total_steps": self.state.total_steps,
                "total_jobs": self.state.total_jobs, "trained_samples": len(self.trained),
                "optimizer_state_bytes": self.optimizer.state_bytes() if self.optimizer else 0,
                "restored_from": self.restored_from}

    def handle(self, msg: dict) -> dict:
        op = msg.get("op")
        if op == "ping":
            return self.status()
        if op == "begin_job":
            return self.begin_job(msg["samples"], msg.get("optimizer"), msg.get("params"), bool(msg.get("force")),
                                  msg.get("context_mode", "masked"), int(msg.get("weight_version") or 0))
        if op == "step":
            return self.step()
        if op == "end_job":
            return self.end_job(bool(msg.get("success", True)))
        if op == "logprobs":
            return {"logprobs": token_logprobs(self.model, msg["input_ids"])}
        if op == "checkpoint":
            return self.checkpoint(msg["target"], msg["allowed_root"], bool(msg.get("allow_model_dir")),
                                   int(msg.get("weight_version") or 0))
        if op == "save_state":
            self.save_state()
            return self.status()
        raise JobError(400, f"unknown op {op!r}")


def serve(core: TrainerCore, endpoint: str) -> None:
    """Answer requests on `endpoint` until a shutdown request (or the parent disappears)."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    parent = os.getppid()
    try:
        while True:
            if not sock.poll(1000):
                if os.getppid() != parent:  # the API server died: do not linger as an orphan
                    return
                continue
            msg = json.loads(sock.recv())
            if msg.get("op") == "shutdown":
                if core.job is not None:
                    core.end_job(success=False)
                core.save_state()
                sock.send(json.dumps({"ok": True}).encode())
                return
            try:
                reply = {"ok": True, **core.handle(msg)}
            except JobError as exc:
                reply = {"ok": False, "status": exc.status, "error": str(exc)}
            except torch.OutOfMemoryError as exc:  # mostly in forward/backward, before any weight changes
                if core.optimizer is not None:
                    core.optimizer.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                reply = {"ok": False, "status": 507, "error": "the trainer ran out of memory next to vLLM "
                         f"({str(exc).splitlines()[0]}); lower vLLM's --gpu-memory-utilization, train fewer "
                         "parameters (params filter), use APOLLO-Mini, or send shorter samples"}
            except Exception as exc:  # a bug or an unexpected state: report it, keep serving
                if core.job is not None and msg.get("op") == "step":
                    core.job = None
                reply = {"ok": False, "status": 500, "error": f"{type(exc).__name__}: {exc}"}
            sock.send(json.dumps(reply, allow_nan=True).encode())
    finally:
        sock.close()
        ctx.term()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="plasticity trainer subprocess (started by the plugin)")
    parser.add_argument("--endpoint", required=True, help="ZMQ endpoint to bind, e.g. ipc:///tmp/x.sock")
    parser.add_argument("--manifest", required=True, help="weight manifest JSON written by the API server")
    parser.add_argument("--model-path", required=True, help="the served model's directory (config.json)")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: half the cores; the rest serve vLLM)")
    args = parser.parse_args(argv)
    # On CPU the trainer shares cores with vLLM's worker. An OpenMP pool as large as the machine spins
    # against the worker's threads and a 20 ms step took 10-25 s on 2 cores under load; half the cores
    # (1 of 2 here) keeps steps in milliseconds.
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) // 2))
    from vllm_plasticity.weight_sharing import WeightManifest, map_shared_weights

    manifest = WeightManifest.from_dict(json.loads(Path(args.manifest).read_text()))
    core = TrainerCore(args.model_path, map_shared_weights(manifest), args.state_dir)
    print(f"[trainer] pid {os.getpid()} ready: {len(core.named)} parameters, weight version "
          f"{core.state.weight_version}", file=sys.stderr, flush=True)
    serve(core, args.endpoint)


if __name__ == "__main__":
    main()
