"""Shared fixtures: the built-in model, and real vLLM servers started once per test session.

This machine has 2 cores: at most one vLLM engine runs at a time. `Servers` holds at most one server
and stops it before starting another; tests that need the stock server are ordered first so each kind
of server starts once per session.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from vllm_plasticity.launcher import ServerProcess
from vllm_plasticity.contract.weights import SHM_DIR, ARENA_PREFIX

REPO = Path(__file__).resolve().parent.parent
API_KEY = "plasticity-test-key"
# fp32 end to end: parity tests compare log-probs within 1e-5.
SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16"]
QUIET_SECONDS = 8


# The fixtures that start (or hold) a real `vllm serve`: a test taking any of them is marked `server`.
SERVER_FIXTURES = {"servers", "servers_restart", "stock_reference", "plasticity_server"}


@pytest.hookimpl(tryfirst=True)  # before pytest's -m selection reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if SERVER_FIXTURES & names:
            item.add_marker(pytest.mark.server)
        # A test that starts a server of its own stops the shared one: it must say so (servers_restart), so that
        # it runs after every test that shares it.
        if "servers" in names and not names & {"servers_restart", "plasticity_server", "stock_reference"}:
            raise pytest.UsageError(f"{item.nodeid} takes `servers`: a test starting a server of its own takes "
                                    "`servers_restart` (ordered after the tests that share the plugin server)")
    # Stock-server tests first: the stock engine then runs once and is gone before the plugin's starts.
    # Tests that replace the shared server run last; among them, those that still use it first.
    def order(item):
        names = getattr(item, "fixturenames", ())
        if "servers_restart" in names:  # may also read stock_reference: computed (and cached) by then
            return 2 if "plasticity_server" in names else 3
        if "stock_reference" in names:
            return 0
        return 1

    items.sort(key=order)


@pytest.fixture(scope="session")
def servers_restart(servers):
    """Marks a test that stops the shared plugin server and starts others (ordered last)."""
    return servers


@pytest.fixture(scope="session")
def default_model() -> Path:
    from plasticity_training.default_model import default_model_path

    return default_model_path(log=print)


class Servers:
    """At most one running vLLM server; `start` stops the previous one first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.current: ServerProcess | None = None

    def start(self, name: str, factory) -> ServerProcess:
        self.stop()
        server = factory(log_path=self.log_dir / f"{name}.log")
        self.current = server
        server.wait_ready()
        return server

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    before = set(SHM_DIR.iterdir())
    s = Servers(tmp_path_factory.mktemp("server-logs"))
    yield s
    s.stop()
    leftovers = [p for p in set(SHM_DIR.iterdir()) - before if p.name.startswith((ARENA_PREFIX, "psm_", "torch_", "vllm_dist_"))]
    assert not leftovers, f"shared-memory files left behind: {leftovers}"


def completion(url: str, model: str, prompt, api_key: str | None = None, **body) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = requests.post(url + "/v1/completions", headers=headers, timeout=120,
                      json={"model": model, "prompt": prompt, "temperature": 0, **body})
    r.raise_for_status()
    return r.json()


def prompt_logprobs(url: str, model: str, token_ids: list[int], api_key: str | None = None) -> list[float]:
    """vLLM's log-prob of each prompt token given the ones before it (positions 1..n-1)."""
    out = completion(url, model, token_ids, api_key, max_tokens=1, prompt_logprobs=0)
    entries = out["choices"][0]["prompt_logprobs"]
    return [entries[i][str(t)]["logprob"] for i, t in enumerate(token_ids) if i > 0]


def live_view(server, api_key: str | None = None):
    """The Hugging Face form on views of the weights `server` is serving (whatever training did to them)."""
    import json

    from plasticity_training.hf_view import build_hf_view
    from vllm_plasticity.contract.weights import WeightManifest, map_shared_weights

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    info = requests.get(server.url + "/plasticity/info", headers=headers, timeout=10).json()
    manifest = WeightManifest.from_dict(json.load(open(info["weight_manifest"])))
    return build_hf_view(info["model"], map_shared_weights(manifest))


PROBE_PROMPTS = ["The story begins at the door of the old house", "She read the paper twice and"]


@pytest.fixture(scope="session")
def probe_token_ids(default_model) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model)
    return [tok(p)["input_ids"] for p in PROBE_PROMPTS]


@pytest.fixture(scope="session")
def stock_reference(servers, default_model, probe_token_ids) -> dict:
    """Run stock vLLM (plugin installed, not enabled) once; keep what later tests compare against."""
    server = servers.start("stock", lambda log_path: ServerProcess.stock(default_model, extra_args=SERVER_ARGS, log_path=log_path))
    model = str(default_model)
    ref = {
        "completion": completion(server.url, model, PROBE_PROMPTS[0], max_tokens=16)["choices"][0]["text"],
        "info_status": requests.get(server.url + "/plasticity/info", timeout=10).status_code,
        "train_status": requests.post(server.url + "/train", json={}, timeout=10).status_code,
        "prompt_logprobs": [prompt_logprobs(server.url, model, ids) for ids in probe_token_ids],
        "models": requests.get(server.url + "/v1/models", timeout=10).json(),
    }
    servers.stop()
    return ref


@pytest.fixture(scope="session")
def plasticity_server(servers, default_model, tmp_path_factory) -> ServerProcess:
    """The plugin-enabled server every integration test shares (training on, so weights are shared; API key
    on; banks loadable from `server.vectors_dir`, so every decoder layer is tapped)."""
    state_dir = tmp_path_factory.mktemp("state")
    vectors_dir = tmp_path_factory.mktemp("vectors")
    # A short quiet period so the scheduled checkpoint happens within a test.
    args = [*SERVER_ARGS, "--training", "--api-key", API_KEY, "--state-dir", str(state_dir),
            "--checkpoint-quiet-seconds", str(QUIET_SECONDS), "--vectors-dir", str(vectors_dir)]
    server = servers.start("plasticity", lambda log_path: ServerProcess.plasticity(default_model, extra_args=args, log_path=log_path))
    server.state_dir = state_dir
    server.vectors_dir = vectors_dir
    return server


@pytest.fixture(scope="session")
def auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}
