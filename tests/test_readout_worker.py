"""The worker's per-step bookkeeping on a stand-in for vLLM's V1 batch layout (no engine: the layout is
three fields, and the server tests cover the real one). What a user relies on: each token gets its own
request's steering row, scores land at the right positions across steps, and a bank unloaded while a
request runs leaves that request unsteered with an error in its readout instead of failing the batch."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from vllm_plasticity.readout_worker import ReadoutEngine
from vllm_plasticity.residual_tap import TapBuffers

HIDDEN, LAYERS = 16, 3


class Batch:
    """The fields of vLLM's V1 model runner the engine reads, for one step at a time."""

    def __init__(self) -> None:
        self.requests: dict = {}
        self.input_batch = types.SimpleNamespace(req_ids=[], num_computed_tokens_cpu=np.zeros(0, np.int64))
        self.query_start_loc = types.SimpleNamespace(np=np.zeros(1, np.int32))
        self._model_forward = self.forward
        self.seen_index = None
        self.streams: torch.Tensor | None = None  # set: the real tap runs on these (layers, tokens, hidden)

    def add(self, req_id: str, extra: dict | None) -> None:
        self.requests[req_id] = types.SimpleNamespace(sampling_params=types.SimpleNamespace(extra_args=extra))

    def step(self, scheduled: dict[str, tuple[int, int]]) -> None:
        """`scheduled`: req_id -> (tokens already computed, tokens this step)."""
        self.input_batch.req_ids = list(scheduled)
        self.input_batch.num_computed_tokens_cpu = np.array([c for c, _ in scheduled.values()], np.int64)
        self.query_start_loc.np = np.concatenate([[0], np.cumsum([n for _, n in scheduled.values()])]).astype(np.int32)
        self._model_forward()

    def forward(self) -> None:
        """Stands in for the model: the tap's score rows become (layer, token, column) markers."""
        b = self.buffers
        n = int(self.query_start_loc.np[-1])
        self.seen_index = b.steer_index[:n].tolist()
        if self.streams is not None:  # the op's body, as vLLM's compiled model calls it per layer (eager)
            for L in range(LAYERS):
                b.tap(torch.zeros(n, HIDDEN), self.streams[L, :n].clone(), L)
            return
        for L in b.read_layers:
            b.scores[L, :n, : b.read_width] = torch.arange(n).float()[:, None] + 1000 * L


@pytest.fixture
def engine():
    buffers = TapBuffers(num_layers=LAYERS, hidden_size=HIDDEN, max_tokens=64, capacity=8, steer_rows=3,
                         device=torch.device("cpu"), capture_slots=2)
    batch = Batch()
    batch.buffers = buffers
    eng = ReadoutEngine(buffers, batch)
    eng.load("b", ["x", "y"], {0: torch.eye(HIDDEN)[:2], 2: torch.eye(HIDDEN)[2:4]}, source="test")
    return eng, batch


def test_each_token_gets_its_own_requests_steering_row(engine):
    eng, batch = engine
    batch.add("plain", None)
    batch.add("up", {"steer": ["b/x", 2.0]})
    batch.add("down", {"steer": ["b/x", -2.0], "steer_layers": [2]})
    batch.add("up_too", {"steer": ["b/x", 2.0]})
    batch.step({"plain": (0, 2), "up": (0, 3), "down": (0, 1), "up_too": (5, 1)})
    index = batch.seen_index
    assert index[:2] == [0, 0] and len(set(index[2:5])) == 1 and index[2] != 0
    assert index[6] == index[2] and index[5] not in (0, index[2])  # alike settings share a row
    up, down = index[2], index[5]
    assert torch.allclose(eng.buffers.steer[0, up], 2.0 * torch.eye(HIDDEN)[0])
    assert torch.allclose(eng.buffers.steer[2, up], 2.0 * torch.eye(HIDDEN)[2])
    assert not eng.buffers.steer[0, down].any()  # steer_layers [2] only
    assert eng.buffers.steer_layers == {0, 2}


