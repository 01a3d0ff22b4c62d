"""What the research experiments share: a real `plasticity serve` (the built-in model by default), driven only
through its public routes, and the report/plot helpers. Not a benchmark itself.

    >>> with Lab(quick=True) as lab:              # starts the server (training and readout on)
    ...     ids = lab.ids("The door was")
    ...     lab.train([(ids, lab.ids(" open"))], steps=5, lr=1e-3)
    ...     lab.restart()                          # a fresh server: the weights as the model directory has them
    >>> with Lab(server="http://127.0.0.1:8000") as lab:   # a running server (`--server URL`): no restarts

Every experiment takes `--server URL` (and `--api-key`) to run on a server someone else started (the test
suite's smoke runs share one); an experiment that needs fresh weights mid-run then refuses with that reason.

Every experiment writes research/results/<name>.md (setup, hypothesis, table, reading) and PNG plots, with
the machine and the command that produced them. Seeds are fixed; figures are what the run printed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_checkpoint import command, machine  # noqa: E402  (the benchmarks' shared report header)

from vllm_plasticity.launcher import ServerProcess  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "32"]
# A --quick (or --smoke) run checks the script, not vLLM's compiled path (the plugin's tests check that):
# without torch.compile a CPU server starts 30-90 s sooner. Full runs keep vLLM's default, compiled.
QUICK_SERVER_ARGS = ["--enforce-eager"]
# Experiments post more samples per job than a production default allows.
SERVER_ENV = {"PLASTICITY_TRAIN_MAX_SAMPLES": "256", "PLASTICITY_TRAIN_MAX_TOKENS": "65536"}


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
    """For a script that starts servers itself (not through Lab): a SIGTERM (a timeout, `kill PID`) ends it
    through its `finally` blocks, which stop them; by default Python dies at once, the servers running on.
    Only the main thread may set a handler: elsewhere (a script's main() run by another program) it does nothing."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def default_model() -> Path:
    from plasticity_training.default_model import default_model_path

    return default_model_path(log=lambda m: print(m, flush=True))


class Lab:
    """One server at a time, started with training and readout on; `restart()` gives fresh weights."""

    def __init__(self, model: str | os.PathLike | None = None, quick: bool = False, env: dict | None = None,
                 server: str | None = None, api_key: str | None = None) -> None:
        from transformers import AutoTokenizer

        from plasticity_training.pretrained import resolve_model

        # A pretrained name (smollm2-135m-instruct) becomes its converted directory, as `plasticity serve` resolves it:
        # the tokenizer loads from there and requests name the model the server serves.
        self.model = str(resolve_model(str(model)) if model else default_model())
        self.quick = quick
        self.external = server  # a server this lab did not start: it is never stopped or restarted here
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.env = {**SERVER_ENV, **(env or {})}
        self.work = Path(tempfile.mkdtemp(prefix="plasticity-lab-"))
        self.vectors_dir = self.work / "vectors"
        self.vectors_dir.mkdir()
        self.tok = AutoTokenizer.from_pretrained(self.model)
        self.server: ServerProcess | None = None
        self.starts = 0
        self._sigterm = None  # the SIGTERM handler to put back on exit

    def __enter__(self) -> "Lab":
        # A SIGTERM (a timeout, `kill PID`) ends the run through __exit__, which stops the server this lab
        # started; by default Python dies at once and the server runs on with nobody to stop it.
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            self.start()
        except BaseException:  # a SIGTERM while the server starts (its wait_ready): Python skips __exit__ then
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.stop()
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
        # Its work directory (server logs, state, banks) is this run's own: removed after a clean run, kept
        # for a look after a failed one.
        if exc_type is None:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            print(f"lab: the run failed; its logs and state are kept in {self.work}", file=sys.stderr, flush=True)

    def start(self) -> None:
        if self.external:
            self.url = self.external.rstrip("/")
            # Requests name the model as that server does (its path when it was started with one).
            self.model = self.get("/v1/models")["data"][0]["id"]
            # Banks an experiment writes go where that server loads them from (a server on this machine).
            self.vectors_dir = Path(self.get("/readout/available")["vectors_dir"])
            return
        self.starts += 1
        args = [*SERVER_ARGS, *(QUICK_SERVER_ARGS if self.quick else []), "--training",
                "--state-dir", str(self.work / f"state-{self.starts}"), "--vectors-dir", str(self.vectors_dir)]
        self.server = ServerProcess.plasticity(self.model, extra_args=args, env=self.env,
                                               log_path=self.work / f"server-{self.starts}.log")
        self.server.wait_ready()
        self.url = self.server.url

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def restart(self) -> None:
        """A fresh server from the model directory: the original weights, no optimizer state."""
        if self.external:
            raise RuntimeError("this run needs fresh weights (a server restart), which a --server it did not start "
                               "cannot give: run it without --server")
        self.stop()
        self.start()

    # ---- routes -------------------------------------------------------------------------------------------
    def post(self, path: str, body: dict, timeout: float = 1200) -> dict:
        r = requests.post(self.url + path, json=body, headers=self.headers, timeout=timeout)
        if r.status_code != 200:
            raise RuntimeError(f"{path}: {r.status_code} {r.text[:500]}")
        return r.json()

    def get(self, path: str) -> dict:
        r = requests.get(self.url + path, headers=self.headers, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"{path}: {r.status_code} {r.text[:500]}")
        return r.json()

    def ids(self, text: str, special: bool = True) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def completion(self, prompt, **body) -> dict:
        return self.post("/v1/completions", {"model": self.model, "prompt": prompt, "temperature": 0,
                                             "return_token_ids": True, **body})["choices"][0]

    def greedy(self, ids: list[int], n: int) -> list[int]:
        return self.completion(ids, max_tokens=n, ignore_eos=True)["token_ids"]

    def token_logprobs(self, ids: list[int], top: int = 0) -> list[dict]:
        """prompt_logprobs entries for positions 1..n-1 (each {token id: {logprob, rank}})."""
        return self.completion(ids, max_tokens=1, prompt_logprobs=top)["prompt_logprobs"][1:]

    def continuation_logprob(self, context: list[int], continuation: list[int]) -> float:
        entries = self.token_logprobs(context + continuation)[len(context) - 1:]
        return sum(e[str(t)]["logprob"] for e, t in zip(entries, continuation))

    def nll(self, texts: list[str]) -> float:
        """Mean negative log-likelihood per token over `texts` (perplexity = exp of it)."""
        total = count = 0.0
        for text in texts:
            ids = self.ids(text)[:400]
            entries = self.token_logprobs(ids)
            total -= sum(e[str(t)]["logprob"] for e, t in zip(entries, ids[1:]))
            count += len(ids) - 1
        return total / count

    def train(self, pairs: list[tuple[list[int], list[int]]], steps: int = 1, lr: float = 1e-3, **body) -> dict:
        samples = [{"context_ids": c, "continuation_ids": y} for c, y in pairs]
        return self.post("/train", {"samples": samples, "steps": steps, "force": True,
                                    "optimizer": {"lr": lr, **body.pop("optimizer", {})}, **body})


# ---- reports --------------------------------------------------------------------------------------------------

def add_server_args(parser) -> None:
    """`--server URL` and `--api-key`: run on a server someone else started (see the module docstring)."""
    parser.add_argument("--server", help="URL of a running plasticity server (training and readout on)")
    parser.add_argument("--api-key", help="its API key")


def write_results(name: str, out_dir: Path, results) -> Path:
    """The run's numbers as <name>.json beside its report, for scripts and the smoke tests to read."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(results, indent=1, default=float) + "\n")
    return path


def write_report(name: str, out_dir: Path, title: str, body: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.md"
    path.write_text(f"# {title}\n\nMachine: {machine()}. Command: `{command()}`. Written {time.strftime('%Y-%m-%d')}.\n\n"
                    + body.strip() + "\n")
    return path


def plot_lines(path: Path, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str = "",
               logx: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
                      *("| " + " | ".join(fmt(v) for v in row) + " |" for row in rows)])
