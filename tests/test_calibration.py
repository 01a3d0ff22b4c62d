"""Calibrated banks without a server: what extraction measures (a planted direction scores 0 on the corpus mean
and counts the corpus's standard deviations along it; scaling a layer's states changes nothing), what the bank files carry, and what the
worker reads and steers with them (scores (h - c) . v / s; natural-unit steering adds strength * the concept's
steer row, its texts' mean offset from the centre, or strength * s * v for a bank written before steer rows;
a bank without calibration reads and steers raw, as before)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from plasticity_training.activations import Activations
from plasticity_training.calibration import calibrate
from plasticity_training.corpus import Corpus, Text
from plasticity_training.methods import get_method
from plasticity_training.vectors import Contrasts, Extraction, extract_vectors
from vllm_plasticity.contract.bank import BankError, Calibration, calibrated_scores, load_bank, save_bank
from vllm_plasticity.readout_worker import ReadoutEngine, read_bank_files
from vllm_plasticity.residual_tap import TapBuffers
from vllm_plasticity.steer_spec import SteeringError, check_steer

from test_readout_worker import Batch  # noqa: E402  (the stand-in for vLLM's V1 batch layout)

H, LAYER = 32, 5
CONCEPTS = ["angry", "calm", "joyful"]
PER_CONCEPT, BASELINES = 4, 3
SEPARATION = 3.0  # each concept's texts lie this far along its planted direction
COMMON = 50.0  # a large shared component every text has (what dominates raw dot products in real models)


def planted(scale: float = 1.0, seed: int = 0, noise: float = 0.01) -> tuple[Corpus, Activations, torch.Tensor]:
    """A corpus of PER_CONCEPT texts per concept and BASELINES neutral texts whose pooled state at LAYER is
    COMMON * m + SEPARATION * d_concept + small noise (d orthonormal), all times `scale`."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(H, len(CONCEPTS) + 1, generator=g))
    m, d = basis[:, 0], basis[:, 1:].T  # (H,), (C, H)
    texts, states = [], []
    for k, concept in enumerate(CONCEPTS):
        for i in range(PER_CONCEPT):
            texts.append(Text(f"{concept} {i}", (f"stories/{concept}_{i}.txt",), frozenset({concept}), frozenset(), ()))
            states.append(COMMON * m + SEPARATION * d[k])
    for i in range(BASELINES):
        texts.append(Text(f"neutral {i}", (f"paired/s{i}/baseline.txt",), frozenset(), frozenset({f"s{i}"}), ()))
        states.append(COMMON * m)
    X = (torch.stack(states) + noise * torch.randn(len(states), H, generator=g)) * scale  # (N, H)
    corpus = Corpus(Path("planted"), texts, CONCEPTS, {}, [])
    acts = Activations(layers=[LAYER], hidden_size=H, pooled={"mean": {LAYER: X}}, n_tokens=[8] * len(texts))
    return corpus, acts, d


def extracted(corpus, acts, method="pooled", centre="corpus"):
    contrasts = Contrasts(corpus, acts, pooling="mean", device="cpu")
    extraction = extract_vectors(contrasts, get_method(method))
    return extraction, calibrate(contrasts, extraction, centre=centre)


# ---- extraction ------------------------------------------------------------------------------------------