def test_scores_land_at_each_tokens_position_across_steps(engine):
    eng, batch = engine
    batch.add("a", {"readout": "b", "plasticity_key": "k"})
    batch.add("other", None)
    batch.step({"other": (0, 2), "a": (0, 3)})   # prefill: rows 2..4 are a's positions 0..2
    batch.step({"a": (3, 1), "other": (2, 1)})   # decode: row 0 is a's position 3
    out = eng.fetch("k", final=True)["a"]
    assert out["positions"] == [0, 1, 2, 3] and out["layers"] == [0, 2]
    scores = np.frombuffer(out["scores"], dtype="<f4").reshape(out["shape"])
    assert scores[:, 0, 0].tolist() == [2, 3, 4, 0] and scores[:, 1, 0].tolist() == [2002, 2003, 2004, 2000]
    assert eng.fetch("k", final=True) == {}


def test_a_bank_unloaded_mid_request_leaves_it_unsteered_with_an_error(engine):
    eng, batch = engine
    batch.add("a", {"readout": "b", "steer": ["b/y", 1.0], "plasticity_key": "k"})
    batch.step({"a": (0, 2)})
    assert any(batch.seen_index)
    eng.unload("b")
    batch.step({"a": (2, 1)})
    assert not any(batch.seen_index)
    out = eng.fetch("k", final=True)["a"]
    assert out["positions"] == [0, 1] and "no bank 'b'" in out["error"]


def test_more_distinct_settings_than_slots_are_refused_not_mixed(engine):
    eng, batch = engine  # 2 slots
    for i, coef in enumerate((1.0, 2.0, 3.0)):
        batch.add(f"r{i}", {"steer": ["b/x", coef], "readout": "b", "plasticity_key": f"k{i}"})
    batch.step({"r0": (0, 1), "r1": (0, 1), "r2": (0, 1)})
    assert batch.seen_index[:2] != [0, 0] and batch.seen_index[2] == 0
    assert "PLASTICITY_STEER_SLOTS" in eng.fetch("k2", final=True)["r2"]["error"]


def test_a_bank_replaced_mid_request_keeps_its_scores_and_labels_consistent(engine):
    eng, batch = engine
    batch.add("a", {"readout": "b", "plasticity_key": "k"})
    batch.step({"a": (0, 2)})
    eng.load("b", ["p", "q", "r"], {1: torch.eye(HIDDEN)[:3]}, source="test")  # same name, other shape
    batch.step({"a": (2, 1)})
    out = eng.fetch("k", final=True)["a"]
    # Scores only from the version the request started with, under that version's labels.
    assert out["concepts"] == ["x", "y"] and out["layers"] == [0, 2] and out["positions"] == [0, 1]
    assert out["shape"] == [2, 2, 2] and "replaced" in out["error"]
    batch.add("b2", {"readout": "b", "plasticity_key": "k2"})  # a new request reads the new version
    batch.step({"b2": (0, 1)})
    assert eng.fetch("k2", final=True)["b2"]["concepts"] == ["p", "q", "r"]


def test_the_tap_keeps_a_steered_stream_finite_and_leaves_other_tokens_alone():
    buffers = TapBuffers(num_layers=1, hidden_size=HIDDEN, max_tokens=8, capacity=2, steer_rows=3,
                         device=torch.device("cpu"))
    buffers.steer[0, 1] = float("inf")  # what 1e39 became in the float32 buffer
    buffers.steer[0, 2, 0] = float("nan")
    buffers.steer_layers = frozenset({0})
    buffers.steer_index[:4] = torch.tensor([0, 1, 2, 0])
    residual = torch.randn(4, HIDDEN)
    plain = residual[[0, 3]].clone()
    buffers.tap(torch.zeros(4, HIDDEN), residual, 0)
    assert torch.isfinite(residual).all()
    assert torch.equal(residual[[0, 3]], plain)  # bitwise: unsteered rows are never touched


def test_a_runner_with_another_batch_layout_is_refused_at_install_with_what_to_do():
    class V2LikeRunner:  # what the engine reads is not there (vLLM 0.32's GPU default runner lays batches out otherwise)
        requests: dict = {}

        def _model_forward(self):
            pass

    buffers = TapBuffers(num_layers=1, hidden_size=HIDDEN, max_tokens=8, capacity=2, steer_rows=2,
                         device=torch.device("cpu"))
    runner = V2LikeRunner()
    with pytest.raises(RuntimeError, match="VLLM_USE_V2_MODEL_RUNNER=0") as err:
        ReadoutEngine(buffers, runner)
    assert "input_batch.req_ids" in str(err.value)
    assert runner._model_forward.__func__ is V2LikeRunner._model_forward  # nothing was wrapped


