"""A bank's calibration from the corpus it was extracted from: per layer a centre, per concept a scale.

Runs in the extraction process. With X the pooled states of the corpus texts at a layer (the states the
vectors were extracted from) and v a concept's unit vector:

    centre  c   = mean of X over every text ("corpus"), or over the neutral baselines ("baselines")
    scale   s_k = standard deviation over every corpus text of (x - c) . v_k

so that the calibrated score (h - c) . v_k / s_k is 0 for the centre's texts on average and counts standard
deviations of the corpus along the concept's direction: a z-score, the same for every concept, layer and
model (the contract's calibrated_scores). Steering's natural unit is each concept's own offset from the
centre, measured beside them:

    steer   m_k = mean of X over the concept's positives - c

so strength 1 moves a state as far, and the same way, as the concept's texts lie from the centre on average
(the contract's natural_steering). Not s_k * v_k: lda's v_k points where the texts vary little, and steering
along it needed 8x the strength to move a real model's tone (32 against 4 on SmolLM2: research/results/
steering_real_lda_std.md, steering_real.md).

Why the corpus's spread and not "1 = the concept's own texts on average" (tried first): with the own-texts
mean, a concept whose texts lie only a little beyond the centre divides by a small number and outranks the
right concept on unrelated texts; on SmolLM2-135M-Instruct, held-out top-1 over 167 concepts was 21% with it
and 32% with the spread (lda, layer 18; research/results/concepts_real.md).

    >>> calibration = calibrate(contrasts, extraction, centre="corpus")
    >>> save_bank(out, extraction.concepts, extraction.vectors, ..., calibration=calibration)

A scale is floored at SCALE_FLOOR times the layer's RMS distance of texts from the centre: a direction along
which the corpus does not vary would otherwise divide by zero; `floored` lists them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor

from plasticity_training.vectors import Contrasts, Extraction
from vllm_plasticity.contract.bank import Calibration

CentreSource = Literal["corpus", "baselines"]
CENTRES: tuple[CentreSource, ...] = ("corpus", "baselines")
SCALE_FLOOR = 1e-3  # smallest scale, as a fraction of the layer's RMS text distance from the centre
SCALE_RULE = "corpus_std"  # readout.json's calibration.scale: how s was measured (module docstring)
STEER_RULE = "concept_mean_offset"  # readout.json's calibration.steer: how m was measured


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    calibration: Calibration
    floored: dict[int, list[str]]  # layer -> concepts whose scale was raised to the floor
    spread: dict[int, float]  # layer -> RMS distance of the corpus texts from the centre (the floor's unit)


def calibrate(contrasts: Contrasts, extraction: Extraction, centre: CentreSource = "corpus") -> CalibrationResult:
    """The centre and scales of `extraction`'s unit vectors, measured on the pooled states they came from."""
    if centre not in CENTRES:
        raise ValueError(f"Invalid centre: {centre!r} (expected one of {', '.join(CENTRES)})")
    corpus = contrasts.corpus
    rows = corpus.baselines() if centre == "baselines" else list(range(len(corpus.texts)))
    if not rows:
        raise ValueError("Invalid centre: 'baselines', but the corpus has no baseline texts "
                         "(paired/<scenario>/baseline.txt); use the corpus mean")
    centres, scales, steers, floored, spread = {}, {}, {}, {}, {}
    for L in extraction.layers:
        X = contrasts.acts.pooled[contrasts.pooling][L].double()  # (N, H)
        c = X[rows].mean(0)  # (H,)
        V = extraction.vectors[L].double()  # (C, H), unit rows
        s, low, spread[L] = concept_scales(X, c, V)
        floored[L] = [k for k, is_low in zip(extraction.concepts, low.tolist()) if is_low]
        centres[L], scales[L] = c.float(), s.float()
        steers[L] = torch.stack([X[corpus.positives(k)].mean(0) - c for k in extraction.concepts]).float()
    info = {"centre": centre, "scale": SCALE_RULE, "steer": STEER_RULE, "pooling": contrasts.pooling,
            "n_centre_texts": len(rows)}
    return CalibrationResult(Calibration(centres, scales, info, steers), {L: v for L, v in floored.items() if v},
                             spread)


def concept_scales(X: Tensor, centre: Tensor, V: Tensor) -> tuple[Tensor, Tensor, float]:
    """Each concept's scale on the texts X (N, H) for unit rows V (C, H): (scales (C,), floored (C,) bool,
    the texts' RMS distance from the centre). The one rule for a scale, used by calibrate and held_out."""
    X, centre, V = X.double(), centre.double(), V.double()
    projections = (X - centre) @ V.T  # (N, C)
    s = projections.std(0, correction=0)
    spread = float((X - centre).pow(2).sum(1).mean().sqrt())
    floor = SCALE_FLOOR * max(spread, 1e-30)
    low = s < floor
    return torch.where(low, torch.full_like(s, floor), s), low, spread
