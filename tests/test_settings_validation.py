"""/train settings are refused at validation (a 400 with the reason, nothing queued) when a number is not a
JSON number, a sample weight is too small for the float32 loss, or a DPO reference log-prob is beyond
float32. No server: the models in contract/settings.py are what the route validates with."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from vllm_plasticity.contract.settings import (
    FLOAT32_MAX, MAX_WEIGHT, MIN_WEIGHT, OptimizerSettings, PreferenceSample, PreferenceSettings, Sample)

IDS = {"context_ids": [5, 6], "continuation_ids": [7]}
PAIR = {"context_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8]}


@pytest.mark.parametrize("field", ["lr", "eps", "weight_decay", "scale", "norm_growth_limit", "grad_clip"])
def test_a_number_sent_as_a_string_is_refused(field):
    with pytest.raises(ValidationError, match="must be a JSON number, not a string"):
        OptimizerSettings.model_validate_json(json.dumps({field: "0.5"}))


@pytest.mark.parametrize("body, where", [
    ({**IDS, "weight": "2"}, Sample), ({**PAIR, "weight": "2"}, PreferenceSample),
    ({**PAIR, "ref_chosen_logp": "-1", "ref_rejected_logp": -2}, PreferenceSample)])
def test_sample_numbers_sent_as_strings_are_refused(body, where):
    with pytest.raises(ValidationError, match="must be a JSON number, not a string"):
        where.model_validate_json(json.dumps(body))


def test_other_non_numbers_are_refused_naming_their_json_kind():
    for value, kind in ((None, "null"), ([1], "an array"), ({"v": 1}, "an object"), (True, "a boolean")):
        with pytest.raises(ValidationError, match=kind):
            OptimizerSettings.model_validate_json(json.dumps({"lr": value}))
    with pytest.raises(ValidationError, match="must be a JSON number"):
        OptimizerSettings.model_validate_json('{"betas": ["0.9", 0.99]}')
    with pytest.raises(ValidationError, match="must be a JSON number"):
        PreferenceSettings.model_validate_json('{"beta": "0.5"}')


def test_integers_are_fine_where_a_float_is_asked():
    settings = OptimizerSettings.model_validate_json('{"lr": 1, "grad_clip": 5, "betas": [0, 0]}')
    assert (settings.lr, settings.grad_clip, settings.betas) == (1.0, 5.0, (0.0, 0.0))
    assert Sample.model_validate_json(json.dumps({**IDS, "weight": 3})).weight == 3.0


@pytest.mark.parametrize("weight", [1e-50, 5e-324, MIN_WEIGHT / 2])
def test_a_weight_too_small_for_float32_is_refused_with_the_valid_range(weight):
    with pytest.raises(ValidationError, match=r"is too small: 0 \(skip the sample\) or in \[1e-06, 1e\+06\]"):
        Sample(**IDS, weight=weight)
    with pytest.raises(ValidationError, match="too small"):
        PreferenceSample(**PAIR, weight=weight)


def test_the_weight_range_holds_at_its_ends():
    assert [Sample(**IDS, weight=w).weight for w in (0, MIN_WEIGHT, MAX_WEIGHT)] == [0.0, MIN_WEIGHT, MAX_WEIGHT]
    for bad in (-MIN_WEIGHT, MAX_WEIGHT * 1.01):
        with pytest.raises(ValidationError):
            Sample(**IDS, weight=bad)


def test_the_smallest_weight_keeps_the_sft_and_preference_losses_finite():
    """Why MIN_WEIGHT: the losses' normalisers (sum w_i n_i, sum w_i) in float32 stay non-zero."""
    from plasticity_training.objectives import dpo_loss, sft_loss

    weights = torch.tensor([MIN_WEIGHT, MIN_WEIGHT])  # (N,)
    assert torch.isfinite(sft_loss(torch.tensor([-3.0, -1.0]), torch.tensor([1.0, 1.0]), weights).loss)
    zero = torch.zeros(2)
    assert torch.isfinite(dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), zero, zero, 0.1, weights).loss)
    assert not torch.isfinite(sft_loss(torch.tensor([-3.0]), torch.tensor([1.0]), torch.tensor([1e-50])).loss)


@pytest.mark.parametrize("field", ["ref_chosen_logp", "ref_rejected_logp"])
def test_a_reference_logprob_beyond_float32_is_refused(field):
    body = {**PAIR, "ref_chosen_logp": -1.0, "ref_rejected_logp": -1.0, field: -1e39}
    with pytest.raises(ValidationError, match=rf"{field}\n.*-1e\+39 is beyond float32's range"):
        PreferenceSample(**body)


def test_the_float32_bound_itself_is_accepted_and_fits_a_float32_tensor():
    sample = PreferenceSample(**PAIR, ref_chosen_logp=-FLOAT32_MAX, ref_rejected_logp=0)
    held = torch.zeros(1)
    held[0] = sample.ref_chosen_logp  # what the trainer does with it (trainer_core._dpo_reference)
    assert torch.isfinite(held).all()
    with pytest.raises(ValidationError, match="less than or equal to 0"):
        PreferenceSample(**PAIR, ref_chosen_logp=1.0, ref_rejected_logp=0)
