"""The worker's per-step bookkeeping never raises into vLLM's step (issue "Hardening, round 2", item 14).

On the stand-in for vLLM's V1 batch layout of tests/test_readout_worker.py: an error that is not a steering
error (a fault while a request's steering is set up, a batch layout the bookkeeping cannot read, an error
in the tap during the forward) must leave the step running, fail the readout of the requests it touched
with the reason, leave no stale steering on other tokens, and let every later step serve as before. And a
request with more steering terms than the limit (item 5) is refused by the worker too, without walking them."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from tests.test_readout_worker import HIDDEN, LAYERS, Batch
from vllm_plasticity import readout_worker, residual_tap
from vllm_plasticity.readout_worker import ReadoutEngine
from vllm_plasticity.residual_tap import TapBuffers


@pytest.fixture
def engine():
    buffers = TapBuffers(num_layers=LAYERS, hidden_size=HIDDEN, max_tokens=64, capacity=8, steer_rows=3,
                         device=torch.device("cpu"), capture_slots=2)
    batch = Batch()
    batch.buffers = buffers
    eng = ReadoutEngine(buffers, batch)
    eng.load("b", ["x", "y"], {0: torch.eye(HIDDEN)[:2], 2: torch.eye(HIDDEN)[2:4]}, source="test")
    return eng, batch


def scores_of(out: dict) -> np.ndarray:
    return np.frombuffer(out["scores"], dtype="<f4").reshape(out["shape"])


def test_an_error_setting_up_one_requests_steering_fails_its_readout_only(engine, monkeypatch):
    eng, batch = engine

    def broken(*args, **kwargs):
        raise RuntimeError("device lost while building the steering vector")

    monkeypatch.setattr(readout_worker, "steering_vectors", broken)
    batch.add("steered", {"readout": "b", "steer": ["b/x", 2.0], "plasticity_key": "k1"})
    batch.add("reader", {"readout": "b", "plasticity_key": "k2"})
    batch.step({"steered": (0, 2), "reader": (0, 3)})  # must not raise: vLLM's step goes on
    assert batch.seen_index == [0] * 5  # nobody steered (the failed request runs unsteered)
    failed = eng.fetch("k1", final=True)["steered"]
    assert "device lost while building the steering vector" in failed["error"] and failed["positions"] == []
    ok = eng.fetch("k2", final=True)["reader"]
    assert "error" not in ok and ok["positions"] == [0, 1, 2]


def test_a_batch_layout_the_bookkeeping_cannot_read_fails_the_steps_readout_and_serving_goes_on(engine):
    eng, batch = engine
    batch.add("a", {"readout": "b", "steer": ["b/x", 2.0], "plasticity_key": "k"})
    batch.add("plain", None)
    batch.step({"a": (0, 2), "plain": (0, 1)})
    assert any(batch.seen_index)  # step 1 steered a's tokens
    # Step 2: the layout lacks a's computed-token count (an engine change the bookkeeping does not know).
    batch.input_batch.req_ids = ["plain", "a"]
    batch.input_batch.num_computed_tokens_cpu = np.array([1], np.int64)
    batch.query_start_loc.np = np.array([0, 1, 2], np.int32)
    batch._model_forward()  # must not raise
    # Step 1's per-token rows must not steer step 2's tokens (row 0 is now another request's).
    assert batch.seen_index == [0, 0] and eng.buffers.steer_layers == frozenset()
    out = eng.fetch("k", final=False)["a"]
    assert out["positions"] == [0, 1] and "per-step bookkeeping" in out["error"] and "IndexError" in out["error"]
    # Later steps serve as before: a new request reads and steers; the failed one adds no more scores.
    batch.add("c", {"readout": "b", "steer": ["b/y", 1.0], "plasticity_key": "k3"})
    batch.step({"c": (0, 2), "a": (3, 1)})
    assert batch.seen_index[:2] != [0, 0]
    fresh = eng.fetch("k3", final=True)["c"]
    assert "error" not in fresh and fresh["positions"] == [0, 1]
    assert eng.fetch("k", final=True)["a"]["positions"] == []


def test_an_error_in_the_tap_during_the_forward_fails_the_steps_readout_not_the_forward(engine):
    eng, batch = engine
    residual_tap.install_buffers(eng.buffers)
    calls = []

    def forward() -> None:
        """The model: every layer calls the op; this step's stream has the wrong width at layer 2."""
        n = int(batch.query_start_loc.np[-1])
        for L in range(LAYERS):
            width = HIDDEN + 1 if (L == 2 and not calls) else HIDDEN
            residual_tap._residual_tap(torch.zeros(n, width), torch.ones(n, width), L)
        calls.append(n)

    batch._model_forward = eng._model_forward
    eng._original_forward = forward
    try:
        batch.add("a", {"readout": "b", "plasticity_key": "k"})
        batch.step({"a": (0, 2)})  # must not raise
        out = eng.fetch("k", final=False)["a"]
        assert "residual tap failed" in out["error"] and "layer 2" in out["error"] and out["positions"] == []
        batch.add("b2", {"readout": "b", "plasticity_key": "k2"})
        batch.step({"b2": (0, 3), "a": (2, 1)})  # the next step reads again
        fresh = eng.fetch("k2", final=True)["b2"]
        assert "error" not in fresh and fresh["positions"] == [0, 1, 2]
        assert scores_of(fresh)[:, 0, 0].tolist() == [1.0, 1.0, 1.0]  # stream = 0 + 1: x . (1, ..., 1) = 1
    finally:
        residual_tap.install_buffers(None)


def test_steer_terms_beyond_the_limit_reaching_the_worker_are_refused_without_walking_them(engine):
    """Offline (`SamplingParams.extra_args`) no API server checks first: the worker applies the same limit."""
    eng, batch = engine
    batch.add("huge", {"readout": "b", "steer": ["b/x", 1.0] * 1_000_000, "plasticity_key": "k"})
    batch.add("limit", {"readout": "b", "steer": ["b/x", 0.001] * 1024, "plasticity_key": "k2"})
    t0 = time.perf_counter()
    batch.step({"huge": (0, 1), "limit": (0, 1)})
    assert time.perf_counter() - t0 < 1.0
    assert batch.seen_index[0] == 0 and batch.seen_index[1] != 0  # the limit itself steers
    assert "at most 1024" in eng.fetch("k", final=True)["huge"]["error"]
    assert torch.allclose(eng.buffers.steer[0, batch.seen_index[1]], 1.024 * torch.eye(HIDDEN)[0])
