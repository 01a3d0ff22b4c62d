"""What an adversarial pass through the public routes broke, each as a test through those routes on the
session's server (issue "Hardening"): a steering coefficient that poisoned later requests, /train settings
that wrecked the model, unbounded jobs without cancel, a checkpoint of non-finite weights, a weight version
that went backwards, bank files outside the vectors directory or not banks at all, and a bank replaced
under a running readout request. (Shared memory after a SIGKILL is tests/test_shm_after_kill.py.)"""

from __future__ import annotations

import json
import os
import pickle
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

from vllm_plasticity.contract.bank import save_bank
from tests.conftest import API_KEY, prompt_logprobs

pytestmark = pytest.mark.server
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = ["The story begins at the door of the old house", "She read the paper twice and", "A friend left"]


def post(server, path, body=None, **kw):
    return requests.post(server.url + path, json=body, headers=AUTH, timeout=600, **kw)


def get(server, path):
    r = requests.get(server.url + path, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def message(r) -> str:
    body = r.json()
    return body["error"]["message"] if "error" in body else json.dumps(body.get("detail"))


def same_outputs(a, b) -> bool:
    """Same greedy text, log-probs equal to fp32 noise (batch composition may differ)."""
    return all(ta == tb and all(abs(x - y) <= 1e-5 for x, y in zip(la, lb)) for (ta, la), (tb, lb) in zip(a, b))


def plain_outputs(server, model):
    """Greedy text and per-token log-probs of unsteered requests: what another client sees."""
    out = []
    for p in PROMPTS:
        r = post(server, "/v1/completions", {"model": model, "prompt": p, "max_tokens": 8, "temperature": 0, "logprobs": 1})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        out.append((choice["text"], choice["logprobs"]["token_logprobs"]))
    return out


def wait_for(predicate, timeout=120.0, every=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def write_bank(server, name, concepts, layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    return save_bank(Path(server.vectors_dir) / name, concepts, {L: torch.randn(len(concepts), 128, generator=g) for L in layers},
                     model="test", method="random")


@pytest.fixture(scope="module")
def tok(plasticity_server, default_model):
    from transformers import AutoTokenizer

    # The trainer starts in the background with the server; the weight version is known once it answers.
    wait_for(lambda: get(plasticity_server, "/train/status")["trainer"]["state"] == "ready", timeout=300)
    return AutoTokenizer.from_pretrained(default_model)


@pytest.fixture(scope="module")
def hard_bank(plasticity_server):
    write_bank(plasticity_server, "hard", ["up", "down"], [1, 2])
    assert post(plasticity_server, "/readout/load", {"name": "hard", "path": "hard"}).status_code == 200
    yield "hard"
    requests.delete(plasticity_server.url + "/steering/default", headers=AUTH, timeout=10)


def train_body(tok, text, **extra):
    ids = tok(text)["input_ids"]
    return {"context_ids": ids[:3], "continuation_ids": ids[3:], "force": True, "optimizer": {"lr": 1e-5}, **extra}


# ---- 1. steering coefficients ---------------------------------------------------------------------------

def test_a_steering_coefficient_beyond_the_bound_is_refused_and_no_steered_request_affects_another(
        plasticity_server, default_model, hard_bank):
    server, model = plasticity_server, str(default_model)
    before = plain_outputs(server, model)
    refused = [{"vllm_xargs": {"steer": ["hard/up", 1e39]}}, {"steer": ["hard/up", 1e39]},
               {"vllm_xargs": {"steer": ["hard/up", 2e6]}}, {"steer": {"hard/up": -1e7}},
               {"vllm_xargs": {"steer": ["hard/up", True]}}, {"steer": ["hard/up", True]}]
    for body in refused:
        r = post(server, "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 2, **body})
        assert r.status_code == 400 and "|coef| <= 1e+06" in message(r), (body, r.status_code, r.text)
    for steer in (["hard/up", 1e39], ["hard/up", True], {"hard/down": 1e7}):
        r = post(server, "/steering/default", {"steer": steer})
        assert r.status_code == 400 and "|coef| <= 1e+06" in message(r), (steer, r.text)
    assert get(server, "/steering/default") is None
    # The largest coefficient allowed, at every layer of the bank, in a batch with plain requests and
    # before them: no plain request's text or log-probs move.
    steered = [threading.Thread(target=post, args=(server, "/v1/completions", {
        "model": model, "prompt": PROMPTS[i % 3], "max_tokens": 16, "temperature": 0,
        "vllm_xargs": {"steer": ["hard/up", 1e6, "hard/down", -1e6]}})) for i in range(4)]
    for t in steered:
        t.start()
    during = plain_outputs(server, model)
    for t in steered:
        t.join()
    assert same_outputs(during, before) and same_outputs(plain_outputs(server, model), before)


# ---- 2. /train settings ---------------------------------------------------------------------------------

def test_train_settings_must_be_numbers_within_their_documented_bounds(plasticity_server, default_model, tok):
    server, model = plasticity_server, str(default_model)
    probe = tok(PROMPTS[0])["input_ids"]
    before, version = prompt_logprobs(server.url, model, probe, API_KEY), get(server, "/train/status")["weight_version"]
    bad = {"lr": True, "eps": False, "weight_decay": True, "scale": True, "grad_clip": True, "betas": [True, 0.9],
           "norm_growth_limit": True}
    bad_values = {"lr": 1e30, "eps": 2.0, "weight_decay": 5.0, "scale": 1e5, "grad_clip": 1e7, "rank": 10**6,
                  "warmup_steps": 10**7, "proj_refresh": 10**7, "norm_growth_limit": 1e4}
    for key, value in [*bad.items(), *bad_values.items()]:
        r = post(server, "/train", train_body(tok, "The lamp was lit", optimizer={key: value}))
        assert r.status_code == 400, (key, value, r.status_code, r.text)  # vLLM answers validation errors 400
        assert key in message(r) and ("boolean" in message(r) or "less than" in message(r)), (key, r.text)
    assert prompt_logprobs(server.url, model, probe, API_KEY) == before
    assert get(server, "/train/status")["weight_version"] == version


# ---- 3. limits and cancel -------------------------------------------------------------------------------

def test_requests_beyond_the_limits_are_refused_before_they_are_queued(plasticity_server, tok):
    server = plasticity_server
    version = get(server, "/train/status")["weight_version"]
    many = {"samples": [{"context_ids": [5], "continuation_ids": [6]}] * 65}
    long = {"samples": [{"context_ids": [5] * 400, "continuation_ids": [6] * 100}] * 17}  # 8500 tokens
    for body, reason in ((many, "PLASTICITY_TRAIN_MAX_SAMPLES"), (long, "PLASTICITY_TRAIN_MAX_TOKENS")):
        r = post(server, "/train", body)
        assert r.status_code == 400 and reason in message(r), r.text
    r = post(server, "/train", train_body(tok, "The lamp was lit", steps=1001))
    assert r.status_code == 400 and "steps" in message(r)
    status = get(server, "/train/status")
    assert status["queue"] == [] and status["weight_version"] == version


def test_jobs_cancel_and_checkpoints_are_answered_between_steps_of_a_long_job(plasticity_server, tok):
    server = plasticity_server
    version = get(server, "/train/status")["weight_version"]
    long = post(server, "/train", train_body(tok, "The rain kept falling on the roof", steps=1000, wait=False)).json()
    queued = post(server, "/train", train_body(tok, "A second job waits", wait=False)).json()
    wait_for(lambda: len(get(server, f"/train/status/{long['job_id']}")["losses"]) >= 2)

    t0 = time.monotonic()
    r = post(server, "/checkpoint", {"path": "between-steps"})
    assert r.status_code == 200, r.text
    assert get(server, f"/train/status/{long['job_id']}")["status"] == "running"  # answered mid-job
    assert time.monotonic() - t0 < 60

    r = requests.delete(server.url + f"/train/{queued['job_id']}", headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = requests.delete(server.url + f"/train/{long['job_id']}", headers=AUTH, timeout=10)
    assert r.status_code == 200
    detail = wait_for(lambda: (d := get(server, f"/train/status/{long['job_id']}"))["status"] != "running" and d)
    assert detail["status"] == "cancelled" and "cancelled" in detail["error"]
    assert 2 <= len(detail["losses"]) < 1000
    never_ran = get(server, f"/train/status/{queued['job_id']}")
    assert never_ran["status"] == "cancelled" and never_ran["started"] is None and never_ran["losses"] == []
    # Every step taken is whole and counted; nothing else ran.
    assert get(server, "/train/status")["weight_version"] == version + len(detail["losses"])
    r = requests.delete(server.url + f"/train/{long['job_id']}", headers=AUTH, timeout=10)
    assert r.status_code == 409 and "already ended" in message(r)
    r = requests.delete(server.url + "/train/no-such-job", headers=AUTH, timeout=10)
    assert r.status_code == 404


# ---- 5. the weight version ------------------------------------------------------------------------------

def test_the_weight_version_never_goes_backwards_when_the_trainer_dies(plasticity_server, tok):
    server = plasticity_server
    job = post(server, "/train", train_body(tok, "The clock in the hall struck", steps=1000, wait=False)).json()
    wait_for(lambda: len(get(server, f"/train/status/{job['job_id']}")["losses"]) >= 5)
    os.kill(get(server, "/train/status")["trainer"]["pid"], signal.SIGKILL)
    wait_for(lambda: get(server, f"/train/status/{job['job_id']}")["status"] == "failed")
    reached = get(server, "/train/status")["weight_version"]
    assert reached >= 5
    r = post(server, "/checkpoint", {"path": "after-kill"})  # runs on a fresh trainer with older saved state
    assert r.status_code == 200, r.text
    assert r.json()["weight_version"] >= reached
    assert get(server, "/train/status")["weight_version"] >= reached
    assert get(server, "/checkpoint")["last"]["weight_version"] >= reached


# ---- 2. a checkpoint never holds a wreck ----------------------------------------------------------------

def test_a_checkpoint_of_non_finite_weights_is_refused_and_the_previous_one_kept(plasticity_server):
    from vllm_plasticity.contract.weights import WeightManifest, map_shared_weights

    server = plasticity_server
    assert post(server, "/checkpoint", {"path": "finite"}).status_code == 200
    link = Path(server.state_dir) / "checkpoints" / "finite" / "current"
    generation = os.readlink(link)
    manifest = WeightManifest.from_dict(json.load(open(get(server, "/plasticity/info")["weight_manifest"])))
    norm = map_shared_weights(manifest)["model.norm.weight"]
    kept = norm[0].item()
    norm[0] = float("nan")  # a fault in the live weights (no request is served while it is there)
    try:
        r = post(server, "/checkpoint", {"path": "finite"})
        assert 500 <= r.status_code < 600 and "NaN" in message(r), r.text
        assert os.readlink(link) == generation
    finally:
        norm[0] = kept
    assert post(server, "/checkpoint", {"path": "finite"}).status_code == 200


# ---- 6, 7, 8. bank files and checkpoint paths -----------------------------------------------------------

def test_only_real_banks_inside_the_vectors_dir_load_and_bad_paths_get_a_400(plasticity_server, hard_bank):
    server = plasticity_server
    vdir, outside = Path(server.vectors_dir), Path(server.state_dir) / "outside-bank"
    listing = get(server, "/readout")
    save_bank(outside, ["a"], {1: torch.ones(1, 128)}, model="t", method="t")
    linked = vdir / "linked"
    linked.mkdir()
    (linked / "readout.json").write_text((outside / "readout.json").read_text())
    (linked / "readout.safetensors").symlink_to(outside / "readout.safetensors")
    for name, content in (("text", b"just some text\n"), ("pickle", pickle.dumps({"layer_1.vectors": [1.0]})),
                          ("header", (10**12).to_bytes(8, "little") + b"{}")):
        write_bank(server, name, ["a", "b"], [1])
        (vdir / name / "readout.safetensors").write_bytes(content)
    write_bank(server, "dupes", ["a", "b"], [1])
    manifest = json.loads((vdir / "dupes" / "readout.json").read_text())
    (vdir / "dupes" / "readout.json").write_text(json.dumps({**manifest, "concepts": ["a", "a"]}))
    write_bank(server, "empty", ["a"], [1])
    (vdir / "empty" / "readout.json").write_text(json.dumps({**manifest, "concepts": [], "layers": []}))

    cases = {"linked": "outside the vectors directory", "text": "not a readout bank", "pickle": "not a readout bank",
             "header": "not a readout bank", "dupes": "duplicate", "empty": "empty bank", "x" * 300: "too long",
             "deep/" * 900 + "x": "too long"}
    for path, reason in cases.items():
        r = post(server, "/readout/load", {"name": "probe", "path": path})
        assert r.status_code == 400 and reason in message(r), (path[:20], r.status_code, r.text)
    assert get(server, "/readout") == listing

    assert post(server, "/checkpoint", {"path": "nest"}).status_code == 200
    for path, reason in (("nest/gen-b/sub", "inside the checkpoint"), ("nest/gen-a", "inside the checkpoint"),
                         ("n" * 300, "longer than the filesystem allows")):
        r = post(server, "/checkpoint", {"path": path})
        assert r.status_code == 400 and reason in message(r), (path[:20], r.status_code, r.text)
    assert sorted(p.name for p in (Path(server.state_dir) / "checkpoints" / "nest").iterdir()) == [".lock", "current", "gen-a", "gen-b"]


# ---- 4. a bank replaced under a running readout request -------------------------------------------------

def test_a_request_keeps_the_bank_version_it_started_with(plasticity_server, default_model):
    server, model = plasticity_server, str(default_model)
    write_bank(server, "swap_v1", ["a", "b"], [1], seed=1)
    write_bank(server, "swap_v2", ["p", "q", "r"], [1, 2], seed=2)
    assert post(server, "/readout/load", {"name": "swapped", "path": "swap_v1"}).status_code == 200
    body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True, "temperature": 0,
            "vllm_xargs": {"readout": "swapped"}}
    chunks = []
    with requests.post(server.url + "/v1/completions", json={**body, "stream": True}, headers=AUTH, stream=True,
                       timeout=600) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            readout = json.loads(line[len(b"data: "):])["choices"][0].get("readout")
            if readout is None:
                continue
            chunks.append(readout)
            if len(chunks) == 1:  # the request is running: replace its bank (other concepts and layers)
                assert post(server, "/readout/load", {"name": "swapped", "path": "swap_v2"}).status_code == 200
    for readout in chunks:  # labels and shapes agree in every chunk: those of the version it started with
        assert readout["concepts"] == ["a", "b"] and readout["layers"] == [1]
        assert all(len(row) == 1 and len(row[0]) == 2 for row in readout["scores"])
        assert len(readout["scores"]) == len(readout["positions"])
    assert any("replaced" in c.get("error", "") for c in chunks)

    # Non-streaming: the same request with the bank swapped back while it runs answers 200, consistently.
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=post(server, "/v1/completions", body)))
    worker.start()
    time.sleep(0.3)
    assert post(server, "/readout/load", {"name": "swapped", "path": "swap_v1"}).status_code == 200
    worker.join()
    assert result["r"].status_code == 200, result["r"].text
    readout = result["r"].json()["choices"][0]["readout"]
    width = (len(readout["layers"]), len(readout["concepts"]))
    assert all((len(row), len(row[0])) == width for row in readout["scores"])
    assert len(readout["scores"]) == len(readout["positions"])


# ---- round 2 (issue "Hardening, round 2"), items 1 and 2 --------------------------------------------------

def test_a_job_start_that_fails_leaves_the_trainer_ready_for_every_client(plasticity_server, tok):
    """The issue's body: a DPO reference log-prob beyond float32. It must never leave a job open in the trainer
    (every later /train answered 409 "a job is already running" while /train/status said ready)."""
    server = plasticity_server
    ids = tok("The lamp was lit")["input_ids"]
    body = {"objective": "dpo", "samples": [{"context_ids": ids[:2], "chosen_ids": ids[2:3], "rejected_ids": [5],
                                             "ref_chosen_logp": -1e39, "ref_rejected_logp": 0}],
            "optimizer": {"lr": 1e-6}, "force": True}
    r = post(server, "/train", body)
    assert r.status_code in (400, 500) and message(r), r.text  # 400 once ref log-probs are validated at the edge
    r = post(server, "/train", train_body(tok, "The lamp was lit in the window"))
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    assert get(server, "/train/status")["trainer"]["state"] == "ready"


def test_a_diverging_job_stops_as_diverged_and_rolls_back_by_default(plasticity_server, default_model, tok):
    """{"lr": 1, "scale": 1000, "grad_clip": 1e6} took the loss 2.83 -> 2561 -> 54784 and the output to
    "atatat..."; now the job stops as diverged and the trained tensors are restored to its start, so other
    clients' outputs are as before, the version moved on, and the automatic checkpoints are not held."""
    server, model = plasticity_server, str(default_model)
    before, version = plain_outputs(server, model), get(server, "/train/status")["weight_version"]
    r = post(server, "/train", train_body(tok, "The lamp was lit in the window", steps=50,
                                          optimizer={"lr": 1, "scale": 1000, "grad_clip": 1e6}))
    assert r.status_code == 422 and "diverged" in message(r) and "rolled back" in message(r), r.text
    job = get(server, "/train/status")["recent_jobs"][0]
    assert job["status"] == "diverged" and job["rolled_back"] is True and 1 <= job["steps"] < 50
    assert get(server, f"/train/status/{job['job_id']}")["rollback_bytes"] > 0
    assert same_outputs(plain_outputs(server, model), before)
    assert get(server, "/train/status")["weight_version"] == version + job["steps"] + 1
    assert get(server, "/checkpoint")["held"] is None
