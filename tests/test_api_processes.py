"""`plasticity serve --api-server-count 2`: vLLM's several API server processes on one port, the plugin's state
owned by one of them (api_processes.py). Every request goes out on a fresh connection, so the kernel spreads
them over both processes, as it spreads a real deployment's clients: each must see the same banks, the same
trainer and its jobs, and the same Prometheus series, whichever process it reached."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API_KEY, SERVER_ARGS
import vllm_plasticity
from vllm_plasticity.api_processes import FORWARDED_HEADER
from vllm_plasticity.launcher import ServerProcess

pytestmark = [pytest.mark.server, pytest.mark.slow]

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PLUGIN = Path(vllm_plasticity.__file__).parent
SAMPLE = {"context_ids": [5, 17, 42], "continuation_ids": [7, 99, 3, 12]}


def fresh(server, method: str, path: str, **kwargs) -> requests.Response:
    """One request on a connection of its own (no keep-alive): the kernel picks the process anew."""
    headers = {**AUTH, "Connection": "close", **kwargs.pop("headers", {})}
    return requests.request(method, server.url + path, headers=headers, timeout=300, **kwargs)


def scrape(server) -> dict[str, float]:
    """The plasticity: series of one GET /metrics without labels other than model_name (one value each)."""
    r = fresh(server, "GET", "/metrics")
    assert r.status_code == 200, r.text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name.startswith("plasticity:") and set(s.labels) == {"model_name"}:
                assert s.name not in values, f"{s.name}: one series per process, not one value"
                values[s.name] = s.value
    return values


def test_two_api_server_processes_share_one_trainer_one_set_of_banks_and_one_view_of_the_metrics(
        servers_restart, default_model, tmp_path):
    state, vectors = tmp_path / "state", tmp_path / "vectors"
    vectors.mkdir()
    args = [*SERVER_ARGS, "--enforce-eager", "--training", "--api-key", API_KEY, "--state-dir", str(state),
            "--vectors-dir", str(vectors), "--api-server-count", "2"]  # eager: this test is the processes, not the graph
    server = servers_restart.start("two-api-servers", lambda log_path: ServerProcess.plasticity(
        default_model, extra_args=args, log_path=log_path))
    try:
        deadline = time.monotonic() + 120  # /health answers as soon as either process serves; the owner may be later
        while fresh(server, "GET", "/plasticity/info").status_code != 200:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(1)
        log = server.log_path.read_text()
        assert log.count("owns the plugin's state") == 1 and log.count("forwards plasticity requests to the owner") == 1, log[-3000:]

        loaded = fresh(server, "POST", "/readout/load", json={"name": "dims", "basis": [0, 8], "layers": [1]})
        assert loaded.status_code == 200, loaded.text
        forwarded = answered_there = 0
        for _ in range(60):  # until both processes have been reached a few times
            r = fresh(server, "GET", "/readout")
            assert r.status_code == 200 and [b["name"] for b in r.json()["banks"]] == ["dims"], r.text
            forwarded, answered_there = forwarded + (FORWARDED_HEADER in r.headers), answered_there + (FORWARDED_HEADER not in r.headers)
            if forwarded >= 3 and answered_there >= 3:
                break
        assert forwarded >= 3 and answered_there >= 3, f"60 connections: {forwarded} forwarded, {answered_there} not"
        for _ in range(6):  # a completion that reads goes to the owner, whichever process it reached
            r = fresh(server, "POST", "/v1/completions", json={"model": str(default_model), "prompt": "The story begins",
                                                                "max_tokens": 2, "temperature": 0, "vllm_xargs": {"readout": "dims"}})
            assert r.status_code == 200 and r.json()["choices"][0]["readout"]["bank"] == "dims", r.text
        assert fresh(server, "POST", "/v1/completions", json={"model": str(default_model), "prompt": "x", "max_tokens": 1,
                                                               "vllm_xargs": {"readout": "nope"}}).status_code == 400

        before = scrape(server)
        job = fresh(server, "POST", "/train", json={**SAMPLE, "steps": 2, "force": True})
        assert job.status_code == 200 and job.json()["status"] == "succeeded", job.text
        job_id = job.json()["job_id"]
        written = fresh(server, "POST", "/checkpoint")
        assert written.status_code == 200 and written.json()["bytes_written"] > 0, written.text
        for _ in range(6):  # one trainer, one job list; every scrape, from either process, shows the owner's series
            r = fresh(server, "GET", f"/train/status/{job_id}")
            assert r.status_code == 200 and r.json()["steps"] == 2, r.text
            after = scrape(server)
            assert after["plasticity:train_steps_total"] == before["plasticity:train_steps_total"] + 2
            assert after["plasticity:checkpoint_bytes_written_total"] == (before["plasticity:checkpoint_bytes_written_total"]
                                                                          + written.json()["bytes_written"])
            assert after["plasticity:weight_version"] == job.json()["weight_version"]
            assert after["plasticity:readout_requests_total"] == before["plasticity:readout_requests_total"]
        statuses = [fresh(server, "GET", "/train/status").json() for _ in range(4)]
        assert {(s["trainer"]["pid"], s["weight_version"]) for s in statuses} == {(statuses[0]["trainer"]["pid"], job.json()["weight_version"])}
        assert fresh(server, "GET", "/readout", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert fresh(server, "POST", "/train", json={**SAMPLE, "steps": 1, "force": True}).status_code == 200
    finally:
        servers_restart.stop()
    # vLLM's manager gave the owner time for its exit (cli.py's --shutdown-timeout): the step above is on disk
    log = server.log_path.read_text()
    assert "plasticity: checkpoint at exit" in log, log[-3000:]
    plugin_frames = [line for line in log.splitlines() if line.strip().startswith(f'File "{PLUGIN}')]
    assert not plugin_frames, plugin_frames  # (vLLM may log its own output handler's end at shutdown)
    assert not list(state.glob("api-*.shared")), "the owner's shared file outlived the server"
