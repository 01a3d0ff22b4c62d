"""Transformer Killer Core served by a real `plasticity serve`: the served model equals its full-sequence form
(memory written causally per token) through the OpenAI API; decode = prefill, batch and chunked-prefill
invariance, causality, per-request memory isolation (tests/recurrent_parity.py); /train lowers the loss on a
memory task and a fresh server from the checkpoint agrees; readout and steering equal the HF form.

One server per backbone (--max-num-batched-tokens 64: prompts over 64 tokens are prefilled in chunks that
continue from the saved state): "gru" (the whole model in one state layer) and "mamba2" (vLLM's own
MambaMixer2 layers, then the memory in a state layer of its own). The test models have 8 memory slots per
tier, so the rings wrap within every long prompt.
"""

from __future__ import annotations

import random

import pytest
import requests

from tests import recurrent_parity as parity
from vllm_plasticity.launcher import ServerProcess

TOL = 1e-4
ARGS = ["--dtype", "float32", "--max-num-seqs", "16", "--max-num-batched-tokens", "64"]
MAX_SEQ_LEN = 256
WIDTH = 48
STEPS = 40  # /train steps on the memory task


def prompts(seed: int, lengths=(5, 40, 130, MAX_SEQ_LEN - 1)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(n)] for n in lengths]


# The Mamba2 backbone (a second server, and a 2.5-minute build) is in the full tier.
@pytest.fixture(scope="module", params=["gru", pytest.param("mamba2", marks=pytest.mark.slow)])
def tkc_model(request, tmp_path_factory):
    from plasticity_training.default_model import build_model
    from plasticity_training.default_tkc import TKCSpec

    # Mamba2: 6 heads of 16 channels, SSM state 16 per channel.
    spec = TKCSpec(d_model=WIDTH, n_layers=2, mem_slots=8, max_seq_len=MAX_SEQ_LEN, train_steps=0, seed=3,
                   backbone=request.param, mamba_d_state=16, mamba_headdim=16)
    return build_model(spec, tmp_path_factory.mktemp("tkc") / "model", text="unused", log=lambda m: None)


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
    assert info["readout"]["hidden_size"] == WIDTH
    parity.logits_match(tkc_server, tkc_server.model, parity.reference(parity.hf_model(tkc_model)), prompts(0), TOL)


def test_decode_equals_prefill(tkc_server):
    parity.decode_equals_prefill(tkc_server, tkc_server.model, prompts(1, (30,))[0], 40, TOL)


def test_batch_and_chunked_prefill_invariance(tkc_server):
    # lengths repeated: prompts of one length are prefilled as one batch by the recurrent layer
    parity.batch_invariant(tkc_server, tkc_server.model, prompts(2, (3, 17, 17, 64, 64, 65, 100, 129, 200, 255)),
                           TOL, generate=8)


def test_causality_through_the_server(tkc_server):
    for t in (0, 31, 100):
        parity.causal(tkc_server, tkc_server.model, prompts(3, (160,))[0], t, 256, TOL)


def test_one_requests_memory_never_affects_another(tkc_server):
    parity.isolated(tkc_server, tkc_server.model, prompts(4, (7, 50, 90, 120)), 12, TOL)


def test_readout_and_steering_equal_the_hugging_face_form(tkc_server):
    parity.readout_and_steering(tkc_server, WIDTH, prompts(6, (20,))[0], TOL)


def test_signals_are_refused_where_the_architecture_reports_none(tkc_server):
    r = requests.post(tkc_server.url + "/v1/completions", timeout=60, json={
        "model": tkc_server.model, "prompt": [1, 2, 3], "max_tokens": 1, "vllm_xargs": {"signals": True}})
    assert r.status_code == 400 and "reports no per-token signals" in r.text


@pytest.mark.slow  # a second server
def test_train_learns_a_memory_task_and_a_fresh_server_from_the_checkpoint_agrees(tkc_server, servers_restart, tmp_path):
    from plasticity_training.memory_tasks import copy_memory

    rng = random.Random(0)
    samples = [copy_memory(rng, delay=6, n=4) for _ in range(8)]
    parity.train_then_restart(tkc_server, servers_restart, samples, STEPS, prompts(7, (60,))[0], ARGS, tmp_path / "state", TOL)
