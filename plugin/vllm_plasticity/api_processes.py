"""Several API server processes (`plasticity serve --api-server-count N`): one owns the plugin's state, the
others forward to it.

Why: the plugin's state lives in an API server process: the trainer (its child) and its job queue, the loaded
banks and their readout columns, the default steering, the checkpoint schedule. vLLM's multi-API-server mode
runs N such processes on one port (the kernel spreads connections over them), so a bank loaded through one
would be unknown to the next and N trainers would step the same weights. Instead the first process of a server
to take its lock owns all of it and listens on a Unix socket of its own (an abstract name: no file to leave);
the others send every plasticity route, and every completion request that reads or steers, there, and serve
plain OpenAI requests themselves, which is what several API server processes are for.

Two facts every process needs for every request are shared in a small file beside the lock (a memory map):
the weights' generation (kv_generations.py: a plain request that any process admits after a step must not
reuse KV computed before it) and whether a default steering is set (then every completion request goes to
the owner, which applies it).

    >>> processes = ApiProcesses.join(state_dir, api_server_count)   # once per API server process
    >>> processes.owner, processes.words.generation
    >>> await processes.serve_owner_socket(app)      # the owner: the whole app, on its socket too
    >>> response = await processes.forward(request)  # the others: the owner's answer, streamed back
    >>> app.add_middleware(ForwardToOwner, routes=plugin_routes)   # the plugin's own routes, in every process

A server's processes are the children of vLLM's manager process, so the lock and the socket are named by
the parent's pid: two servers sharing a state directory never take each other's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import mmap
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.routing import Match

from vllm_plasticity.contract.weights import pid_alive

FORWARDED_HEADER = "x-plasticity-forwarded-by"  # on an answer the owner gave: the pid of the process that forwarded it
WORDS = struct.Struct("<qq")  # (weights' generation, default steering set)
# Hop-by-hop headers (RFC 9110 7.6.1) and the length, which the streamed answer sets itself.
NOT_FORWARDED = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer",
                           "proxy-connection", "content-length"})
NOT_FORWARDED_OUT = NOT_FORWARDED | {"host"}  # httpx names the owner's socket


class SharedWords:
    """The two numbers every API server process of a server reads per request (see the module docstring).
    In one process: plain memory; in several: a memory map of one small file."""

    def __init__(self, buffer: Any) -> None:
        self._buffer = buffer

    @classmethod
    def private(cls) -> "SharedWords":
        return cls(bytearray(WORDS.size))

    @property
    def generation(self) -> int:
        return WORDS.unpack_from(self._buffer)[0]

    @generation.setter
    def generation(self, value: int) -> None:
        struct.pack_into("<q", self._buffer, 0, value)

    @property
    def default_steering(self) -> bool:
        return bool(WORDS.unpack_from(self._buffer)[1])

    @default_steering.setter
    def default_steering(self, value: bool) -> None:
        struct.pack_into("<q", self._buffer, 8, int(value))


class ApiProcesses:
    """This process's place among the server's API server processes."""

    def __init__(self, owner: bool, words: SharedWords, address: str | None = None, path: Path | None = None,
                 fd: int | None = None) -> None:
        self.owner = owner
        self.words = words
        self.address = address  # the owner's socket (None: one process, nothing to forward)
        # The process the whole server's tree hangs from (shm_ledger.py records that tree): this one, or vLLM's
        # manager, the parent of the engine core and of every API server process.
        self.server_pid = os.getppid() if address else os.getpid()
        self._path, self._fd = path, fd
        self._client = None  # httpx, to the owner's socket (made on the first forward)
        self._server = self._task = None  # the owner's uvicorn on its socket

    @classmethod
    def one(cls) -> "ApiProcesses":
        """A server with one API server process: it owns everything, nothing is shared or forwarded."""
        return cls(True, SharedWords.private())

    @classmethod
    def join(cls, state_dir: Path, api_server_count: int | None) -> "ApiProcesses":
        """One process (count None or 1): the owner, nothing shared. Several: the first of this server's
        processes to lock `api-<manager pid>.shared` in `state_dir` owns the state; the file stays locked (and
        mapped) while it lives and is removed when it exits."""
        if not api_server_count or api_server_count <= 1:
            return cls.one()
        server = os.getppid()  # vLLM's manager: the parent of every API server process of this server
        _remove_files_of_dead_servers(Path(state_dir))
        path = Path(state_dir) / f"api-{server}.shared"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(fd).st_size < WORDS.size:  # every process may do it: the same size, no data lost
            os.ftruncate(fd, WORDS.size)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            owner = True
        except BlockingIOError:
            owner = False
        words = SharedWords(mmap.mmap(fd, WORDS.size))
        processes = cls(owner, words, address=f"\0plasticity-api-{server}", path=path, fd=fd)
        if owner:
            words.generation, words.default_steering = 0, False  # a file a dead server of a reused pid left
        role = "owns the plugin's state" if owner else "forwards plasticity requests to the owner"
        print(f"plasticity: API server process {os.getpid()} of {api_server_count}: {role}", file=sys.stderr, flush=True)
        return processes

    @property
    def forwards(self) -> bool:
        return not self.owner

    async def serve_owner_socket(self, app: Any) -> None:
        """The owner: serve `app` on the socket the other processes forward to (a task in this event loop,
        beside vLLM's own server on the shared port)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.address)
        # lifespan off: the app's startup and shutdown are vLLM's server's to run, once (its shutdown deletes app.state)
        self._server = _QuietServer(uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning", timeout_keep_alive=60))
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))

    async def forward(self, request: Any) -> Any:
        """The owner's answer to `request` (a Starlette Request of this process), streamed back as it comes."""
        import httpx
        from fastapi.responses import JSONResponse
        from starlette.background import BackgroundTask
        from starlette.responses import StreamingResponse

        if self._client is None:
            self._client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=self.address), timeout=None)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in NOT_FORWARDED_OUT]
        outgoing = self._client.build_request(request.method, "http://plasticity-owner" + request.url.path,
                                              params=request.url.query, headers=headers, content=await request.body())
        try:
            answer = await self._client.send(outgoing, stream=True)
        except httpx.TransportError as exc:
            return JSONResponse({"error": {"message": "the API server process that holds this server's plasticity state "
                                                      f"did not answer ({type(exc).__name__}); try again shortly",
                                           "type": "ServiceUnavailable", "code": 503}}, status_code=503)
        headers = {k: v for k, v in answer.headers.items() if k.lower() not in NOT_FORWARDED}
        headers[FORWARDED_HEADER] = str(os.getpid())  # which process passed it on: for operators and the tests
        return StreamingResponse(answer.aiter_raw(), status_code=answer.status_code, headers=headers,
                                 background=BackgroundTask(answer.aclose))

    def close(self) -> None:
        """At exit: the owner removes the shared file it locked (the others only unmap it)."""
        if self._fd is None:
            return
        if self.owner and self._path is not None:
            self._path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def exit_checkpoint_warning(processes: ApiProcesses, shutdown_timeout: int | None) -> str | None:
    """What to tell an operator whose training server cannot write its exit checkpoint: with several API server
    processes vLLM's manager SIGKILLs them `--shutdown-timeout` seconds after its SIGTERM (default 0: at once).
    `plasticity serve` passes 120; `vllm serve` run directly does not."""
    if processes.address and not shutdown_timeout:
        return ("several API server processes with --shutdown-timeout 0: vLLM kills them at once on shutdown, so no "
                "checkpoint is written at exit; give --shutdown-timeout 120 (plasticity serve does)")
    return None


def _remove_files_of_dead_servers(state_dir: Path) -> None:
    """The shared files of servers whose manager is gone (an owner SIGKILLed has no exit to remove its own)."""
    for path in state_dir.glob("api-*.shared"):
        pid = path.name[len("api-"):-len(".shared")]
        if pid.isdigit() and not pid_alive(int(pid)):
            path.unlink(missing_ok=True)


class ForwardToOwner:
    """ASGI middleware: in a process that forwards, requests for the plugin's own `routes` go to the owner;
    everything else (and everything in the owner, or in a server of one process) passes through. Decided per
    request from `app.state.plasticity.processes`, set when the plugin's state starts."""

    def __init__(self, app: Any, routes: list) -> None:
        self.app, self.routes = app, routes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            processes = getattr(getattr(scope["app"].state, "plasticity", None), "processes", None)
            if processes is not None and processes.forwards and any(r.matches(scope)[0] != Match.NONE for r in self.routes):
                response = await processes.forward(Request(scope, receive))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _QuietServer(uvicorn.Server):
    """uvicorn's server without its signal handling: vLLM's server in the same process handles SIGTERM and
    SIGINT, and a handler installed over it would take the signal from it."""

    def capture_signals(self):
        return contextlib.nullcontext()
