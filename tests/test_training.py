"""POST /train on a real server: learning, parity of the trainer's view with vLLM, no stale prefix cache,
serving while training, bad input, dedup, queueing, and a trainer killed mid-step."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import requests

from conftest import API_KEY, completion, prompt_logprobs

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def tok(default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model)


def post_train(server, body, headers=None, raw=None):
    headers = headers if headers is not None else {"Authorization": f"Bearer {API_KEY}"}
    if raw is not None:
        return requests.post(server.url + "/train", data=raw, timeout=600,
                             headers={**headers, "Content-Type": "application/json"})
    return requests.post(server.url + "/train", json=body, headers=headers, timeout=600)


def status(server, job_id=None):
    path = "/train/status" + (f"/{job_id}" if job_id else "")
    return requests.get(server.url + path, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).json()


def greedy_ids(server, model, prompt_ids, n):
    out = completion(server.url, model, prompt_ids, API_KEY, max_tokens=n, return_token_ids=True)
    return out["choices"][0]["token_ids"]


def hf_view_logprobs(server, ids):
    """Log-probs from a Hugging Face model built on views of the served weights, in this process."""
    from plasticity_training.hf_view import build_hf_view, token_logprobs
    from vllm_plasticity.contract.weights import WeightManifest, map_shared_weights

    info = requests.get(server.url + "/plasticity/info", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).json()
    manifest = WeightManifest.from_dict(json.load(open(info["weight_manifest"])))
    model = build_hf_view(info["model"], map_shared_weights(manifest))
    return token_logprobs(model, ids)


PROBE = "The door of the old house was open and the"


def probe_logprobs(server, model, tok):
    return prompt_logprobs(server.url, model, tok(PROBE)["input_ids"], API_KEY)


def test_train_requires_api_key(plasticity_server):
    r = post_train(plasticity_server, {"context_ids": [1], "continuation_ids": [2]}, headers={})
    assert r.status_code == 401


def test_learn_a_fact(plasticity_server, default_model, tok):
    model = str(default_model)
    context = tok("In the story, the name of the cat was")["input_ids"]
    target = tok(" Marigold Quince")["input_ids"]
    assert greedy_ids(plasticity_server, model, context, len(target)) != target
    r = post_train(plasticity_server, {"context_ids": context, "continuation_ids": target, "steps": 20,
                                       "optimizer": {"lr": 1e-2}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "succeeded" and body["steps"] == 20 and body["tokens"] == len(target)
    assert body["losses"][-1] < body["losses"][0]
    assert greedy_ids(plasticity_server, model, context, len(target)) == target


def test_trainer_view_matches_vllm_before_and_after_training(plasticity_server, default_model, tok):
    """Served = the trainer's view after every published step: whole-model steps, and a one-layer step (on
    CPU the server packs again exactly the layers a step wrote: a fused q/k/v or gate/up layer included)."""
    model, ids = str(default_model), tok("A quiet morning on the couch, the tea gone cold")["input_ids"]
    info = requests.get(plasticity_server.url + "/plasticity/info", headers={"Authorization": f"Bearer {API_KEY}"},
                        timeout=10).json()
    assert info["repacked_after_step"] is True  # CPU training servers keep vLLM's packed kernels (oneDNN here)
    # a three-step job: each step's layers are packed while the next step computes (training_service.py)
    for params, steps in ((None, 1), (None, 3), ({"layers": [2, 2]}, 2)):
        served = prompt_logprobs(plasticity_server.url, model, ids, API_KEY)
        view = hf_view_logprobs(plasticity_server, ids)
        assert max(abs(a - b) for a, b in zip(served, view)) <= 1e-5
        r = post_train(plasticity_server, {"context_ids": ids[:5], "continuation_ids": ids[5:9], "force": True,
                                           "steps": steps, "optimizer": {"lr": 1e-3},
                                           **({"params": params} if params else {})})
        assert r.status_code == 200, r.text
        assert len(status(plasticity_server, r.json()["job_id"])["repack_seconds"]) == steps
    served = prompt_logprobs(plasticity_server.url, model, ids, API_KEY)
    assert max(abs(a - b) for a, b in zip(served, hf_view_logprobs(plasticity_server, ids))) <= 1e-5


def test_no_stale_prefix_cache_after_training(plasticity_server, default_model, tok):
    """A generation whose prompt's KV blocks are in the prefix cache (two full blocks: vLLM's CPU block is 128
    tokens), asked again after a step, is computed with the new weights. (A prompt_logprobs request would
    prove nothing here: vLLM never reads the prefix cache for one.)"""
    model = str(default_model)
    ids = tok("The build finally passed after eleven days of failing tests and the whole team " * 30)["input_ids"][:300]
    ask = lambda: completion(plasticity_server.url, model, ids, API_KEY, max_tokens=4, logprobs=0,
                             return_token_ids=True)["choices"][0]
    before = ask()  # its prompt's blocks are now cached
    r = post_train(plasticity_server, {"context_ids": ids[:8], "continuation_ids": ids[8:16], "force": True,
                                       "optimizer": {"lr": 1e-3}})
    assert r.status_code == 200, r.text
    after = ask()
    generated = after["token_ids"]
    fresh = hf_view_logprobs(plasticity_server, ids + generated)[-len(generated):]
    served = after["logprobs"]["token_logprobs"]
    assert served != before["logprobs"]["token_logprobs"]
    # The old weights' KV for the cached 256 tokens would be off by the step's effect (8e-2, measured with
    # the publish step removed); vLLM and HF differ by fp32 rounding alone.
    assert max(abs(a - b) for a, b in zip(served, fresh)) <= 5e-5


def test_serving_continues_while_training(plasticity_server, default_model, tok):
    model, errors, served = str(default_model), [], [0]
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                completion(plasticity_server.url, model, "The morning commute", API_KEY, max_tokens=8, temperature=0.8)
                served[0] += 1
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        ids = tok("She read the paper twice and then once more")["input_ids"]
        r = post_train(plasticity_server, {"context_ids": ids[:4], "continuation_ids": ids[4:], "steps": 50,
                                           "force": True, "optimizer": {"lr": 1e-4}})
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert r.status_code == 200, r.text
    assert r.json()["steps"] == 50
    assert not errors, errors[:3]
    assert served[0] > 0
    assert requests.get(plasticity_server.url + "/health", timeout=10).status_code == 200


BAD_BODIES = {
    "empty context": {"context_ids": [], "continuation_ids": [5]},
    "empty continuation": {"context_ids": [5], "continuation_ids": []},
    "empty samples": {"samples": []},
    "no samples": {"steps": 1},
    "out of vocabulary": {"context_ids": [5], "continuation_ids": [10**6]},
    "negative id": {"context_ids": [-1], "continuation_ids": [5]},
    "too long": {"context_ids": [5] * 600, "continuation_ids": [6]},
    "string ids": {"context_ids": ["5"], "continuation_ids": [6]},
    "float ids": {"context_ids": [5.0], "continuation_ids": [6]},
    "unknown optimizer key": {"context_ids": [5], "continuation_ids": [6], "optimizer": {"momentum": 0.9}},
    "unknown top-level key": {"context_ids": [5], "continuation_ids": [6], "epochs": 3},
    "bad lr": {"context_ids": [5], "continuation_ids": [6], "optimizer": {"lr": -1}},
    "zero steps": {"context_ids": [5], "continuation_ids": [6], "steps": 0},
    "filter selects nothing": {"context_ids": [5], "continuation_ids": [6], "params": {"layers": [40, 50]}},
    "filter switches all off": {"context_ids": [5], "continuation_ids": [6],
                                "params": {"attention": False, "mlp": False, "embeddings": False, "norms": False}},
}
NON_FINITE = {
    "nan lr": '{"context_ids": [5], "continuation_ids": [6], "optimizer": {"lr": NaN}}',
    "infinite eps": '{"context_ids": [5], "continuation_ids": [6], "optimizer": {"eps": Infinity}}',
    "not json": '{"context_ids": [5], ',
}


def test_bad_input_is_rejected_and_changes_nothing(plasticity_server, default_model, tok):
    model = str(default_model)
    before = probe_logprobs(plasticity_server, model, tok)
    version = status(plasticity_server)["weight_version"]
    for name, body in BAD_BODIES.items():
        r = post_train(plasticity_server, body)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        assert r.json()["error"]["message"], name  # the reason is in the answer
    for name, raw in NON_FINITE.items():
        r = post_train(plasticity_server, None, raw=raw)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
    assert probe_logprobs(plasticity_server, model, tok) == before
    assert status(plasticity_server)["weight_version"] == version


def test_duplicates_are_skipped_unless_forced(plasticity_server, tok):
    ids = tok("The green build at midnight")["input_ids"]
    sample = {"context_ids": ids[:3], "continuation_ids": ids[3:]}
    first = post_train(plasticity_server, {**sample, "optimizer": {"lr": 1e-4}}).json()
    second = post_train(plasticity_server, {**sample, "optimizer": {"lr": 1e-4}}).json()
    assert first["steps"] == 1 and first["skipped_duplicates"] == 0
    assert second["steps"] == 0 and second["skipped_duplicates"] == 1
    assert second["weight_version"] == first["weight_version"]
    forced = post_train(plasticity_server, {**sample, "force": True, "optimizer": {"lr": 1e-4}}).json()
    assert forced["steps"] == 1 and forced["weight_version"] == first["weight_version"] + 1


def test_concurrent_jobs_queue_and_run_in_order(plasticity_server, tok):
    ids = tok("A friend leaving at the door")["input_ids"]
    jobs = [post_train(plasticity_server, {"context_ids": ids[:3], "continuation_ids": ids[3:], "steps": 3, "force": True,
                                           "wait": False, "optimizer": {"lr": 1e-4}}).json()["job_id"] for _ in range(3)]
    deadline = time.time() + 300
    while time.time() < deadline and any(status(plasticity_server, j)["status"] in ("queued", "running") for j in jobs):
        time.sleep(0.5)
    details = [status(plasticity_server, j) for j in jobs]
    assert [d["status"] for d in details] == ["succeeded"] * 3
    assert [d["started"] for d in details] == sorted(d["started"] for d in details)
    assert details[0]["finished"] <= details[1]["started"] and details[1]["finished"] <= details[2]["started"]
    versions = [d["weight_version"] for d in details]
    assert versions == [versions[0], versions[0] + 3, versions[0] + 6]
    assert len(details[0]["losses"]) == 3 and len(details[0]["step_seconds"]) == 3


def test_trainer_killed_mid_job_then_recovers(plasticity_server, default_model, tok):
    model = str(default_model)
    ids = tok("The waiting room was quiet")["input_ids"]
    job = post_train(plasticity_server, {"context_ids": ids[:3], "continuation_ids": ids[3:], "steps": 1000,
                                         "force": True, "wait": False, "optimizer": {"lr": 1e-5}}).json()["job_id"]
    deadline = time.time() + 120
    while time.time() < deadline and not status(plasticity_server, job)["losses"]:
        time.sleep(0.1)
    pid = status(plasticity_server)["trainer"]["pid"]
    os.kill(pid, signal.SIGKILL)
    while time.time() < deadline and status(plasticity_server, job)["status"] == "running":
        time.sleep(0.2)
    detail = status(plasticity_server, job)
    assert detail["status"] == "failed" and "killed by signal 9" in detail["error"]
    # The server kept serving.
    assert completion(plasticity_server.url, model, "The door", API_KEY, max_tokens=4)["choices"][0]["text"]
    # The next /train starts a fresh trainer.
    r = post_train(plasticity_server, {"context_ids": ids[:3], "continuation_ids": ids[3:], "force": True,
                                       "optimizer": {"lr": 1e-5}})
    assert r.status_code == 200, r.text
    trainer = status(plasticity_server)["trainer"]
    assert trainer["pid"] != pid and trainer["state"] == "ready" and trainer["restarts"] >= 1


def test_pause_mode_trains_and_generation_resumes(plasticity_server, default_model, tok):
    ids = tok("The first snow came down past the window")["input_ids"]
    r = post_train(plasticity_server, {"context_ids": ids[:4], "continuation_ids": ids[4:], "steps": 2, "force": True,
                                       "pause": True, "optimizer": {"lr": 1e-5}})
    assert r.status_code == 200, r.text
    assert r.json()["steps"] == 2
    # Generation was resumed after the last step.
    out = completion(plasticity_server.url, str(default_model), "The first snow", API_KEY, max_tokens=4)
    assert out["choices"][0]["text"]
