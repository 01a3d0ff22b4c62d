"""The preference losses against readable re-implementations of the published formulas (known answers on
fixed inputs), sample weights, and the sequence log-probs they are computed from."""

from __future__ import annotations

import math

import pytest
import torch

from plasticity_training.hf_view import build_hf_view, token_logprobs
from plasticity_training.objectives import continuation_logprobs, dpo_loss, orpo_loss, sft_loss
from tiny_models import tiny, vllm_layout  # noqa: F401 (tiny is a fixture)

CHOSEN = [-3.2, -10.5, -1.25]  # summed continuation log-probs per sample
REJECTED = [-4.0, -9.0, -6.5]
REF_CHOSEN = [-3.5, -10.0, -2.0]
REF_REJECTED = [-3.9, -9.5, -6.0]
N_CHOSEN, N_REJECTED = [2, 5, 1], [3, 4, 2]
WEIGHTS = [1.0, 0.5, 2.0]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def t(xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_dpo_equals_the_papers_formula():
    beta = 0.3
    # Rafailov et al. 2023, eq. 7: -log sigma(beta log(pi(y_w)/ref(y_w)) - beta log(pi(y_l)/ref(y_l)))
    per = [-log_sigmoid(beta * ((c - rc) - (r - rr))) for c, r, rc, rr in zip(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED)]
    expected = sum(w * x for w, x in zip(WEIGHTS, per)) / sum(WEIGHTS)
    margin = sum(w * beta * ((c - rc) - (r - rr)) for w, c, r, rc, rr in
                 zip(WEIGHTS, CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED)) / sum(WEIGHTS)
    out = dpo_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), beta, t(WEIGHTS))
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.margin == pytest.approx(margin, abs=1e-6)
    assert out.chosen_logp == pytest.approx(sum(w * c for w, c in zip(WEIGHTS, CHOSEN)) / sum(WEIGHTS), abs=1e-6)


def test_orpo_equals_the_papers_formula():
    lam = 0.25

    def log_odds(mean_logp):  # Hong et al. 2024: odds(y|x) = P(y|x) / (1 - P(y|x)), P length-normalised
        p = math.exp(mean_logp)
        return math.log(p / (1 - p))

    per = []
    for c, r, nc, nr in zip(CHOSEN, REJECTED, N_CHOSEN, N_REJECTED):
        l_sft = -c / nc
        l_or = -log_sigmoid(log_odds(c / nc) - log_odds(r / nr))
        per.append(l_sft + lam * l_or)
    expected = sum(w * x for w, x in zip(WEIGHTS, per)) / sum(WEIGHTS)
    out = orpo_loss(t(CHOSEN), t(N_CHOSEN), t(REJECTED), t(N_REJECTED), lam, t(WEIGHTS))
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)


def test_sft_weights_scale_each_samples_tokens():
    sums, counts = t([-6.0, -2.0]), t([3.0, 1.0])
    assert sft_loss(sums, counts, t([1.0, 1.0])).loss.item() == pytest.approx(8.0 / 4.0)  # the plain token mean
    assert sft_loss(sums, counts, t([1.0, 3.0])).loss.item() == pytest.approx((6.0 + 6.0) / (3.0 + 3.0))


def test_continuation_logprobs_are_the_models_own(tiny):
    model = build_hf_view(tiny, vllm_layout(tiny))
    contexts, continuations = [[5, 17, 42], [9]], [[99, 7], [250, 11, 3]]
    sums, counts = continuation_logprobs(model, 0, contexts, continuations)
    for i, (c, y) in enumerate(zip(contexts, continuations)):
        expected = sum(token_logprobs(model, c + y)[len(c) - 1:])  # entry k: log p(token k+1 | tokens <= k)
        assert sums[i].item() == pytest.approx(expected, abs=1e-5) and counts[i].item() == len(y)