def test_a_planted_direction_scores_zero_on_the_corpus_mean_and_counts_its_standard_deviations():
    corpus, acts, d = planted()
    contrasts = Contrasts(corpus, acts, pooling="mean", device="cpu")
    X = acts.pooled["mean"][LAYER]
    n = len(corpus.texts)
    p = PER_CONCEPT / n
    # The planted directions themselves: a concept's texts sit SEPARATION along its d, every other text at 0,
    # so the corpus's standard deviation along d is SEPARATION * sqrt(p (1 - p)) (p: the concept's share of
    # texts) and its own texts score (1 - p) * SEPARATION / that = sqrt((1 - p) / p) on average.
    cal = calibrate(contrasts, Extraction(CONCEPTS, [LAYER], {LAYER: d})).calibration
    assert torch.allclose(cal.scale[LAYER], torch.full((3,), SEPARATION * (p * (1 - p)) ** 0.5), atol=0.02)
    V = d
    scores = calibrated_scores(X @ V.T, cal.offsets({LAYER: d})[LAYER], cal.scale[LAYER])  # (texts, concepts)
    for k, concept in enumerate(CONCEPTS):
        own = corpus.positives(concept)
        assert float(scores[own, k].mean()) == pytest.approx(((1 - p) / p) ** 0.5, abs=0.02)
        assert float(scores[:, k].std(correction=0)) == pytest.approx(1.0, abs=1e-4)  # a z-score
    # ... and the pooled method's vectors through the whole extraction path.
    extraction, result = extracted(corpus, acts)
    for vectors, cal in (({LAYER: d}, cal), (extraction.vectors, result.calibration)):
        V = vectors[LAYER]
        scores = calibrated_scores(X @ V.T, cal.offsets(vectors)[LAYER], cal.scale[LAYER])
        for k, concept in enumerate(CONCEPTS):
            own = corpus.positives(concept)
            assert float(scores[own, k].mean()) > 1.0
            assert torch.equal(scores[own].argmax(1), torch.full((len(own),), k))  # its own concept on top
        assert calibrated_scores(X.mean(0) @ V.T, cal.offsets(vectors)[LAYER], cal.scale[LAYER]).abs().max() < 1e-4
        # A neutral text is below the corpus average for every concept; its raw score is the shared
        # component's (COMMON * m . v), a number that says nothing by itself.
        assert (scores[corpus.baselines()] < 0).all()
    assert all(float(extraction.vectors[LAYER][k] @ d[k]) > 0.85 for k in range(3))  # found the planted ones
    assert result.calibration.info == {"centre": "corpus", "scale": "corpus_std", "steer": "concept_mean_offset",
                                       "pooling": "mean", "n_centre_texts": n}


def test_a_concepts_natural_steering_vector_moves_the_corpus_mean_onto_its_own_texts_mean():
    corpus, acts, d = planted()
    X = acts.pooled["mean"][LAYER]
    for centre in ("corpus", "baselines"):
        _, result = extracted(corpus, acts, centre=centre)
        cal = result.calibration
        for k, concept in enumerate(CONCEPTS):
            own = X[corpus.positives(concept)].mean(0)
            # strength 1 from the centre lands on the concept's own texts' mean state, whatever the vector
            assert torch.allclose(cal.centre[LAYER] + cal.steer[LAYER][k], own, atol=1e-4)
            # ... which lies along the planted direction (the shared component is in the centre)
            assert float(torch.nn.functional.cosine_similarity(cal.steer[LAYER][k], d[k], dim=0)) > 0.8


def test_the_baselines_centre_scores_the_neutral_texts_zero():
    corpus, acts, d = planted()
    extraction, result = extracted(corpus, acts, centre="baselines")
    X, V = acts.pooled["mean"][LAYER], extraction.vectors[LAYER]
    cal = result.calibration
    scores = calibrated_scores(X @ V.T, cal.offsets(extraction.vectors)[LAYER], cal.scale[LAYER])
    assert scores[corpus.baselines()].mean(0).abs().max() < 1e-4
    for k, concept in enumerate(CONCEPTS):
        assert float(scores[corpus.positives(concept), k].mean()) > 1.0
    p = PER_CONCEPT / len(corpus.texts)
    planted_cal = calibrate(Contrasts(corpus, acts, device="cpu"), Extraction(CONCEPTS, [LAYER], {LAYER: d}),
                            centre="baselines").calibration
    # The spread does not depend on the centre: the same scale as with the corpus mean.
    assert torch.allclose(planted_cal.scale[LAYER], torch.full((3,), SEPARATION * (p * (1 - p)) ** 0.5), atol=0.02)


