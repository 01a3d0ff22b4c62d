"""Held-out accuracy of a bank: would the readout name a text's concept if the text had not been in the corpus?

Runs in the extraction process (the report, and `--layers auto`'s layer choice).

    >>> folds = held_out_folds(contrasts)                         # FOLDS sets of held-out texts
    >>> result = held_out_accuracy(contrasts, method, layer, folds)
    >>> result["accuracy"], result["top5"], result["chance"]
    >>> accuracy_of(contrasts, [a + b for a, b in zip(scores_15, scores_21)], folds)   # a bank of two layers

Fold j holds out the j-th text of every concept that has at least two (so one is always left). Per fold,
every concept's vector, the centre and any shared statistic (the lda covariance, the subspace projector
sums) are computed as if the held-out texts were not in the corpus at all; each held-out text is then
scored as the server's readout scores it: calibrated, (h - centre) . v / s, with the centre and each
concept's scale s (calibration.concept_scales) measured on the remaining texts; a hit is its own concept scoring highest among all. This
is leave-one-story-out done honestly at the cost of FOLDS method calls per concept: leaving one text out
while keeping it among the other concepts' negatives lets a discriminative method (lda) learn to score it
low for every other concept, which inflated top-1 from 28% to 98% on SmolLM2-135M (research/results/
concepts_real.md).
"""

from __future__ import annotations

import torch

from plasticity_training.calibration import concept_scales
from plasticity_training.methods import Method
from plasticity_training.vectors import Contrasts

FOLDS = 3
TOP = 5  # a top-5 hit: the own concept among the five highest scores


def held_out_folds(contrasts: Contrasts, folds: int = FOLDS) -> list[frozenset[int]]:
    """The held-out sets: fold j holds out each concept's j-th positive when it has at least two; empty
    folds are dropped (a corpus where no concept has two texts has none)."""
    sets = [frozenset(pos[j] for pos in contrasts.pos.values() if len(pos) >= 2 and j < len(pos))
            for j in range(folds)]
    return [s for s in sets if s]


def held_out_accuracy(contrasts: Contrasts, method: Method, layer: int,
                      folds: list[frozenset[int]] | None = None) -> dict:
    """Top-1 and top-5 accuracy of calibrated readout on held-out texts at `layer`, and per concept its hits
    ({"held_out": n, "hits": k}); accuracy is None when nothing could be held out."""
    folds = held_out_folds(contrasts) if folds is None else folds
    return accuracy_of(contrasts, held_out_scores(contrasts, method, layer, folds), folds)


def held_out_scores(contrasts: Contrasts, method: Method, layer: int, folds: list[frozenset[int]]) -> list[torch.Tensor]:
    """Per fold, every text's calibrated score for every concept (N, C) at `layer`, with every vector, the
    centre and the scales fitted without that fold's held-out texts. Scores of several layers add up to the
    readout of a bank of those layers (calibrated scores share one scale: accuracy_of their sum)."""
    concepts = contrasts.corpus.concepts
    X = contrasts.acts.pooled[contrasts.pooling][layer].double()  # (N, H)
    out = []
    for held in folds:
        kept = [i for i in range(len(X)) if i not in held]
        V = torch.stack([method(contrasts.data(c, layer, held_out=held)).vector for c in concepts]).double()
        centre = X[kept].mean(0)
        scale, _, _ = concept_scales(X[kept], centre, V)  # as the bank's calibration measures it
        out.append((X - centre) @ V.T / scale)
    return out


def accuracy_of(contrasts: Contrasts, fold_scores: list[torch.Tensor], folds: list[frozenset[int]]) -> dict:
    """held_out_accuracy's figures from per-fold scores (held_out_scores, or a sum of several layers')."""
    concepts = contrasts.corpus.concepts
    hits = top5 = evaluated = 0
    per_concept = {c: {"held_out": 0, "hits": 0} for c in concepts}
    for held, scores in zip(folds, fold_scores):
        for k, c in enumerate(concepts):
            for t in contrasts.pos[c]:
                if t in held:
                    rank = int((scores[t] > scores[t, k]).sum())
                    hits, top5, evaluated = hits + (rank == 0), top5 + (rank < TOP), evaluated + 1
                    per_concept[c]["held_out"] += 1
                    per_concept[c]["hits"] += rank == 0
    return {"accuracy": hits / evaluated if evaluated else None, "top5": top5 / evaluated if evaluated else None,
            "evaluated": evaluated, "chance": 1 / len(concepts), "folds": len(folds), "per_concept": per_concept}
