"""The trainers of a tensor-parallel server, one per shard, driven as one trainer.

Runs in the API server process. At --tensor-parallel-size N each vLLM worker holds a shard of the
weights, so N trainer processes each view one shard (plasticity_training.tensor_parallel) and run every
step together over their own process group. The training service talks to this group exactly as to one
TrainerClient: every request goes to all N at once and the group answers with rank 0's reply.

Failure rule: the ranks refuse alike (a refusal is decided on every rank before any weight is written:
apollo.Apollo's agreement), so N refusals are one refusal. A rank that dies, or ranks that answer
differently, leave the others waiting on a collective that never completes: the group then stops all of
them and reports the trainer unavailable; the next request starts all N afresh with a new rendezvous.

    >>> group = TrainerGroup(state_dir, [manifest_rank0, manifest_rank1], model_path)
    >>> await group.start()
    >>> await group.request(Ping())
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from vllm_plasticity.contract.messages import Reply, TrainerError
from vllm_plasticity.contract.settings import Strict
from vllm_plasticity.trainer_client import TrainerClient, TrainerUnavailable


class TrainerGroup:
    def __init__(self, state_dir: Path, manifest_paths: list[Path], model_path: str, start_timeout: float = 300.0) -> None:
        self.state_dir = Path(state_dir)
        world = len(manifest_paths)
        self.clients = [TrainerClient(state_dir, path, model_path, start_timeout, rank=rank, world=world)
                        for rank, path in enumerate(manifest_paths)]
        self._start_lock = asyncio.Lock()
        self._starts = 0

    # What the training service reads and sets, as on one TrainerClient (rank 0's where one value is shown).
    @property
    def lead(self) -> TrainerClient:
        return self.clients[0]

    @property
    def state(self) -> str:
        return self.lead.state

    @state.setter
    def state(self, value: str) -> None:
        for client in self.clients:
            client.state = value

    @property
    def last_error(self) -> str | None:
        return next((c.last_error for c in self.clients if c.last_error), None)

    @last_error.setter
    def last_error(self, value: str | None) -> None:
        for client in self.clients:
            client.last_error = value

    @property
    def pid(self) -> int | None:
        return self.lead.pid

    @property
    def pids(self) -> list[int | None]:
        return [c.pid for c in self.clients]

    @property
    def restarts(self) -> int:
        return self.lead.restarts

    @property
    def log_path(self) -> Path:
        return self.lead.log_path

    @property
    def endpoint(self) -> str | None:
        return self.lead.endpoint

    @property
    def endpoints(self) -> list[str | None]:
        return [c.endpoint for c in self.clients]

    def alive(self) -> bool:
        return all(c.alive() for c in self.clients)

    async def ensure_started(self) -> None:
        async with self._start_lock:
            if not self.alive():
                await self.start()

    async def start(self) -> None:
        """Start all N trainers (they meet at a fresh rendezvous) and wait until each answers a ping."""
        self.kill()
        self._starts += 1
        rendezvous = self.state_dir / f"tp-rendezvous-{os.getpid()}-{self._starts}"
        rendezvous.unlink(missing_ok=True)  # a file store left by an earlier group would mix the two
        for client in self.clients:
            client.rendezvous = f"file://{rendezvous}"
        results = await asyncio.gather(*(c.start() for c in self.clients), return_exceptions=True)
        rendezvous.unlink(missing_ok=True)  # read only while the group forms
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self.kill()
            reason = str(failed[0])
            self.state, self.last_error = "failed", reason
            raise TrainerUnavailable(reason)

    async def request(self, msg: Strict, timeout: float | None = None) -> Reply:
        """`msg` to every trainer at once; rank 0's reply, or the refusal all of them made."""
        results = await asyncio.gather(*(c.request(msg, timeout) for c in self.clients), return_exceptions=True)
        refusals = [r for r in results if isinstance(r, TrainerError)]
        broken = [r for r in results if isinstance(r, BaseException) and not isinstance(r, TrainerError)]
        if not broken and len(refusals) in (0, len(results)):
            if refusals:
                raise refusals[0]
            return results[0]
        # A rank died, timed out or answered unlike the others: the rest may wait on it forever.
        reason = (f"trainer rank {results.index(broken[0])}: {broken[0]}" if broken else
                  "the trainers of the shards answered differently: " + "; ".join(
                      f"rank {i}: {type(r).__name__}: {r}" for i, r in enumerate(results)))
        self.kill()
        self.state, self.last_error = "failed", reason
        raise TrainerUnavailable(f"{reason}; every shard's trainer was stopped and starts again on the next job")

    def kill(self) -> None:
        for client in self.clients:
            client.kill()