@pytest.mark.parametrize("method", ["pooled", "mean"])
def test_scaling_a_layers_states_leaves_calibrated_scores_unchanged(method):
    corpus, acts, _ = planted()
    k = 37.0
    big_corpus, big_acts, _ = planted(scale=k)
    small, small_cal = extracted(corpus, acts, method)
    big, big_cal = extracted(big_corpus, big_acts, method)
    assert torch.allclose(small.vectors[LAYER], big.vectors[LAYER], atol=1e-5)
    assert torch.allclose(big_cal.calibration.scale[LAYER], k * small_cal.calibration.scale[LAYER], rtol=1e-4)
    # natural steering scales with the states too: strength 1 is the same move relative to the layer
    assert torch.allclose(big_cal.calibration.steer[LAYER], k * small_cal.calibration.steer[LAYER], rtol=1e-4, atol=1e-3)
    g = torch.Generator().manual_seed(1)
    states = acts.pooled["mean"][LAYER][:5] + torch.randn(5, H, generator=g)  # texts and states never seen

    def scores(extraction, cal, h):
        return calibrated_scores(h @ extraction.vectors[LAYER].T, cal.calibration.offsets(extraction.vectors)[LAYER],
                                 cal.calibration.scale[LAYER])

    assert torch.allclose(scores(big, big_cal, k * states), scores(small, small_cal, states), atol=1e-4)
    raw_small, raw_big = states @ small.vectors[LAYER].T, (k * states) @ big.vectors[LAYER].T
    assert not torch.allclose(raw_big, raw_small, rtol=0.5)  # raw scores do change with the layer's scale


def test_a_direction_the_corpus_does_not_vary_along_gets_the_floor_not_a_zero_scale():
    corpus, acts, d = planted(noise=0.0)
    contrasts = Contrasts(corpus, acts, pooling="mean", device="cpu")
    extraction = extract_vectors(contrasts, get_method("pooled"))
    basis, _ = torch.linalg.qr(torch.cat([acts.pooled["mean"][LAYER], torch.eye(H)]).T)
    extraction.vectors[LAYER][1] = basis[:, -1]  # orthogonal to every text: each scores the same
    result = calibrate(contrasts, extraction)
    assert result.floored == {LAYER: ["calm"]}
    assert float(result.calibration.scale[LAYER][1]) == pytest.approx(1e-3 * result.spread[LAYER], rel=1e-4)
    with pytest.raises(ValueError, match="baselines"):
        calibrate(Contrasts(Corpus(Path("x"), corpus.texts[:12], CONCEPTS, {}, []),
                            Activations([LAYER], H, {"mean": {LAYER: acts.pooled["mean"][LAYER][:12]}}, [8] * 12),
                            device="cpu"), extraction, centre="baselines")


# ---- the bank files --------------------------------------------------------------------------------------

def calibrated_bank(tmp_path, layers=(0, 2), seed=0, steer=True, name="cal"):
    g = torch.Generator().manual_seed(seed)
    vectors = {L: torch.nn.functional.normalize(torch.randn(2, 16, generator=g), dim=1) for L in layers}
    cal = Calibration({L: 5 * torch.randn(16, generator=g) for L in layers},
                      {L: 0.5 + torch.rand(2, generator=g) * 2 for L in layers}, {"centre": "corpus"},
                      {L: 3 * torch.randn(2, 16, generator=g) for L in layers} if steer else None)
    save_bank(tmp_path / name, ["x", "y"], vectors, model="m", method="pooled", calibration=cal)
    return tmp_path / name, vectors, cal


def test_calibration_round_trips_through_the_bank_files(tmp_path):
    path, vectors, cal = calibrated_bank(tmp_path)
    manifest = json.loads((path / "readout.json").read_text())
    assert manifest["calibration"] == {"centre": "corpus"}
    bank = load_bank(path)
    for L in (0, 2):
        assert torch.equal(bank.calibration.centre[L], cal.centre[L].float())
        assert torch.equal(bank.calibration.scale[L], cal.scale[L].float())
        assert torch.equal(bank.calibration.steer[L], cal.steer[L].float())
    old_path, _, _ = calibrated_bank(tmp_path, steer=False, name="before-steer-rows")
    assert load_bank(old_path).calibration.steer is None  # a bank written before steer rows still loads
    save_bank(tmp_path / "raw", ["x", "y"], vectors, model="m", method="pooled")
    assert load_bank(tmp_path / "raw").calibration is None
    assert "calibration" not in json.loads((tmp_path / "raw" / "readout.json").read_text())


