"""A bank's calibration from the corpus it was extracted from: per layer a centre, per concept a scale.

Runs in the extraction process. With X the pooled states of the corpus texts at a layer (the states the
vectors were extracted from) and v a concept's unit vector:

    centre  c   = mean of X over every text ("corpus"), or over the neutral baselines ("baselines")
    scale   s_k = mean over concept k's own texts (its positives) of (x - c) . v_k

so that the calibrated score (h - c) . v_k / s_k is 0 for the centre's texts on average and 1 for the
concept's own texts on average, whatever the layer's norm, the model, or the concept (the contract's
calibrated_scores). The same s_k is the natural unit of steering: adding strength * s_k * v_k moves the
steered layer's calibrated score by `strength`.

    >>> calibration = calibrate(contrasts, extraction, centre="corpus")
    >>> save_bank(out, extraction.concepts, extraction.vectors, ..., calibration=calibration)

A scale is floored at SCALE_FLOOR times the layer's RMS distance of texts from the centre: a concept whose
own texts do not lie beyond the centre along its vector (possible with the paired methods, never with
`pooled` and two or more concepts) would otherwise divide by zero or flip its sign; `floored` lists them.
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
    centres, scales, floored, spread = {}, {}, {}, {}
    for L in extraction.layers:
        X = contrasts.acts.pooled[contrasts.pooling][L].double()  # (N, H)
        c = X[rows].mean(0)  # (H,)
        V = extraction.vectors[L].double()  # (C, H), unit rows
        projections = (X - c) @ V.T  # (N, C)
        s = torch.stack([projections[contrasts.pos[k], i].mean() for i, k in enumerate(extraction.concepts)])
        spread[L] = float((X - c).pow(2).sum(1).mean().sqrt())
        floor = SCALE_FLOOR * max(spread[L], 1e-30)
        low = s < floor
        floored[L] = [k for k, is_low in zip(extraction.concepts, low.tolist()) if is_low]
        centres[L], scales[L] = c.float(), torch.where(low, torch.full_like(s, floor), s).float()
    info = {"centre": centre, "scale": "own_texts_mean", "pooling": contrasts.pooling, "n_centre_texts": len(rows)}
    return CalibrationResult(Calibration(centres, scales, info), {L: v for L, v in floored.items() if v}, spread)
