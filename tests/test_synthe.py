"""SYNTHE served by a real `plasticity serve`: the served model equals its full-sequence form through the
OpenAI API with the probe gated causally (firing for some tokens, not others); decode = prefill, batch and
chunked-prefill invariance, causality, per-request isolation (tests/recurrent_parity.py); readout and
steering equal the HF form; /train lowers the loss and a fresh server from the checkpoint agrees. The slow
sweep serves the `never` and `always` modes too, and the model without its memory hub and router (the
settings research/results/synthe_memory.md found a model needs to learn the memory tasks from scratch).

One server (--max-num-batched-tokens 64: prompts over 64 tokens are prefilled in chunks that continue from
the saved state and the paged KV cache). The test model's probe window is 8 tokens (vLLM's sliding-window
attention; head size 32, the smallest vLLM's CPU attention takes) and its hub tiers update every 16 and
128, so long prompts cross every boundary, within and across chunks.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import requests
import torch

from tests import recurrent_parity as parity
from vllm_plasticity.launcher import ServerProcess

TOL = 1e-4
ARGS = ["--dtype", "float32", "--max-num-seqs", "16", "--max-num-batched-tokens", "64"]
MAX_SEQ_LEN = 256
WIDTH = 64
STEPS = 30  # /train steps on the memory task


def prompts(seed: int, lengths=(5, 40, 130, MAX_SEQ_LEN - 1)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(n)] for n in lengths]


def build(out_dir: Path, gate: str, **settings) -> Path:
    from plasticity_training.default_model import build_model
    from plasticity_training.default_synthe import SyntheSpec

    # PyTorch's initial weights, larger than the reference's N(0, 0.02): every part's effect on the
    # log-probs is far above the tolerance. probe_threshold 0.31: about the median Kalman confidence of this
    # random model, so the causal gate fires for some tokens and not for others (checked below).
    spec = SyntheSpec(d_model=WIDTH, n_blocks=3, n_heads=2, wiener_state_dim=8, tier_dims=(16, 8, 4), probe_window=8,
                      probe_gate=gate, probe_threshold=0.31, max_seq_len=MAX_SEQ_LEN, reference_init=False,
                      train_steps=0, seed=3, **settings)
    return build_model(spec, out_dir, text="unused", log=lambda m: None)


@pytest.fixture(scope="module")
def synthe_model(tmp_path_factory):
    return build(tmp_path_factory.mktemp("synthe") / "model", "causal")


def firing_rate(model, ids: list[int]) -> float:
    with torch.no_grad():
        return model.probe_gates(torch.tensor([ids])).mean().item()


@pytest.fixture(scope="module")
def synthe_server(servers_restart, synthe_model, tmp_path_factory):
    state_dir, vectors_dir = tmp_path_factory.mktemp("synthe-state"), tmp_path_factory.mktemp("synthe-vectors")
    args = [*ARGS, "--training", "--state-dir", str(state_dir), "--vectors-dir", str(vectors_dir)]
    server = servers_restart.start("synthe", lambda log_path: ServerProcess.plasticity(synthe_model, extra_args=args,
                                                                                     log_path=log_path))
    server.model, server.state_dir, server.vectors_dir = str(synthe_model), state_dir, vectors_dir
    return server


def test_served_synthe_equals_its_full_sequence_form(synthe_server, synthe_model):
    info = requests.get(synthe_server.url + "/plasticity/info", timeout=10).json()
    assert info["architecture"] == "SyntheForCausalLM" and info["weights_shareable"]
    assert info["readout"]["hidden_size"] == WIDTH
    hf = parity.hf_model(synthe_model)
    assert 0.1 < firing_rate(hf, prompts(0)[-1]) < 0.9  # the causal gate is exercised both ways
    parity.logits_match(synthe_server, synthe_server.model, parity.reference(hf), prompts(0), TOL)


def test_decode_equals_prefill(synthe_server):
    parity.decode_equals_prefill(synthe_server, synthe_server.model, prompts(1, (30,))[0], 40, TOL)


def test_batch_and_chunked_prefill_invariance(synthe_server):
    # lengths repeated: prompts of one length are prefilled as one batch by the recurrent layer
    parity.batch_invariant(synthe_server, synthe_server.model, prompts(2, (3, 17, 17, 64, 64, 65, 100, 129, 200, 255)),
                           TOL, generate=8)


def test_causality_through_the_server(synthe_server):
    for t in (0, 31, 130):
        parity.causal(synthe_server, synthe_server.model, prompts(3, (160,))[0], t, 256, TOL)


def test_one_requests_state_never_affects_another(synthe_server):
    parity.isolated(synthe_server, synthe_server.model, prompts(4, (7, 50, 90, 120)), 12, TOL)


def test_signals_through_the_server_equal_the_full_sequence_form(synthe_server, synthe_model):
    """`signals: true` returns the Kalman confidences, probe gates, router budgets and surprises of every
    token as the full-sequence form computes them, whole or streamed, on a server where no bank was ever
    loaded (runs before the readout test)."""
    import json

    hf = parity.hf_model(synthe_model)
    names = hf.signal_names()
    info = requests.get(synthe_server.url + "/plasticity/info", timeout=10).json()
    assert info["readout"]["signals"] == names
    ids = prompts(8, (50,))[0]
    body = {"model": synthe_server.model, "prompt": ids, "max_tokens": 5, "return_token_ids": True,
            "vllm_xargs": {"signals": True}}
    out = parity._post(synthe_server, body)["choices"][0]
    seq = ids + out["token_ids"]
    with torch.no_grad():
        full, _ = hf.stream(torch.tensor([seq]), hf.zero_states(1, torch.device("cpu")), signals=True)
    want = full[0, :, WIDTH:]
    readout = out["readout"]
    assert readout["signal_names"] == names and readout["positions"] == list(range(len(seq) - 1))
    got = torch.tensor(readout["signals"])
    assert (got - want[: len(seq) - 1]).abs().max().item() <= TOL
    fired = got[:, [names.index(f"probe/{b}") for b in range(3)]]
    assert 0 < fired.mean().item() < 1  # the gate's on and off both reported

    streamed, positions = [], []
    with requests.post(synthe_server.url + "/v1/completions", json={**body, "stream": True, "temperature": 0},
                       stream=True, timeout=300) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    if "readout" in choice:
                        positions += choice["readout"]["positions"]
                        streamed += choice["readout"]["signals"]
    assert positions == list(range(len(seq) - 1))
    assert (torch.tensor(streamed) - got).abs().max().item() <= 1e-6

    bad = requests.post(synthe_server.url + "/v1/completions", json={**body, "vllm_xargs": {"signals": "yes"}}, timeout=60)
    assert bad.status_code == 400 and "signals must be true or false" in bad.text


def test_readout_and_steering_equal_the_hugging_face_form(synthe_server):
    parity.readout_and_steering(synthe_server, WIDTH, prompts(6, (20,))[0], TOL)


def test_extract_reads_the_same_stream_from_the_model_and_the_server(synthe_server):
    parity.extraction_matches(synthe_server, WIDTH, TOL)


@pytest.mark.slow  # a second server
def test_train_lowers_the_loss_and_a_fresh_server_from_the_checkpoint_agrees(synthe_server, servers_restart, tmp_path):
    from plasticity_training.memory_tasks import copy_memory

    rng = random.Random(0)
    samples = [copy_memory(rng, delay=6, n=4) for _ in range(8)]
    parity.train_then_restart(synthe_server, servers_restart, samples, STEPS, prompts(7, (60,))[0], ARGS, tmp_path / "state", TOL)


@pytest.mark.slow
@pytest.mark.sweep
@pytest.mark.parametrize("gate, settings", [("never", {}), ("always", {}),
                                            ("causal", {"memory_hub": False, "min_depth": 3})],
                         ids=["never", "always", "no-hub-no-router"])
def test_the_other_probe_modes_served(gate, settings, servers_restart, tmp_path):
    path = build(tmp_path / "model", gate, **settings)
    server = servers_restart.start(f"synthe-{gate}", lambda log_path: ServerProcess.plasticity(
        path, extra_args=[*ARGS, "--state-dir", str(tmp_path / "state")], log_path=log_path))
    try:
        parity.logits_match(server, str(path), parity.reference(parity.hf_model(path)), prompts(10, (40, 200)), TOL)
        parity.decode_equals_prefill(server, str(path), prompts(11, (30,))[0], 20, TOL)
        parity.batch_invariant(server, str(path), prompts(12, (3, 65, 129, 255)), TOL)
    finally:
        servers_restart.stop()