def test_a_calibration_that_cannot_be_divided_by_is_refused(tmp_path):
    path, vectors, cal = calibrated_bank(tmp_path)
    bad = Calibration(cal.centre, {0: cal.scale[0], 2: torch.tensor([1.0, 0.0])}, {})
    with pytest.raises(ValueError, match="layer 2 .*scale"):
        save_bank(tmp_path / "bad", ["x", "y"], vectors, model="m", method="pooled", calibration=bad)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "readout.safetensors"))
    tensors["layer_2.scale"] = torch.tensor([-1.0, 1.0])
    save_file(tensors, str(path / "readout.safetensors"))
    with pytest.raises(BankError, match="layer 2"):
        load_bank(path)
    del tensors["layer_2.scale"]
    save_file(tensors, str(path / "readout.safetensors"))
    with pytest.raises(BankError, match="layer_2.scale"):
        load_bank(path)
    tensors = load_file(str(calibrated_bank(tmp_path, name="steer")[0] / "readout.safetensors"))
    for broken, match in ((dict(tensors, **{"layer_2.steer": torch.full((2, 16), float("nan"))}), "layer 2 steer"),
                          ({k: v for k, v in tensors.items() if k != "layer_2.steer"}, "layer_2.steer")):
        save_file(broken, str(tmp_path / "steer" / "readout.safetensors"))
        with pytest.raises(BankError, match=match):  # steer rows at every layer or none, finite
            load_bank(tmp_path / "steer")


# ---- the worker reads and steers with it -----------------------------------------------------------------

@pytest.fixture
def worker():
    buffers = TapBuffers(num_layers=3, hidden_size=16, max_tokens=64, capacity=8, steer_rows=6,
                         device=torch.device("cpu"), capture_slots=1)
    batch = Batch()
    batch.buffers = buffers
    return ReadoutEngine(buffers, batch), batch


def load_from_disk(engine, name, path, calibrated=True):
    concepts, vectors, meta = read_bank_files(path)
    if not calibrated:
        meta["calibration"] = None
    return engine.load(name, concepts, vectors, source=str(path), **meta)


def read(engine, batch, streams, bank, key):
    batch.streams = streams  # (layers, tokens, hidden): the real tap runs on them
    batch.add(key, {"readout": bank, "plasticity_key": key})
    batch.step({key: (0, streams.shape[1])})
    out = engine.fetch(key, final=True)[key]
    return out, np.frombuffer(out["scores"], dtype="<f4").reshape(out["shape"])


def test_the_worker_reads_calibrated_scores_and_raw_ones_for_a_bank_without_calibration(worker, tmp_path):
    engine, batch = worker
    path, vectors, cal = calibrated_bank(tmp_path)
    save_bank(tmp_path / "raw", ["x", "y"], vectors, model="m", method="pooled")
    assert load_from_disk(engine, "cal", path)["calibrated"] is True
    assert load_from_disk(engine, "raw", tmp_path / "raw")["calibrated"] is False
    assert load_from_disk(engine, "ignored", path, calibrated=False)["calibrated"] is False
    streams = 20 * torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3))
    out, got = read(engine, batch, streams, "cal", "k1")
    assert out["calibrated"] is True
    for j, L in enumerate((0, 2)):
        expected = ((streams[L].double() - cal.centre[L].double()) @ vectors[L].double().T) / cal.scale[L].double()
        assert np.abs(got[:, j] - expected.numpy()).max() < 1e-4
    for name in ("raw", "ignored"):
        out, got = read(engine, batch, streams, name, f"k-{name}")
        assert out["calibrated"] is False
        for j, L in enumerate((0, 2)):
            assert np.abs(got[:, j] - (streams[L] @ vectors[L].T).numpy()).max() < 1e-4


