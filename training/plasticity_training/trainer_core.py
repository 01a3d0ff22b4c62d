"""The trainer's logic without the socket: one Hugging Face view of the live weights, one APOLLO
optimizer, one job at a time, driven step by step.

Runs in the trainer subprocess (trainer.py answers the API server's requests with it); tests drive it
directly on a private model. Requests arrive validated (contract.settings, contract.messages and the
server's TrainRequest): token ids, lengths, settings, which options go with which objective and the
parameter filter were checked at the edge, so nothing here checks them again. What is refused here
depends on the trainer's own state: a job already open, optimizer state of another shape, a filter that
selects none of the tensors this trainer trains (a frozen substrate is not among them), the weights' own
loss. A refusal raises contract.messages.TrainerError with its kind.

State files, in the served model's own directory under the state directory (state_store.py; each written
atomically, contract.files):
    trainer_state.json        weight version, step and job counts, hashes of trained samples (dedup)
    optimizer.safetensors     APOLLO state keyed by parameter name ("<name>::<key>")
Both are also saved inside every checkpoint (checkpoint.py), with the server's process config
(plasticity_config.json: the switches the weights were trained under), and restored from it when the
served model is a checkpoint: weights and optimizer state then always come from the same moment. The weight version's
high-water mark (state_store.VersionMark) keeps the version from counting backwards across restarts.

A job whose loss diverges stops with the kind `diverged` and, where it kept a copy of what it trains,
is rolled back to its start at end_job (divergence.py has the rule and the memory cost).

    >>> core = TrainerCore(model_dir, map_shared_weights(manifest), state_dir)
    >>> core.begin_job([{"context_ids": [1, 2], "continuation_ids": [3]}], optimizer={"lr": 1e-4})
    >>> core.step(); core.end_job()
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from plasticity_training import checkpoint as ckpt
from plasticity_training.divergence import Rollback, divergence
from plasticity_training.apollo import Apollo, NonFiniteGradientError, NonFiniteUpdateError, flatten_state, unflatten_state
from plasticity_training.checkpoint_form import CheckpointForm
from plasticity_training.hf_view import build_hf_view
from plasticity_training.objectives import ObjectiveResult, continuation_logprobs, dpo_loss, orpo_loss, sft_loss
from plasticity_training.state_store import VersionMark, open_model_state
from plasticity_training import tensor_parallel
from plasticity_training.tensor_parallel import Shard, token_logprobs
from vllm_plasticity.contract.files import write_atomically, write_file_atomically
from vllm_plasticity.contract.messages import TrainerError
from vllm_plasticity.contract.settings import (
    ContextMode, Objective, OptimizerSettings, ParamsFilter, PreferenceSettings, select_params)


# The API server's process config (PlasticityConfig), saved in every checkpoint the server asks for.
PROCESS_CONFIG = "plasticity_config.json"


def sample_hash(context_ids: list[int], continuation_ids: list[int]) -> str:
    blob = json.dumps([context_ids, continuation_ids], separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def sample_key(objective: str, sample: dict) -> str:
    """The dedup key: an sft sample's is its token ids (as it always was); a preference sample's names the
    objective and both continuations, so the same pair under another objective trains again."""
    if objective == "sft":
        return sample_hash(sample["context_ids"], sample["continuation_ids"])
    blob = json.dumps([objective, sample["context_ids"], sample["chosen_ids"], sample["rejected_ids"]],
                      separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


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
        write_atomically(path, json.dumps(dataclasses.asdict(self)))


class TrainerCore:
    """The trainer's logic without the socket: one HF view, one optimizer, one job at a time."""

    def __init__(self, model_path: str | Path, weights: dict[str, torch.Tensor], state_dir: str | Path,
                 shard: Shard | None = None) -> None:
        self.model_path = Path(model_path)
        # Read once: a checkpoint served here may be overwritten later, its origin stays this model's.
        self.origin = ckpt.model_origin(model_path)
        # One of several tensor-parallel trainers (tensor_parallel.py): `weights` are this rank's shard and
        # every call below runs on every rank at once, in the same order.
        self.shard = shard if shard is not None and shard.world > 1 else None
        self.model = build_hf_view(model_path, weights, shard=self.shard)
        self.vocab_size = self.model.config.vocab_size
        self.pad_id = self.model.config.pad_token_id or 0
        # Tied weights appear once; an architecture's never-trained tensors (a frozen substrate) not at all.
        frozen = set(getattr(self.model, "frozen_parameters", ()))
        self.named = {n: p for n, p in self.model.named_parameters() if n not in frozen}
        # Each tensor's shape in the whole model: what state files and checkpoints hold at any shard count.
        self.whole_shapes = ({n: tuple(p.shape) for n, p in self.named.items()} if self.shard is None else
                             tensor_parallel.whole_shapes(self.model, self.shard, self.vocab_size))
        if not self.leads:
            self._agree(None)  # the leading rank opens the state directory (and restores into it) first
        # state_dir is the server's; this model's files live in a directory of its own inside it
        self.state_dir = open_model_state(Path(state_dir), model_path, self._optimizer_state_fits)
        self.version_mark = VersionMark(Path(state_dir))
        self.restored_from = self._restore_from_checkpoint() if self.leads else None
        if self.shard is not None and self.leads:
            self._agree(None)
        self.state = TrainerState.load(self.state_dir / "trainer_state.json")
        self.state.weight_version = self.version_mark.starting_version(self.state.weight_version)
        self.trained = set(self.state.trained)
        self.optimizer: Apollo | None = None
        self.checkpoint_buffers = ckpt.BufferPool()  # a sync's window buffers, kept for the next one
        self.checkpoint_changes = ckpt.ChangeTracker()  # which tensors steps changed since each generation
        self.checkpoint_form = CheckpointForm(model_path)  # the checkpoint's names for them, what it carries over
        self.job: dict | None = None

    @property
    def leads(self) -> bool:
        """Whether this trainer writes the state files and checkpoints (rank 0 of a tensor-parallel group:
        they hold the whole model's state, gathered from every rank, so any shard count can resume them)."""
        return self.shard is None or self.shard.rank == 0

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
                write_atomically(path, files[name])
        write_atomically(marker, json.dumps({"generation": generation}))
        return generation

    # ---- optimizer ---------------------------------------------------------------------------
    def _optimizer_state_fits(self, path: Path) -> bool:
        """Whether saved optimizer state could belong to this model: every name is one of its parameters and
        every moment has the parameter's shape (AdamW) or (its longest side, rank) (APOLLO)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    name, _, kind = key.rpartition("::")
                    if name not in self.named:
                        return False
                    shape, own = tuple(f.get_slice(key).get_shape()), self.whole_shapes[name]
                    if kind.startswith("exp_avg") and shape != own and not (len(shape) == 2 and shape[0] == max(own)):
                        return False
        except Exception:  # unreadable: not ours to adopt
            return False
        return True

    def _ensure_optimizer(self, opt: OptimizerSettings) -> Apollo:
        shape = opt.shape()
        saved = self.state.optimizer_settings
        if self.optimizer is None:
            if saved is not None and saved != shape:
                raise TrainerError("conflict", f"optimizer state exists with {saved}; this job asks {shape} "
                                               "(rank and mini are fixed once state exists)")
            split = {} if self.shard is None else dict(shards=tensor_parallel.parameter_shards(self.model, self.shard),
                                                         sum_=self.shard.sum_)
            optimizer = Apollo.from_settings(list(self.named.items()), opt, **split)
            path = self.state_dir / "optimizer.safetensors"
            if path.exists():
                from safetensors.torch import load_file

                try:
                    optimizer.load_named_state_dict(self._local_state(optimizer, unflatten_state(load_file(path))))
                except ValueError as exc:  # a file that does not belong to these weights: refuse, keep it
                    raise TrainerError("conflict", f"the optimizer state in {path} does not fit the served model "
                                       f"({exc}); move that file away to start fresh, or serve with another "
                                       "--state-dir") from None
            self.optimizer = optimizer
            self.state.optimizer_settings = shape
        elif saved != shape:
            raise TrainerError("conflict", f"optimizer state exists with {saved}; this job asks {shape} "
                                           "(rank and mini are fixed once state exists)")
        else:
            self.optimizer.apply_settings(opt)  # per-job settings: lr, betas, grad_clip, ...
        return self.optimizer

    # ---- jobs ------------------------------------------------------------------------------------
    def begin_job(self, samples: list[dict], optimizer: OptimizerSettings | dict | None = None,
                  params: ParamsFilter | dict | None = None, force: bool = False, context_mode: ContextMode = "masked",
                  weight_version: int = 0, objective: Objective = "sft",
                  preference: PreferenceSettings | dict | None = None, rollback: bool | None = None) -> dict:
        """Open a job: choose the parameters that train, build or reuse the optimizer, drop samples trained
        on before (unless `force`) and samples of weight 0, for DPO fix the reference log-probs (the
        weights as they are now, where the client gave none), and keep the rollback copy (`rollback`:
        True always, refused when it does not fit; None where it fits; False never). Samples are dicts:
        {"context_ids", "continuation_ids"} for sft, {"context_ids", "chosen_ids", "rejected_ids"} for orpo
        and dpo, each with an optional "weight" (default 1).

        All or nothing: the job is open only once everything above succeeded, so any failure here (a
        reference forward out of memory included) leaves the trainer ready for the next job."""
        if self.job is not None:
            raise TrainerError("conflict", "a job is already running in the trainer")
        optimizer = optimizer if isinstance(optimizer, OptimizerSettings) else OptimizerSettings(**(optimizer or {}))
        params = params if isinstance(params, ParamsFilter) else ParamsFilter(**(params or {}))
        preference = preference if isinstance(preference, PreferenceSettings) else PreferenceSettings(**(preference or {}))
        # A trainer killed mid-job stepped past its last saved version: never count backwards.
        self.state.weight_version = max(self.state.weight_version, weight_version)
        selected = select_params(list(self.named), params)
        if not selected:
            raise TrainerError("invalid", f"the params filter {params.model_dump()} selects no parameter")
        self._ensure_optimizer(optimizer)

        weighted = [s for s in samples if s.get("weight", 1.0) > 0]
        hashes = [sample_key(objective, s) for s in weighted]
        fresh = self._agree([(s, h) for s, h in zip(weighted, hashes) if force or h not in self.trained])
        keep = [s for s, _ in fresh]
        selected_set = set(selected)
        for name, p in self.named.items():
            p.requires_grad_(name in selected_set)
        conts = ("continuation_ids",) if objective == "sft" else ("chosen_ids", "rejected_ids")
        job = {"samples": keep, "hashes": [h for _, h in fresh], "context_mode": context_mode,
               "objective": objective, "preference": preference, "steps": 0, "start_loss": None,
               "diverged": None, "rollback": None,
               "tokens": sum(len(s[k]) for s in keep for k in conts)}
        if objective == "dpo" and keep:
            job["reference"] = self._dpo_reference(keep)
        note, nbytes = None, 0
        if keep and rollback is not False:
            trained = {name: self.named[name] for name in selected}
            nbytes = Rollback.bytes_needed(trained, self.optimizer.state_bytes())
            fits, figures = self._agree(Rollback.fits(nbytes))
            if fits:
                job["rollback"] = Rollback(trained, self.optimizer.named_state_dict())
            elif rollback:
                raise TrainerError("out_of_memory", f"rollback needs a host-memory copy of the trained tensors and "
                                   f"the optimizer state: {figures}; send \"rollback\": false, or train fewer "
                                   "parameters (params filter)")
            else:
                note = f"no copy was kept, it would not fit host memory ({figures})"
        elif keep:
            note = "the job asked for rollback: false"
        self.job = job
        return {"samples": len(keep), "tokens": job["tokens"], "skipped_duplicates": len(weighted) - len(keep),
                "skipped_zero_weight": len(samples) - len(weighted), "parameters": len(selected),
                "trained": list(selected), "rollback_bytes": nbytes if job["rollback"] else 0, "rollback_note": note}

    def _whole_state(self, optimizer: Apollo) -> dict:
        """The optimizer's state as one trainer of the whole model holds it (gathered to rank 0; {} elsewhere)."""
        named = optimizer.named_state_dict()
        if self.shard is None:
            return named
        split = optimizer.split_state_dims()
        tensors, dims, shapes = {}, {}, {}
        for name, keys in named.items():
            for key, tensor in keys.items():
                tensors[name, key] = tensor
                dim = split.get(name, {}).get(key)
                if dim is not None:  # split like its parameter: the parameter's whole extent along that dimension
                    dims[name, key] = dim
                    extent = self.whole_shapes[name][optimizer.shards[name].dim]
                    shapes[name, key] = tuple(extent if i == dim else n for i, n in enumerate(tensor.shape))
        whole: dict = {}
        for (name, key), tensor in tensor_parallel.gather_whole(tensors, self.shard, shapes, dims).items():
            whole.setdefault(name, {})[key] = tensor
        return whole

    def _local_state(self, optimizer: Apollo, named: dict) -> dict:
        """This rank's part of optimizer state saved whole (`named`), to load into `optimizer`."""
        if self.shard is None:
            return named
        dims = optimizer.split_state_dims()
        out = {}
        for name, keys in named.items():
            split = optimizer.shards.get(name)
            out[name] = {key: tensor_parallel.local_part(t, dims.get(name, {}).get(key), split.start,
                                                         self.named[name].shape[split.dim]) if split else t
                         for key, t in keys.items()}
        return out

    def _agree(self, value):
        """The leading rank's `value` on every rank of a tensor-parallel trainer (the ranks must decide alike
        which samples train and whether a rollback copy is kept, or their collectives would part)."""
        if self.shard is None:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0, group=self.shard.group)
        return box[0]

    @torch.no_grad()
    def _dpo_reference(self, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ref chosen, ref rejected) summed log-probs: the client's, else the weights as they are now (so no
        second copy of the model is kept)."""
        given = [s.get("ref_chosen_logp") is not None for s in samples]
        chosen, rejected = torch.zeros(len(samples)), torch.zeros(len(samples))
        if not all(given):
            (chosen, _), (rejected, _) = self._pair_logprobs(samples)
        for i, s in enumerate(samples):
            if given[i]:
                chosen[i], rejected[i] = s["ref_chosen_logp"], s["ref_rejected_logp"]
        return chosen, rejected

    def _pair_logprobs(self, samples: list[dict]) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """((chosen sums, counts), (rejected sums, counts)), each (N,): one forward over all 2N sequences."""
        ctx = [s["context_ids"] for s in samples]
        sums, counts = continuation_logprobs(self.model, self.pad_id, ctx + ctx, [s["chosen_ids"] for s in samples]
                                             + [s["rejected_ids"] for s in samples])
        n = len(samples)
        return (sums[:n], counts[:n]), (sums[n:], counts[n:])

    def _objective(self, job: dict) -> ObjectiveResult:
        samples, pref = job["samples"], job["preference"]
        if job["objective"] == "sft":
            return ObjectiveResult(self._loss(samples, job["context_mode"]))
        weights = torch.tensor([float(s.get("weight", 1.0)) for s in samples])  # (N,)
        (chosen, n_chosen), (rejected, n_rejected) = self._pair_logprobs(samples)
        if job["objective"] == "dpo":
            return dpo_loss(chosen, rejected, *job["reference"], pref.beta, weights)
        return orpo_loss(chosen, n_chosen, rejected, n_rejected, pref.lambda_, weights)

    def _loss(self, samples: list[dict], context_mode: str) -> torch.Tensor:
        """The sft loss: cross-entropy over the continuation tokens, each sample's tokens weighted by its
        weight (all 1: the plain mean over tokens); the context only conditions."""
        weights = torch.tensor([float(s.get("weight", 1.0)) for s in samples])  # (N,)
        counts = torch.tensor([float(len(s["continuation_ids"])) for s in samples])  # (N,)
        if context_mode == "no_grad":
            sums = []
            for s in samples:
                # The context but its last token: keys/values (or recurrent state) computed without a graph
                # (truncated gradient). The last context token runs with the continuation, with a graph:
                # its position predicts the continuation's first token, which could not be learned otherwise.
                prefix, tail = s["context_ids"][:-1], s["context_ids"][-1:] + s["continuation_ids"]
                past = None
                if prefix:
                    with torch.no_grad():
                        past = self.model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values
                logits = self.model(input_ids=torch.tensor([tail]), past_key_values=past).logits[:, :-1]  # (1, K, V)
                cont = torch.tensor(s["continuation_ids"])  # (K,)
                sums.append(token_logprobs(self.model, logits[0], cont).sum())
            return sft_loss(torch.stack(sums), counts, weights).loss
        # masked: one padded batch, the gradient flows through the context's keys and values (exact).
        sums, _ = continuation_logprobs(self.model, self.pad_id, [s["context_ids"] for s in samples],
                                        [s["continuation_ids"] for s in samples])
        return sft_loss(sums, counts, weights).loss

    def step(self) -> dict:
        """One forward/backward/APOLLO step on the job's samples, applied in place to vLLM's weights."""
        if self.job is None:
            raise TrainerError("conflict", "no job: send begin_job first")
        if not self.job["samples"]:
            return {"loss": None, "tokens": 0, "weight_version": self.state.weight_version, "seconds": 0.0}
        t0 = time.perf_counter()
        job = self.job
        self.optimizer.zero_grad(set_to_none=True)
        result = self._objective(job)
        loss = result.loss
        if job["steps"] == 0:  # the weights as the job found them: a non-finite loss is theirs, not the job's
            if not torch.isfinite(loss):
                raise TrainerError("rejected", f"non-finite loss ({loss.item()}); step rejected, weights unchanged")
            job["start_loss"] = loss.item()
        else:
            self._refuse_if_diverged(divergence(job["start_loss"], loss.item(), job["steps"] + 1))
        loss.backward()
        try:
            self.optimizer.step()  # checks every gradient and every updated value before it touches any weight
        except (NonFiniteGradientError, NonFiniteUpdateError) as exc:
            self.optimizer.zero_grad(set_to_none=True)
            if job["steps"]:
                self._refuse_if_diverged(f"step {job['steps'] + 1}: {exc}")
            raise TrainerError("rejected", f"{exc}; step rejected, weights unchanged") from exc
        self.optimizer.zero_grad(set_to_none=True)
        self.checkpoint_changes.stepped(self.checkpoint_form.names((n for n, p in self.named.items() if p.requires_grad),
                                                                   self.model))
        job["steps"] += 1
        self._new_version()
        self.state.total_steps += 1
        return {"loss": loss.item(), "tokens": self.job["tokens"], "weight_version": self.state.weight_version,
                "seconds": time.perf_counter() - t0, "chosen_logp": result.chosen_logp,
                "rejected_logp": result.rejected_logp, "margin": result.margin}

    def _refuse_if_diverged(self, reason: str | None) -> None:
        if reason is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.job["diverged"] = reason
            raise TrainerError("diverged", f"diverged: {reason}; the step was not taken")

    def _new_version(self) -> None:
        """The weights changed: the next version, covered by the high-water mark before anyone sees it."""
        self.state.weight_version += 1
        if self.leads:
            self.version_mark.reach(self.state.weight_version)

    def end_job(self, success: bool = True) -> dict:
        """Close the job: record its samples (success), or roll a diverged job back where it kept a copy."""
        job, self.job = self.job, None
        rolled_back = False
        if job is not None and job["diverged"] and job["rollback"] is not None and job["steps"]:
            restored = job["rollback"].restore(self.named, self.optimizer)
            self.checkpoint_changes.stepped(self.checkpoint_form.names(restored, self.model))
            self._new_version()  # other weights than the last step's: a new version (never an old number)
            rolled_back = True
        if job is not None and success:
            self.state.total_jobs += 1
            self.state.total_tokens += job["tokens"]
            for h in job["hashes"]:
                if h not in self.trained:
                    self.trained.add(h)
                    self.state.trained.append(h)
        self.save_state()
        return {"weight_version": self.state.weight_version, "rolled_back": rolled_back}

    def shutdown(self) -> None:
        """Before the process exits: an open job ends unrecorded, and all state is saved."""
        if self.job is not None:
            self.end_job(success=False)
        else:
            self.save_state()

    def save_state(self) -> None:
        if self.optimizer is not None:
            from safetensors.torch import save_file

            named = self._whole_state(self.optimizer)
            flat = {k: v.contiguous().cpu() for k, v in flatten_state(named).items()}
            if self.leads:
                write_file_atomically(self.state_dir / "optimizer.safetensors", lambda p: save_file(flat, str(p)))
        if self.leads:
            self.state.save(self.state_dir / "trainer_state.json")
            self.version_mark.settle(self.state.weight_version)

    def checkpoint(self, target: str, allowed_root: str, allow_model_dir: bool = False, weight_version: int = 0,
                   max_names: int | None = None, replace: bool = False, config: dict | None = None) -> dict:
        """Write the live weights, trainer state and optimizer state as the next checkpoint generation.

        Allowed between two steps of a job (the server sends requests one at a time, so the weights are
        those of one whole version). `weight_version` is the server's: a trainer restarted from older saved
        state adopts it, so a checkpoint is never labelled with a version older than its weights. The
        checkpoint of another model (another origin) is refused as `other_model` unless `replace`. `config`,
        the server's process config, is saved beside the weights (plasticity_state/PROCESS_CONFIG).
        """
        self.state.weight_version = max(self.state.weight_version, weight_version)
        self.save_state()
        tensors = self.checkpoint_form.tensors(self.model)
        if self.shard is not None:  # one whole Hugging Face directory, written by rank 0
            dims = {name: tensor_parallel.split_dimension(name) for name in tensors}
            tensors = tensor_parallel.gather_whole(tensors, self.shard, self.whole_shapes, dims)
        outcome = None
        if self.leads:
            try:
                outcome = self._write_checkpoint(tensors, target, allowed_root, allow_model_dir, max_names, replace,
                                                 config)
            except TrainerError as exc:
                if self.shard is None:
                    raise
                outcome = (exc.kind, str(exc))
            except Exception as exc:  # every rank must hear the outcome, or the others would wait for it
                if self.shard is None:
                    raise
                outcome = ("internal", f"{type(exc).__name__}: {exc}")
        outcome = self._agree(outcome)
        if isinstance(outcome, tuple):  # refused: (kind, reason), the same on every rank
            raise TrainerError(*outcome)
        self.state.checkpoints += 1
        if self.leads:
            self.state.save(self.state_dir / "trainer_state.json")
        return outcome

    def _write_checkpoint(self, tensors: dict[str, torch.Tensor], target: str, allowed_root: str, allow_model_dir: bool,
                          max_names: int | None, replace: bool, config: dict | None) -> dict:
        extra = {name: self.state_dir / name for name in ("trainer_state.json", "optimizer.safetensors")
                 if (self.state_dir / name).exists()}
        if config is not None:
            extra[PROCESS_CONFIG] = json.dumps(config, indent=1, sort_keys=True).encode()
        try:
            report = ckpt.sync_checkpoint(tensors, target, self.model_path,
                                          extra_files=extra, buffers=self.checkpoint_buffers,
                                          changes=self.checkpoint_changes, allowed_root=allowed_root,
                                          allow_model_dir=allow_model_dir, max_names=max_names, origin=self.origin,
                                          replace=replace)
        except ckpt.CheckpointOriginError as exc:
            raise TrainerError("other_model", f"{exc}; name another checkpoint (\"path\"), or send \"replace\": true "
                                              "to overwrite it") from exc
        except ckpt.CheckpointPathError as exc:
            raise TrainerError("invalid", str(exc)) from exc
        except ckpt.CheckpointBusyError as exc:
            raise TrainerError("conflict", str(exc)) from exc
        except (ckpt.CheckpointDiskFullError, ckpt.CheckpointSpaceError) as exc:
            raise TrainerError("disk_full", str(exc)) from exc
        except ckpt.CheckpointError as exc:
            raise TrainerError("internal", str(exc)) from exc
        return {"path": str(report.path), "generation": report.generation, "bytes_written": report.bytes_written,
                "weight_bytes_written": report.weight_bytes_written, "blocks_changed": report.blocks_changed,
                "blocks_total": report.blocks_total, "seconds": report.seconds, "full_rewrite": report.full_rewrite,
                "weight_version": self.state.weight_version}

    def status(self) -> dict:
        return {"pid": os.getpid(), "weight_version": self.state.weight_version, "total_steps": self.state.total_steps,
                "total_jobs": self.state.total_jobs, "trained_samples": len(self.trained),
                "optimizer_state_bytes": self.optimizer.state_bytes() if self.optimizer else 0,
                "restored_from": self.restored_from}