def test_signals_land_at_each_tokens_position_with_or_without_a_bank():
    buffers = TapBuffers(num_layers=1, hidden_size=HIDDEN, max_tokens=16, capacity=2, steer_rows=2,
                         device=torch.device("cpu"), signal_names=("conf", "gate"))
    batch = Batch()
    batch.buffers = buffers
    forward, steps = batch.forward, []

    def with_signals() -> None:  # the model writes each row's signals: (100 * step + row, row)
        forward()
        n = int(batch.query_start_loc.np[-1])
        steps.append(n)
        rows = torch.arange(n).float()
        buffers.signals[:n] = torch.stack([100 * (len(steps) - 1) + rows, rows], dim=1)
    batch._model_forward = with_signals
    eng = ReadoutEngine(buffers, batch)
    eng.load("b", ["x"], {0: torch.eye(HIDDEN)[:1]}, source="test")
    batch.add("only", {"signals": True, "plasticity_key": "k1"})
    batch.add("both", {"signals": True, "readout": "b", "plasticity_key": "k2"})
    batch.add("scores", {"readout": "b", "plasticity_key": "k3"})
    batch.step({"scores": (0, 1), "only": (0, 2), "both": (0, 2)})  # rows: scores 0, only 1-2, both 3-4
    batch.step({"both": (2, 1), "only": (2, 1)})  # decode: both row 0, only row 1
    only, both = eng.fetch("k1", final=True)["only"], eng.fetch("k2", final=True)["both"]
    # Each row as its own step wrote it (a later step reuses the buffer's rows: the copies must not change).
    for out, rows in ((only, [(0, 1), (0, 2), (1, 1)]), (both, [(0, 3), (0, 4), (1, 0)])):
        assert out["positions"] == [0, 1, 2] and out["signal_names"] == ["conf", "gate"]
        signals = np.frombuffer(out["signals"], dtype="<f4").reshape(3, 2)
        assert signals.tolist() == [[100 * step + r, r] for step, r in rows]
    assert np.frombuffer(both["scores"], dtype="<f4").reshape(both["shape"])[:, 0, 0].tolist() == [3, 4, 0]
    assert only["shape"] == [3, 0, 0]
    assert "signals" not in eng.fetch("k3", final=True)["scores"]


def test_signals_asked_of_an_architecture_without_them_carry_an_error(engine):
    eng, batch = engine
    batch.add("a", {"signals": True, "plasticity_key": "k"})
    batch.step({"a": (0, 2)})
    assert "reports no per-token signals" in eng.fetch("k", final=True)["a"]["error"]


def test_a_basis_bank_reads_whole_hidden_states_wider_than_the_readout_capacity(engine):
    eng, batch = engine  # capacity 8 < hidden 16
    streams = batch.streams = torch.randn(LAYERS, 64, HIDDEN)
    info = eng.load_basis("raw", 0, HIDDEN, [1, 2])
    assert info["kind"] == "basis" and info["coordinates"] == [0, HIDDEN] and len(info["concepts"]) == HIDDEN
    eng.load("more", [f"c{i}" for i in range(6)], {1: torch.randn(6, HIDDEN)}, source="test")  # capacity is untouched
    batch.add("a", {"readout": "raw", "plasticity_key": "k"})
    batch.add("other", None)
    batch.add("c", {"readout": "more", "plasticity_key": "k2"})
    batch.step({"other": (0, 2), "a": (0, 3), "c": (0, 1)})
    batch.step({"a": (3, 1)})
    out = eng.fetch("k", final=True)["a"]
    scores = np.frombuffer(out["scores"], dtype="<f4").reshape(out["shape"])
    assert out["positions"] == [0, 1, 2, 3] and out["layers"] == [1, 2] and out["shape"] == [4, 2, HIDDEN]
    expected = torch.cat([streams[:, 2:5], streams[:, :1]], dim=1)[[1, 2]].transpose(0, 1)
    assert torch.equal(torch.from_numpy(scores.copy()), expected)
    c = eng.fetch("k2", final=True)["c"]  # a concept bank read in the same step still gets its dot products
    c_scores = np.frombuffer(c["scores"], dtype="<f4").reshape(c["shape"])
    assert np.allclose(c_scores[0, 0], (streams[1, 5] @ eng.banks["more"].vectors[1].T).numpy(), atol=1e-5)