def test_natural_units_steer_by_the_steer_row_and_raw_units_by_the_coefficient(worker, tmp_path):
    engine, batch = worker
    path, vectors, cal = calibrated_bank(tmp_path)
    before, _, before_cal = calibrated_bank(tmp_path, steer=False, name="before-steer-rows")
    save_bank(tmp_path / "raw", ["x", "y"], vectors, model="m", method="pooled")
    load_from_disk(engine, "cal", path)
    load_from_disk(engine, "before", before)
    load_from_disk(engine, "raw", tmp_path / "raw")
    batch.add("natural", {"steer": ["cal/y", 0.5], "steer_units": "natural"})
    batch.add("default", {"steer": ["cal/y", 0.5]})  # a calibrated bank steers in natural units by default
    batch.add("raw", {"steer": ["cal/y", 0.5], "steer_units": "raw"})
    batch.add("old", {"steer": ["raw/y", 0.5]})  # a bank without calibration steers raw, as before
    batch.add("before", {"steer": ["before/y", 0.5]})  # calibrated without steer rows: strength * s * v
    batch.step({"natural": (0, 1), "default": (0, 1), "raw": (0, 1), "old": (0, 1), "before": (0, 1)})
    rows = batch.seen_index
    steer = engine.buffers.steer
    assert rows[0] == rows[1] and len({rows[0], rows[2], rows[3], rows[4]}) == 4
    for L in (0, 2):
        assert torch.allclose(steer[L, rows[0]], 0.5 * cal.steer[L][1], atol=1e-6)
        assert torch.allclose(steer[L, rows[2]], 0.5 * vectors[L][1], atol=1e-6)
        assert torch.allclose(steer[L, rows[3]], 0.5 * vectors[L][1], atol=1e-6)
        assert torch.allclose(steer[L, rows[4]], 0.5 * before_cal.scale[L][1] * vectors[L][1], atol=1e-6)
    with pytest.raises(SteeringError, match="no calibration"):
        check_steer(["raw/y", 1.0], None, engine.bank_shapes(), "natural", engine.calibrated_banks())
    with pytest.raises(SteeringError, match="steer_units"):
        check_steer(["cal/y", 1.0], None, engine.bank_shapes(), "sigma", engine.calibrated_banks())


# ---- the extractor writes it -----------------------------------------------------------------------------

def test_extract_writes_a_calibrated_bank_by_default_and_a_raw_one_on_request(tmp_path):
    pytest.importorskip("transformers")
    from test_extract_pipeline import TINY  # noqa: F401  (the tiny model's spec)
    from plasticity_training.default_model import ModelSpec, build_model
    from plasticity_training.extract import ExtractOptions, run
    from test_extract_corpus import EMOTIONS, SCENARIOS, write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    text = "\n\n".join([s for _, _, s in EMOTIONS.values()] + [t for b, f in SCENARIOS.values() for t in (b, *f.values())])
    model = build_model(ModelSpec(**TINY), tmp_path / "model", text=text * 3, log=lambda _: None)
    common = dict(corpus=str(corpus), model=str(model), layers="1", device="cpu", progress=False)
    bank = load_bank(run(ExtractOptions(out=str(tmp_path / "cal"), **common), log=lambda _: None))
    assert bank.calibration is not None and bank.calibration.info["centre"] == "corpus"
    assert bool((bank.calibration.scale[1] > 0).all())
    raw = run(ExtractOptions(out=str(tmp_path / "raw"), calibration="none", **common), log=lambda _: None)
    assert load_bank(raw).calibration is None
    assert set(json.loads((raw / "readout.json").read_text())) == {
        "concepts", "layers", "hidden_size", "dtype", "model", "method", "created"}
    assert torch.equal(load_bank(raw).vectors[1], bank.vectors[1])  # calibration never changes the vectors
    with pytest.raises(ValueError, match="calibration"):
        run(ExtractOptions(out=str(tmp_path / "x"), calibration="median", **common), log=lambda _: None)
