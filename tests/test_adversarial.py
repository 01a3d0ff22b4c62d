"""Hostile and careless bodies sent to every route that changes something: each gets a 4xx with its
reason, and afterwards the probe prompt's log-probs, the weight version, the loaded banks and the default
steering are exactly as before. A new mutating route joins by adding its rows to HOSTILE."""

from __future__ import annotations

import time

import pytest
import requests

from tests.conftest import API_KEY, prompt_logprobs

pytestmark = pytest.mark.server
AUTH = {"Authorization": f"Bearer {API_KEY}"}
IDS = {"context_ids": [5, 6], "continuation_ids": [7]}
BIG = 10**400  # JSON accepts it; float() makes it inf

DPO = {"context_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8]}

# (method, path, JSON body or raw text, reason the answer must give[, the exact status when a 4xx is not enough])
HOSTILE = [
    ("post", "/train", '{"context_ids": [5], "continuation_ids": [6], "optimizer": {"lr": true}}', "boolean"),
    ("post", "/train", {**IDS, "optimizer": {"lr": 1e30}}, "less than or equal to 1"),
    ("post", "/train", '{"context_ids": [5], "continuation_ids": [6], "optimizer": {"lr": 1e400}}', "lr"),
    ("post", "/train", {**IDS, "steps": True}, "steps"),
    ("post", "/train", {**IDS, "steps": 10**9}, "steps"),
    ("post", "/train", {**IDS, "force": "yes"}, "force"),
    ("post", "/train", {"samples": [IDS] * 1000}, "PLASTICITY_TRAIN_MAX_SAMPLES"),
    ("post", "/train", {"context_ids": [True], "continuation_ids": [6]}, "context_ids"),
    ("post", "/train", {"context_ids": [5], "continuation_ids": [2**63]}, "vocabulary"),
    ("post", "/train", {**IDS, "params": {"layers": [3, 1]}}, "layers"),
    ("post", "/train", {**IDS, "context_mode": "eval"}, "context_mode"),
    ("post", "/train", "[]", "dict"),
    ("post", "/train", {"objective": "dpo", "samples": [IDS]}, "takes samples with context_ids, chosen_ids"),
    ("post", "/train", '{"objective": "dpo", "beta": Infinity, "samples": [{"context_ids": [5], "chosen_ids": [6], '
                       '"rejected_ids": [7]}]}', "beta"),
    ("post", "/train", {"samples": [{**IDS, "weight": -0.5}]}, "weight"),
    ("post", "/train", {**IDS, "optimizer": {"lr": "1e-3"}}, "must be a JSON number, not a string", 400),
    ("post", "/train", {"samples": [{**IDS, "weight": "2"}]}, "must be a JSON number, not a string", 400),
    ("post", "/train", {"objective": "dpo", "beta": "0.5", "samples": [DPO]}, "must be a JSON number", 400),
    # float32 makes 1e-50 zero: the loss would be 0/0 (422 "non-finite loss" once queued); refused up front.
    ("post", "/train", {"samples": [{**IDS, "weight": 1e-50}]}, "weight 1e-50 is too small", 400),
    # A reference log-prob beyond float32 failed the job's start with a 500 and left the trainer stuck.
    ("post", "/train", {"objective": "dpo", "force": True, "optimizer": {"lr": 1e-6},
                        "samples": [{**DPO, "ref_chosen_logp": -1e39, "ref_rejected_logp": 0}]}, "beyond float32's range", 400),
    ("delete", "/train/train-0-nope", None, "no job"),
    ("post", "/checkpoint", {"path": "../../etc"}, "not inside the checkpoint directory"),
    ("post", "/checkpoint", {"path": "/"}, "not inside the checkpoint directory"),
    ("post", "/checkpoint", {"path": 5}, "path"),
    ("post", "/checkpoint", {"path": "a\x00b"}, "null"),
    ("post", "/checkpoint", {"path": "x" * 5000}, "longer than the filesystem allows"),
    ("post", "/checkpoint", {"path": "a", "extra": 1}, "extra"),
    ("post", "/readout/load", {"name": "../x", "path": "b"}, "name"),
    ("post", "/readout/load", {"name": "b", "path": "/etc"}, "outside the vectors directory"),
    ("post", "/readout/load", {"name": "b", "path": "../.."}, "outside the vectors directory"),
    ("post", "/readout/load", {"name": "b", "path": "\x00"}, "path"),
    ("post", "/readout/load", {"name": "b", "basis": [0, 10**9], "layers": [1]}, "basis"),
    ("post", "/readout/load", {"name": "b", "basis": [0, 4], "layers": [99]}, "outside the model"),
    ("post", "/readout/load", {"name": "b", "basis": [0, 4]}, "needs layers"),
    ("delete", "/readout/not-loaded", None, "no bank"),
    ("post", "/steering/default", {"steer": ["nope/c", 1.0]}, "no bank"),
    ("post", "/steering/default", '{"steer": ["x/y", 1e400]}', "finite"),
    ("post", "/steering/default", {"steer": ["x/y", 1.0], "steer_layers": [True]}, "steer_layers"),
    ("post", "/steering/default", {"steer": "x"}, "steer"),
    ("post", "/v1/completions", {"prompt": "x", "vllm_xargs": {"steer": ["x/y", True]}}, "|coef|"),
    ("post", "/v1/completions", {"prompt": "x", "steer": ["x/y", 1e39]}, "|coef|"),
    ("post", "/v1/completions", {"prompt": "x", "steer": ["x/y"]}, "pairs"),
    ("post", "/v1/completions", {"prompt": "x", "readout": ["a", "b"]}, "readout"),
    ("post", "/v1/completions", {"prompt": "x", "vllm_xargs": {"plasticity_key": "k"}}, "reserved"),
    ("post", "/v1/completions", {"prompt": "x", "steer_layers": [1]}, "steer_layers without steer"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "steer": {"x/y": 1e39}}, "|coef|"),
]


def send(server, method, path, body, model):
    if isinstance(body, dict) and path.startswith("/v1/"):
        body = {"model": model, "max_tokens": 2, **body}
    kwargs = {"data": body, "headers": {**AUTH, "Content-Type": "application/json"}} if isinstance(body, str) \
        else {"json": body, "headers": AUTH}
    return requests.request(method, server.url + path, timeout=60, **kwargs)


def snapshot(server, model, probe):
    get = lambda path: requests.get(server.url + path, headers=AUTH, timeout=30).json()
    return {"logprobs": prompt_logprobs(server.url, model, probe, API_KEY), "version": get("/train/status")["weight_version"],
            "banks": get("/readout"), "default": get("/steering/default")}


def test_every_hostile_body_gets_a_4xx_with_its_reason_and_changes_nothing(plasticity_server, default_model):
    server, model = plasticity_server, str(default_model)
    from transformers import AutoTokenizer

    probe = AutoTokenizer.from_pretrained(default_model)("The door of the old house was open")["input_ids"]
    deadline = time.time() + 300  # the trainer starts with the server; the weight version is known once it answers
    while requests.get(server.url + "/train/status", headers=AUTH, timeout=30).json()["trainer"]["state"] != "ready":
        assert time.time() < deadline, "the trainer did not start"
        time.sleep(0.5)
    before = snapshot(server, model, probe)
    failures = []
    for method, path, body, reason, *status in HOSTILE:
        r = send(server, method, path, body, model)
        if not (400 <= r.status_code < 500 and reason in r.text and r.status_code in (status or [r.status_code])):
            failures.append((method, path, str(body)[:80], r.status_code, r.text[:200]))
    assert not failures, failures
    assert snapshot(server, model, probe) == before