def test_capture_slots_are_one_per_layer_and_refused_beyond_the_count():
    buffers = TapBuffers(num_layers=LAYERS, hidden_size=HIDDEN, max_tokens=8, capacity=2, steer_rows=2,
                         device=torch.device("cpu"), capture_slots=2)
    batch = Batch()
    eng = ReadoutEngine(buffers, batch)
    eng.load_basis("a", 0, 4, [0, 1])
    eng.load_basis("b", 4, 8, [1])  # layer 1 already has a slot: shared
    with pytest.raises(ValueError, match="PLASTICITY_CAPTURE_LAYERS"):
        eng.load_basis("c", 0, 4, [2])
    assert set(eng.banks) == {"a", "b"} and buffers.capture_slot_of.keys() == {0, 1}
    eng.unload("a")  # frees layer 0's slot (layer 1 keeps its own)
    slot_1 = buffers.capture_slot_of[1]
    eng.load_basis("c", 0, 4, [2])
    assert buffers.capture_slot_of[1] == slot_1 and buffers.capture_slot_of[2] != slot_1
    assert buffers.capture_slot.tolist()[0] == 2  # a layer without a slot points past the slots
    with pytest.raises(ValueError, match="hidden size"):
        eng.load_basis("d", 0, HIDDEN + 1, [2])


def test_steering_along_a_basis_coordinate_adds_to_that_coordinate_only(engine):
    eng, batch = engine
    eng.load_basis("dims", 0, HIDDEN, [2])
    batch.add("s", {"steer": ["dims/dim_5", 3.0]})
    batch.step({"s": (0, 1)})
    row = batch.seen_index[0]
    assert row != 0 and torch.equal(eng.buffers.steer[2, row], 3.0 * torch.eye(HIDDEN)[5])


def test_scores_follow_every_load_replace_and_unload_between_steps(engine):
    """The tap's product reads the banks loaded now: after a bank is replaced, another loaded beside it (the
    columns in use widen) or one unloaded, each request's scores are its stream times its bank's vectors."""
    eng, batch = engine
    streams = batch.streams = torch.randn(LAYERS, 64, HIDDEN)

    def read(bank: str, key: str, vectors: dict) -> None:
        batch.add(key, {"readout": bank, "plasticity_key": key})
        batch.step({key: (0, 3)})
        out = eng.fetch(key, final=True)[key]
        scores = np.frombuffer(out["scores"], dtype="<f4").reshape(out["shape"])  # (positions, layers, concepts)
        for i, L in enumerate(out["layers"]):
            want = streams[L, :3] @ (vectors[L] / vectors[L].norm(dim=1, keepdim=True)).T
            assert np.allclose(scores[:, i], want.numpy(), atol=1e-5), (bank, L)

    read("b", "r1", {0: torch.eye(HIDDEN)[:2], 2: torch.eye(HIDDEN)[2:4]})
    replaced = {0: torch.randn(2, HIDDEN), 2: torch.randn(2, HIDDEN)}
    eng.load("b", ["x", "y"], replaced, source="test")
    read("b", "r2", replaced)
    wider = {0: torch.randn(5, HIDDEN), 1: torch.randn(5, HIDDEN)}
    eng.load("c", [f"c{i}" for i in range(5)], wider, source="test")  # columns 2..6: the width in use grows
    read("c", "r3", wider)
    read("b", "r4", replaced)
    eng.unload("b")
    moved = {0: torch.randn(2, HIDDEN)}
    eng.load("d", ["p", "q"], moved, source="test")  # in b's freed columns 0..1
    read("d", "r5", moved)
    read("c", "r6", wider)
