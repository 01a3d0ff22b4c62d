"""The training subprocess: answers the API server's requests (contract.messages) with a TrainerCore.

Runs in its own process, started by the API server (vllm_plasticity.trainer_client) as

    python -m plasticity_training.trainer --endpoint ipc:///.../trainer.sock --manifest weights.json \
        --model-path MODEL --state-dir DIR [--world N --rank R --rendezvous file:///...]

It maps the worker's weights (contract.weights), builds the core on views of them (trainer_core.py) and
answers one request at a time on a ZMQ REP socket: each request type has one handler (HANDLERS), each
reply is the request's reply type, and a refusal is a TrainerError with its kind. A rejected step changes
no weight. It exits on Shutdown, or when the API server that started it is gone. With --world N > 1 it is
one of N trainers, one per shard of a tensor-parallel server (tensor_parallel.py): every request goes to
all of them, and they answer it together.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch
from pydantic import ValidationError

from plasticity_training.tensor_parallel import Shard
from plasticity_training.trainer_core import TrainerCore
from vllm_plasticity.contract.messages import (
    Acknowledged, BeginJob, Checkpoint, CheckpointWritten, EndJob, JobBegun, JobEnded, Ping, Reply, Shutdown,
    Status, Step, StepDone, TrainerError, decode_request, encode_reply)
from vllm_plasticity.contract.weights import WeightManifest, map_shared_weights

HANDLERS: dict[type, Callable[[TrainerCore, object], Reply]] = {
    Ping: lambda core, m: Status(**core.status()),
    BeginJob: lambda core, m: JobBegun(**core.begin_job(
        [s.model_dump() for s in m.samples], m.optimizer, m.params, m.force, m.context_mode, m.weight_version,
        m.objective, m.preference, m.rollback)),
    Step: lambda core, m: StepDone(**core.step()),
    EndJob: lambda core, m: JobEnded(**core.end_job(m.success)),
    Checkpoint: lambda core, m: CheckpointWritten(**core.checkpoint(
        m.target, m.allowed_root, m.allow_model_dir, m.weight_version, m.max_names, m.replace, m.config or None)),
    Shutdown: lambda core, m: core.shutdown() or Acknowledged(),
}


def answer(core: TrainerCore, data: bytes) -> Reply | TrainerError:
    """The reply to one request on the wire; never raises (a bug becomes an `internal` failure)."""
    try:
        message = decode_request(data)
    except ValidationError as exc:
        return TrainerError("invalid", f"not a trainer request: {exc}")
    try:
        return HANDLERS[type(message)](core, message)
    except TrainerError as exc:
        return exc
    except torch.OutOfMemoryError as exc:  # mostly in forward/backward, before any weight changes
        if core.optimizer is not None:
            core.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return TrainerError("out_of_memory", "the trainer ran out of memory next to vLLM "
                            f"({str(exc).splitlines()[0]}); lower vLLM's --gpu-memory-utilization, train fewer "
                            "parameters (params filter), use APOLLO-Mini, or send shorter samples")
    except Exception as exc:  # a bug or an unexpected state: report it, keep serving
        if isinstance(message, Step):  # a step that failed half-way ends its job
            core.job = None
        return TrainerError("internal", f"{type(exc).__name__}: {exc}")


def serve(core: TrainerCore, endpoint: str) -> None:
    """Answer requests on `endpoint` until a Shutdown (or the parent disappears)."""
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
            reply = answer(core, sock.recv())
            sock.send(encode_reply(reply))
            if isinstance(reply, Acknowledged):
                return
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
    parser.add_argument("--world", type=int, default=1,
                        help="trainers of a tensor-parallel server, one per shard (the manifest is rank --rank's)")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--rendezvous", help="where the trainers of one server meet (torch.distributed init "
                        "method, e.g. file:///state/tp-rendezvous); needed with --world > 1")
    args = parser.parse_args(argv)
    if args.world > 1 and not args.rendezvous:
        parser.error("--world > 1 needs --rendezvous")
    # On CPU the trainer shares cores with vLLM's worker. An OpenMP pool as large as the machine spins
    # against the worker's threads and a 20 ms step took 10-25 s on 2 cores under load; half the cores
    # (1 of 2 here) keeps steps in milliseconds.
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) // 2))
    manifest = WeightManifest.from_dict(json.loads(Path(args.manifest).read_text()))
    weights = map_shared_weights(manifest)
    device = next(iter(weights.values())).device
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL runs each rank's collectives on the device of its worker's shard
    shard = Shard.join(args.rank, args.world, args.rendezvous) if args.world > 1 else None
    core = TrainerCore(args.model_path, weights, args.state_dir, shard=shard)
    print(f"[trainer] pid {os.getpid()} ready: {len(core.named)} parameters, weight version "
          f"{core.state.weight_version}", file=sys.stderr, flush=True)
    serve(core, args.endpoint)


if __name__ == "__main__":
    main()
