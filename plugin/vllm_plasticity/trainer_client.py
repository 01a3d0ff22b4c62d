"""The API server's handle on the trainer subprocess: start it, talk to it over ZMQ, notice when it dies.

Runs in the API server process, on its asyncio event loop: every wait is an `await` on a zmq.asyncio
socket, so serving never blocks while the trainer works. The trainer is a child process in its own
process group; it is stopped by PID (and its group) at shutdown, and a dead trainer is replaced by a
fresh one on the next request (its optimizer state comes back from the state directory).

    >>> client = TrainerClient(state_dir, manifest_path, model_path)
    >>> await client.start()
    >>> await client.request(Ping())          # -> Status; a refusal raises TrainerError (contract.messages)
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import zmq
import zmq.asyncio

from vllm_plasticity import metrics
from vllm_plasticity.contract.messages import Ping, Reply, decode_reply, encode
from vllm_plasticity.contract.settings import Strict


class TrainerUnavailable(RuntimeError):
    """The trainer died or could not start; the message says why (and where its log is)."""


class TrainerClient:
    def __init__(self, state_dir: Path, manifest_path: Path, model_path: str, start_timeout: float = 300.0,
                 rank: int = 0, world: int = 1) -> None:
        self.state_dir, self.manifest_path, self.model_path = Path(state_dir), Path(manifest_path), model_path
        self.start_timeout = start_timeout
        # One of `world` trainers of a tensor-parallel server (trainer_group.py sets `rendezvous` per start).
        self.rank, self.world, self.rendezvous = rank, world, None
        self.log_path = self.state_dir / ("trainer.log" if world == 1 else f"trainer-rank{rank}.log")
        self.proc: subprocess.Popen | None = None
        self.state = "stopped"  # stopped, starting, ready, busy, failed
        self.last_error: str | None = None
        self.restarts = 0
        self._ctx = zmq.asyncio.Context()
        self._sock = None
        self._endpoint: str | None = None
        self._lock = asyncio.Lock()  # one request in flight (REQ/REP): start's pings included
        self._start_lock = asyncio.Lock()  # one start at a time

    @property
    def endpoint(self) -> str | None:
        return self._endpoint

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def endpoints(self) -> list[str | None]:
        """Where the trainer processes listen (one here; one per shard in a TrainerGroup)."""
        return [self._endpoint]

    @property
    def pids(self) -> list[int | None]:
        """The trainer processes (one here; one per shard in a TrainerGroup)."""
        return [self.pid]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def ensure_started(self) -> None:
        """Start the trainer unless it is running; concurrent callers share one start."""
        async with self._start_lock:
            if not self.alive():
                await self.start()

    async def start(self) -> None:
        """Start a trainer and wait until it answers a ping."""
        async with self._lock:
            await self._start()

    async def _start(self) -> None:
        self.kill()
        self.state = "starting"
        self.restarts += 1
        if self.restarts > 1:  # the first start is no restart (as /train/status counts)
            metrics.trainer_restarted()
        rank = f"-rank{self.rank}" if self.world > 1 else ""
        sock_path = self.state_dir / f"trainer-{os.getpid()}{rank}-{self.restarts}.sock"
        sock_path.unlink(missing_ok=True)
        self._endpoint = f"ipc://{sock_path}"
        cmd = [sys.executable, "-m", "plasticity_training.trainer", "--endpoint", self._endpoint,
               "--manifest", str(self.manifest_path), "--model-path", self.model_path, "--state-dir", str(self.state_dir)]
        if self.world > 1:
            cmd += ["--world", str(self.world), "--rank", str(self.rank), "--rendezvous", str(self.rendezvous)]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._new_socket()
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                try:
                    await self._send_recv(Ping(), timeout=min(5.0, max(0.1, deadline - time.monotonic())))
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise TrainerUnavailable(f"the trainer did not answer within {self.start_timeout:.0f}s "
                                                 f"(log: {self.log_path})")
                    self._new_socket()  # a REQ socket that timed out must be replaced
        except TrainerUnavailable as exc:
            self.state, self.last_error = "failed", str(exc)
            self.kill()
            raise
        self.state, self.last_error = "ready", None

    def _new_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._ctx.socket(zmq.REQ)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self._endpoint)

    async def _send_recv(self, msg: Strict, timeout: float | None) -> Reply:
        """One request/reply; polls the process so a dead trainer is noticed within a second."""
        await self._sock.send(encode(msg))
        waited = 0.0
        while True:
            if await self._sock.poll(1000):
                return decode_reply(msg, await self._sock.recv())
            waited += 1.0
            if not self.alive():
                code = self.proc.returncode if self.proc is not None else None
                how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                self._new_socket()
                raise TrainerUnavailable(f"the trainer exited ({how}); see {self.log_path}")
            if timeout is not None and waited >= timeout:
                raise TimeoutError(f"no answer from the trainer in {timeout:.0f}s")

    async def request(self, msg: Strict, timeout: float | None = None) -> Reply:
        """Send `msg` (a contract.messages request), return its typed reply; TrainerError when the trainer
        refuses, TrainerUnavailable if it dies."""
        async with self._lock:
            if not self.alive():
                raise TrainerUnavailable(self.last_error or "the trainer is not running")
            try:
                return await self._send_recv(msg, timeout)
            except TrainerUnavailable as exc:
                self.state, self.last_error = "failed", str(exc)
                raise

    def kill(self) -> None:
        """Stop the trainer process (and its group) by PID; idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        if self._endpoint and self._endpoint.startswith("ipc://"):
            Path(self._endpoint[len("ipc://"):]).unlink(missing_ok=True)
        self.state = "stopped" if self.state != "failed" else "failed"
