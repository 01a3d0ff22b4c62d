"""The plugin's Prometheus series on vLLM's own GET /metrics, on the shared plasticity server: scraped
before and after /train jobs (each outcome), a checkpoint, a trainer restart and readout/steered
completions, the way an operator's Prometheus sees them."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from conftest import API_KEY
from vllm_plasticity.contract.bank import save_bank

pytestmark = pytest.mark.server

AUTH = {"Authorization": f"Bearer {API_KEY}"}


class Scrape:
    """The plasticity: samples of one GET /metrics (which needs no API key, like vLLM's)."""

    def __init__(self, server) -> None:
        r = requests.get(server.url + "/metrics", timeout=30)
        assert r.status_code == 200, r.text
        self.text = r.text
        self.samples = [(s.name, s.labels, s.value) for f in text_string_to_metric_families(r.text) for s in f.samples
                        if s.name.startswith("plasticity:")]

    def __call__(self, name: str, **labels: str) -> float:
        found = [v for n, l, v in self.samples if n == name and all(l.get(k) == x for k, x in labels.items())]
        assert len(found) == 1, (name, labels, found)
        return found[0]


def post(server, path, body):
    return requests.post(server.url + path, json=body, headers=AUTH, timeout=600)


def get(server, path):
    return requests.get(server.url + path, headers=AUTH, timeout=30).json()


SAMPLE = {"context_ids": [5, 17, 42], "continuation_ids": [7, 99, 3, 12]}


def test_training_and_checkpoint_series_move(plasticity_server, default_model):
    before = Scrape(plasticity_server)
    assert "vllm:num_requests_running" in before.text  # vLLM's own series are still there
    job = post(plasticity_server, "/train", {**SAMPLE, "steps": 3, "force": True})
    assert job.status_code == 200, job.text
    job = job.json()
    refused = post(plasticity_server, "/train", {"context_ids": [1], "continuation_ids": [10**9]})
    assert refused.status_code == 400, refused.text
    rejected = post(plasticity_server, "/train", {**SAMPLE, "force": True, "optimizer": {"rank": 3}})
    assert rejected.status_code == 409, rejected.text  # rank is fixed once optimizer state exists
    started = time.time()
    written = post(plasticity_server, "/checkpoint", {})
    assert written.status_code == 200, written.text
    written = written.json()
    after = Scrape(plasticity_server)

    def moved(name: str, **labels: str) -> float:
        return after(name, **labels) - before(name, **labels)

    assert after("plasticity:train_steps_total", model_name=str(default_model)) >= 3  # vLLM's model_name label
    assert moved("plasticity:train_jobs_total", outcome="succeeded") == 1
    assert moved("plasticity:train_jobs_total", outcome="refused") == 1
    assert moved("plasticity:train_jobs_total", outcome="rejected") == 1
    assert moved("plasticity:train_jobs_total", outcome="failed") == 0
    assert moved("plasticity:train_steps_total") == 3
    assert moved("plasticity:train_tokens_total") == 3 * job["tokens"]
    assert moved("plasticity:train_step_duration_seconds_count") == 3
    assert moved("plasticity:train_step_duration_seconds_sum") > 0
    assert after("plasticity:train_last_loss") == pytest.approx(job["losses"][-1])
    assert after("plasticity:weight_version") == get(plasticity_server, "/train/status")["weight_version"]
    # A scheduled checkpoint (the fixture's short quiet period) may have been written too.
    assert moved("plasticity:checkpoint_duration_seconds_count") >= 1
    assert moved("plasticity:checkpoint_bytes_written_total") >= written["bytes_written"] > 0
    assert after("plasticity:checkpoint_last_timestamp_seconds") >= started
    assert moved("plasticity:checkpoint_failures_total") == 0


def test_cancelled_jobs_and_a_trainer_restart_are_counted(plasticity_server):
    before = Scrape(plasticity_server)
    running = post(plasticity_server, "/train", {**SAMPLE, "steps": 1000, "force": True, "wait": False,
                                                 "optimizer": {"lr": 1e-6}}).json()["job_id"]
    queued = post(plasticity_server, "/train", {**SAMPLE, "force": True, "wait": False}).json()["job_id"]
    for job in (queued, running):
        r = requests.delete(plasticity_server.url + f"/train/{job}", headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text
    deadline = time.time() + 120
    while time.time() < deadline and get(plasticity_server, f"/train/status/{running}")["status"] == "running":
        time.sleep(0.1)
    os.kill(get(plasticity_server, "/train/status")["trainer"]["pid"], signal.SIGKILL)
    time.sleep(0.5)
    r = post(plasticity_server, "/train", {**SAMPLE, "force": True})  # starts a fresh trainer
    assert r.status_code == 200, r.text
    after = Scrape(plasticity_server)
    assert after("plasticity:train_jobs_total", outcome="cancelled") - before("plasticity:train_jobs_total", outcome="cancelled") == 2
    assert after("plasticity:trainer_restarts_total") - before("plasticity:trainer_restarts_total") == 1


def test_readout_series_move(plasticity_server, default_model):
    limits = get(plasticity_server, "/readout")["limits"]
    g = torch.Generator().manual_seed(0)
    save_bank(Path(plasticity_server.vectors_dir) / "metrics-bank", ["a", "b", "c"],
              {0: torch.randn(3, limits["hidden_size"], generator=g)}, model="test", method="random")
    before = Scrape(plasticity_server)
    r = post(plasticity_server, "/readout/load", {"name": "metrics-bank", "path": "metrics-bank"})
    assert r.status_code == 200, r.text
    loaded = Scrape(plasticity_server)
    assert loaded("plasticity:readout_banks_loaded") == len(get(plasticity_server, "/readout")["banks"])
    assert loaded("plasticity:readout_capacity_used") - before("plasticity:readout_capacity_used") == 3
    assert loaded("plasticity:readout_capacity") == limits["capacity"]

    def complete(**xargs):
        body = {"model": str(default_model), "prompt": "The door", "max_tokens": 2, "temperature": 0}
        r = post(plasticity_server, "/v1/completions", {**body, **({"vllm_xargs": xargs} if xargs else {})})
        assert r.status_code == 200, r.text

    complete(readout="metrics-bank")
    complete(steer=["metrics-bank/a", 4.0])
    complete(readout="metrics-bank", steer=["metrics-bank/b", 2.0])
    complete()
    after = Scrape(plasticity_server)
    assert after("plasticity:readout_requests_total") - loaded("plasticity:readout_requests_total") == 2
    assert after("plasticity:steered_requests_total") - loaded("plasticity:steered_requests_total") == 2
    requests.delete(plasticity_server.url + "/readout/metrics-bank", headers=AUTH, timeout=30)
    unloaded = Scrape(plasticity_server)
    assert unloaded("plasticity:readout_banks_loaded") == len(get(plasticity_server, "/readout")["banks"])
    assert unloaded("plasticity:readout_capacity_used") == before("plasticity:readout_capacity_used")
