"""The recommended steering range (training/plasticity_training/steering_range.py): chosen from a measured
curve as documented, measured in process on a real (tiny) model, and recorded by `plasticity extract` in the
bank's calibration where the server and the page read it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from plasticity_training import steering_range as sr
from test_extract_pipeline import tiny  # noqa: F401  (module fixture: a random-init 2-layer Llama and a corpus)


def test_the_range_runs_from_the_first_noticeable_to_the_last_fluent_strength():
    curve = {2.0: 1.0, 4.0: 1.02, 8.0: 1.12, 16.0: 1.3, 32.0: 1.8, 64.0: 4.0}
    found = sr.choose_range(curve, 5, ["a", "b"], 4, 100)
    assert (found.low, found.high) == (8.0, 16.0)
    assert "recommended strength 8 to 16" in found.reason()
    assert sr.choose_range({**curve, 16.0: 1.8}, 5, [], 4, 100).reason().count("recommended strength 8 (") == 1


def test_a_model_steering_does_not_move_or_breaks_at_once_gets_no_recommendation():
    still = sr.choose_range({2.0: 1.0, 128.0: 1.05}, 0, [], 4, 100)
    assert still.low is None and "no strength up to 128" in still.reason()
    broken = sr.choose_range({2.0: 2.0, 4.0: 5.0}, 0, [], 4, 100)
    assert broken.high is None and "no usable strength" in broken.reason()
    record = broken.record()
    assert json.loads(json.dumps(record)) == record  # goes into readout.json as is


def test_concepts_are_sampled_evenly_and_the_same_every_time():
    names = [f"c{i}" for i in range(167)]
    picked = sr.sample_concepts(names)
    assert picked == sr.sample_concepts(names) and len(picked) == sr.MAX_CONCEPTS
    assert picked[0] == 0 and picked[-1] == 166
    assert sr.sample_concepts(names[:3]) == [0, 1, 2]


def test_neutral_texts_are_cut_to_one_batch_and_short_ones_left_out():
    tokens = {"a": list(range(100)), "b": list(range(30)), "c": list(range(5))}
    ids = sr.neutral_ids(tokens.__getitem__, ["a", "b", "c"])
    assert ids.shape == (2, 30)
    assert sr.neutral_ids(tokens.__getitem__, ["c"]) is None


def test_measured_in_process_the_displacement_is_the_natural_steering_rule(tiny):  # noqa: F811
    from plasticity_training.activations import HFSource

    source = HFSource.load(tiny[0], device="cpu")
    ids = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    vectors = torch.nn.functional.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(1)), dim=1)
    nll = sr.hf_nll(source.model, source.blocks[0], vectors, torch.tensor([1.0, 2.0, 0.5]))
    plain = nll(ids, None, 0.0)
    assert nll(ids, 1, 0.0) == pytest.approx(plain, abs=1e-6)
    def written_as_a_bias(displacement: torch.Tensor) -> float:
        """The same displacement another way: block 0's MLP writes it as a bias (Llama's down_proj has none)."""
        down = source.model.model.layers[0].mlp.down_proj
        down.bias = torch.nn.Parameter(displacement)
        try:
            with torch.no_grad():
                logits = source.model(input_ids=ids).logits[:, :-1]
                return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))
        finally:
            down.bias = None

    assert nll(ids, 1, 3.0) == pytest.approx(written_as_a_bias(3.0 * 2.0 * vectors[1]), rel=1e-5)
    assert nll(ids, None, 0.0) == pytest.approx(plain, abs=1e-6)  # the hook is gone after each call
    # A bank with steer rows: strength * the concept's row, whatever its unit vector and scale.
    rows = 4 * torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with_rows = sr.hf_nll(source.model, source.blocks[0], vectors, torch.tensor([1.0, 2.0, 0.5]), rows)
    assert with_rows(ids, 2, 0.5) == pytest.approx(written_as_a_bias(0.5 * rows[2]), rel=1e-5)
    found = sr.measure_range(nll, ids, 0, ["x", "y", "z"], strengths=(1.0, 64.0, 4096.0))
    ratios = list(found.ratios.values())
    assert ratios == sorted(ratios) and ratios[-1] > ratios[0] and all(math.isfinite(r) for r in ratios)


def test_extract_records_the_range_in_the_banks_calibration(tiny, tmp_path):  # noqa: F811
    from plasticity_training.extract import main
    from vllm_plasticity.contract.bank import load_bank

    model, corpus = tiny
    main(["--model", str(model), "--corpus", str(corpus), "--out", str(tmp_path / "bank"), "--layers", "1",
          "--no-progress", "--report", "--no-loso"])
    recorded = load_bank(tmp_path / "bank").calibration.info["steering_range"]
    assert list(recorded) == ["1"]
    assert list(recorded["1"]["perplexity_ratio"]) == [f"{s:g}" for s in sr.STRENGTHS]
    assert "steering: layer 1: " in (tmp_path / "bank" / "summary.txt").read_text()  # the report says it too
    main(["--model", str(model), "--corpus", str(corpus), "--out", str(tmp_path / "skip"), "--layers", "1",
          "--no-progress", "--no-steering-range"])
    assert "steering_range" not in load_bank(tmp_path / "skip").calibration.info
