"""Transformer Killer Core served by a real `plasticity serve`: the served model equals its full-sequence form
(memory written causally per token) through the OpenAI API; decode = prefill, batch and chunked-prefill
invariance, causality, per-request memory isolation (tests/recurrent_parity.py); /train lowers the loss on a
memory task and a fresh server from the checkpoint agrees; readout and steering equal the HF form.

One server (--max-num-batched-tokens 64: prompts over 64 tokens are prefilled in chunks that continue from
the saved memory). The test model has 8 memory slots per tier, so the rings wrap within every long prompt.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import requests
import torch

from tests import recurrent_parity as parity
from tests.conftest import live_view
from vllm_plasticity.contract.bank import save_bank
from vllm_plasticity.launcher import ServerProcess

TOL = 1e-4
ARGS = ["--dtype", "float32", "--max-num-seqs", "16", "--max-num-batched-tokens", "64"]
MAX_SEQ_LEN = 256


def prompts(seed: int, lengths=(5, 40, 130, MAX_SEQ_LEN - 1)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def tkc_model(tmp_path_factory):
    from plasticity_training.default_tkc import TKCSpec, build_tkc

    spec = TKCSpec(d_model=48, n_layers=2, mem_slots=8, max_seq_len=MAX_SEQ_LEN, train_steps=0, seed=3)
    return build_tkc(spec, tmp_path_factory.mktemp("tkc") / "model", text="unused", log=lambda m: None)


def hf_model(path):
    from transformers import AutoModelForCausalLM

    from vllm_plasticity.architectures import register_with_transformers

    register_with_transformers()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def reference(model):
    def run(ids: list[int]) -> list[float]:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        return [logp[i - 1, t].item() for i, t in enumerate(ids) if i > 0]
    return run


@pytest.fixture(scope="module")
def tkc_server(servers_restart, tkc_model, tmp_path_factory):
    state_dir, vectors_dir = tmp_path_factory.mktemp("tkc-state"), tmp_path_factory.mktemp("tkc-vectors")
    args = [*ARGS, "--training", "--state-dir", str(state_dir), "--vectors-dir", str(vectors_dir)]
    server = servers_restart.start("tkc", lambda log_path: ServerProcess.plasticity(tkc_model, extra_args=args,
                                                                                  log_path=log_path))
    server.model, server.state_dir, server.vectors_dir = str(tkc_model), state_dir, vectors_dir
    return server


def test_served_tkc_equals_its_full_sequence_form(tkc_server, tkc_model):
    info = requests.get(tkc_server.url + "/plasticity/info", timeout=10).json()
    assert info["architecture"] == "TKCForCausalLM" and info["weights_shareable"]
    assert info["readout"]["hidden_size"] == 48
    parity.logits_match(tkc_server, tkc_server.model, reference(hf_model(tkc_model)), prompts(0), TOL)


def test_decode_equals_prefill(tkc_server):
    parity.decode_equals_prefill(tkc_server, tkc_server.model, prompts(1, (30,))[0], 40, TOL)


def test_batch_and_chunked_prefill_invariance(tkc_server):
    parity.batch_invariant(tkc_server, tkc_server.model, prompts(2, (3, 17, 64, 65, 100, 129, 200, 255)), TOL)


def test_causality_through_the_server(tkc_server):
    for t in (0, 31, 100):
        parity.causal(tkc_server, tkc_server.model, prompts(3, (160,))[0], t, 256, TOL)


def test_one_requests_memory_never_affects_another(tkc_server):
    parity.isolated(tkc_server, tkc_server.model, prompts(4, (7, 50, 90, 120)), 12, TOL)


def test_readout_and_steering_equal_the_hugging_face_form(tkc_server):
    g = torch.Generator().manual_seed(5)
    vectors = torch.randn(2, 48, generator=g)
    save_bank(Path(tkc_server.vectors_dir) / "m", ["a", "b"], {0: vectors}, model="test", method="random")
    assert requests.post(tkc_server.url + "/readout/load", json={"name": "m", "path": "m"}, timeout=60).status_code == 200
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    ids, view = prompts(6, (20,))[0], live_view(tkc_server)
    out = parity._post(tkc_server, {"model": tkc_server.model, "prompt": ids, "max_tokens": 4, "return_token_ids": True,
                                    "vllm_xargs": {"readout": "m", "steer": ["m/a", 2.0]}, "logprobs": 0})["choices"][0]
    seq = ids + out["token_ids"]
    captured = {}

    def steer(module, args, output):
        hidden, states = output
        captured["h"] = (hidden + 2.0 * unit[0])[0]
        return hidden + 2.0 * unit[0], states
    handle = view.layers[0].register_forward_hook(steer)
    try:
        with torch.no_grad():
            logp = torch.log_softmax(view(input_ids=torch.tensor([seq])).logits[0], -1)
    finally:
        handle.remove()
    scores = torch.tensor(out["readout"]["scores"])[:, 0, :]
    assert (scores - captured["h"][: len(seq) - 1] @ unit.T).abs().max().item() <= TOL
    want = [logp[i - 1, t].item() for i, t in enumerate(seq) if i >= len(ids)]
    assert parity.max_gap(out["logprobs"]["token_logprobs"], want) <= TOL


def test_train_learns_a_memory_task_and_a_fresh_server_from_the_checkpoint_agrees(tkc_server, servers_restart, tmp_path):
    from plasticity_training.memory_tasks import copy_memory

    rng = random.Random(0)
    samples = [copy_memory(rng, delay=6, n=4) for _ in range(8)]
    body = {"samples": [{"context_ids": s.context, "continuation_ids": s.continuation} for s in samples],
            "steps": 40, "optimizer": {"lr": 1e-2}}
    r = requests.post(tkc_server.url + "/train", json=body, timeout=900)
    assert r.status_code == 200, r.text
    losses = r.json()["losses"]
    assert losses[-1] < 0.5 * losses[0]
    probe = prompts(7, (60,))[0]
    served = parity.served_logprobs(tkc_server, tkc_server.model, probe)
    with torch.no_grad():
        view = live_view(tkc_server)
        logp = torch.log_softmax(view(input_ids=torch.tensor([probe])).logits[0], -1)
    assert parity.max_gap(served, [logp[i - 1, t].item() for i, t in enumerate(probe) if i > 0]) <= TOL

    assert requests.post(tkc_server.url + "/checkpoint", json={}, timeout=600).status_code == 200
    ckpt = tkc_server.state_dir / "checkpoints" / "main"
    servers_restart.stop()
    fresh = servers_restart.start("tkc-restored", lambda log_path: ServerProcess.plasticity(
        ckpt, extra_args=[*ARGS, "--state-dir", str(tmp_path / "state")], log_path=log_path))
    name = requests.get(fresh.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    assert parity.max_gap(parity.served_logprobs(fresh, name, probe), served) <= 1e-6
    servers_restart.stop()
