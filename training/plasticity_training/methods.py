"""Concept-direction methods: small factories picked by name, in the style of steering-vectors' aggregators.

Runs in the extraction process. A method maps one concept's activations at one layer to a unit vector,
oriented so that the concept's positives score higher than its negatives:

    >>> method = get_method("pca")                       # or METHODS["pca"]()
    >>> direction = method(ConceptData(pos=pos, neg=neg, contrast=contrast))
    >>> direction.vector.shape, float(direction.vector.norm())
    (torch.Size([128]), 1.0)

Methods:
    pooled       mean(positives) - mean(negatives): unpaired diff of means over the whole contrast set.
    mean         steering-vectors' mean_aggregator on (positive, partner) pairs; a framing's partner is its
                 scenario's baseline (same events, no emotion), a story's is the negatives' mean.
    pca          steering-vectors' pca_aggregator on the same pairs: first principal direction of the deltas.
    logistic     steering-vectors' logistic_aggregator (L2, scikit-learn) on the same pairs, scaled so that
                 the deltas' RMS entry is 1 (C then means the same on every model and layer).
    logistic_l1  the same with an L1 penalty (scikit-learn liblinear): sparse, noise coordinates go to zero.
    lda          the pooled difference whitened by the concepts' shared within-concept covariance, shrunk
                 towards its mean eigenvalue (Fisher's discriminant with one covariance for every concept):
                 (S + shrinkage * tr(S)/H * I)^-1 (mean(positives) - mean(negatives)). The stream's
                 high-variance directions (what every text varies along, emotion or not) stop dominating, so
                 a text's highest score is its own concept far more often (research/results/concepts_real.md).
    subspace     per-text right singular vectors of the token trajectory (rank hidden/4, at most 64, by default);
                 M = mean_pos V_i^T V_i - mean_neg V_i^T V_i; the top-k eigenvectors of M, each weighted by its
                 eigenvalue (negative weights clamped to zero) and oriented towards mean(pos) - mean(neg).
                 eigh runs wherever the negatives' projector lives (the GPU when there is one).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

TRAJECTORY_METHODS = frozenset({"subspace"})  # need per-text token bases (Activations.bases)
WHITENED_METHODS = frozenset({"lda"})  # need the within-concept covariance (ConceptData.whiten)
DEFAULT_SHRINKAGE = 1.0  # lda: ridge added to the covariance, in units of its mean eigenvalue (measured: 0.3-3 alike)
SPECTRUM_LEN = 20  # eigenvalues kept for the report


@dataclasses.dataclass(frozen=True)
class ConceptData:
    """One concept at one layer (fp32)."""

    pos: Tensor  # (P, H) pooled activations of the concept's positives
    neg: Tensor  # (N, H) pooled activations of its negatives
    contrast: Tensor  # (P, H) each positive's pair partner (its baseline, or the negatives' mean)
    pos_bases: list[Tensor] | None = None  # subspace: per positive (r_i, H), orthonormal rows
    neg_projector: Tensor | None = None  # subspace: (H, H) mean of V_i^T V_i over the negatives
    whiten: Callable[[Tensor], Tensor] | None = None  # lda: x -> (shrunk within-concept covariance)^-1 x


class Direction(NamedTuple):
    vector: Tensor  # (H,) unit
    eigenvalues: Tensor | None = None  # subspace: the top of M's spectrum, descending


Method = Callable[[ConceptData], Direction]


def pooled_method() -> Method:
    """Unpaired diff of means: mean(positives) - mean(negatives)."""

    def _pooled(data: ConceptData) -> Direction:
        return Direction(_unit(data.pos.mean(0) - data.neg.mean(0), "pooled"))

    return _pooled


def mean_method() -> Method:
    """steering-vectors' mean_aggregator on (positive, partner) pairs: mean(pos_i - partner_i)."""
    from steering_vectors import mean_aggregator

    return _paired(mean_aggregator(), "mean")


def pca_method() -> Method:
    """steering-vectors' pca_aggregator on (positive, partner) pairs."""
    from steering_vectors import pca_aggregator

    return _paired(pca_aggregator(), "pca")


def logistic_method(C: float = 1.0) -> Method:
    """steering-vectors' logistic_aggregator (L2-penalised, inverse strength C) on the pairs."""
    from steering_vectors import logistic_aggregator

    _check_c(C)
    return _paired(logistic_aggregator(dict(C=C, max_iter=1000)), "logistic", rescale=True)


def logistic_l1_method(C: float = 1.0) -> Method:
    """L1-penalised logistic regression (scikit-learn liblinear, inverse strength C) on the pairs.

    Sparse by construction: coordinates that do not help separate the pairs get weight exactly zero.
    Too small a C zeroes every weight (a ValueError says so).
    """
    from steering_vectors import logistic_aggregator

    _check_c(C)
    return _paired(logistic_aggregator(dict(C=C, l1_ratio=1.0, solver="liblinear", random_state=0,
                                            max_iter=1000)), "logistic_l1", rescale=True)


def lda_method() -> Method:
    """Fisher's direction with the shared within-concept covariance: whiten(mean(positives) - mean(negatives)).

    The covariance (and its shrinkage) is the corpus's, built once per layer by vectors.Contrasts, so every
    concept costs one triangular solve.
    """

    def _lda(data: ConceptData) -> Direction:
        if data.whiten is None:
            raise ValueError("lda needs the within-concept covariance: build Contrasts with whiten=True")
        return Direction(_unit(data.whiten(data.pos.mean(0) - data.neg.mean(0)), "lda"))

    return _lda


def subspace_method(k: int = 5) -> Method:
    """Top-k eigenvectors of M_pos - M_neg, weighted by eigenvalue (clamped at zero), summed.

    M_pos is the mean projector onto the positives' token row spaces, M_neg the negatives'. A direction
    every positive's trajectory visits and few negatives' do has an eigenvalue near 1. Eigenvectors have
    no sign, so each is oriented towards mean(pos) - mean(neg) before the sum (deterministic, and the
    concept's score is higher on its positives).
    """
    if k < 1:
        raise ValueError(f"Invalid k: {k} (must be >= 1)")

    @torch.no_grad()
    def _subspace(data: ConceptData) -> Direction:
        if data.pos_bases is None or data.neg_projector is None:
            raise ValueError("subspace needs token bases: collect activations with bases=True")
        proj = data.neg_projector  # (H, H), on the compute device
        m_pos = torch.zeros_like(proj)
        for V in data.pos_bases:
            V = V.to(proj.device)  # (r_i, H)
            m_pos += V.T @ V
        M = m_pos / len(data.pos_bases) - proj
        evals, evecs = torch.linalg.eigh((M + M.T) / 2)  # ascending
        evals, evecs = evals.flip(0), evecs.flip(1)
        weights = evals[:k].clamp(min=0)  # (k,)
        if float(weights.max()) <= 1e-5:
            raise ValueError(
                "subspace: M_pos - M_neg has no positive eigenvalue; when every text has at least `hidden` "
                "tokens each projector is the identity at full rank, so pass a subspace rank below hidden")
        orient = (data.pos.mean(0) - data.neg.mean(0)).to(proj.device)  # (H,)
        signs = torch.sign(evecs[:, :k].T @ orient)  # (k,)
        signs[signs == 0] = 1
        vector = evecs[:, :k] @ (weights * signs)  # (H,)
        return Direction(_unit(vector.cpu(), "subspace"), evals[:SPECTRUM_LEN].cpu())

    return _subspace


METHODS: dict[str, Callable[..., Method]] = {
    "pooled": pooled_method,
    "mean": mean_method,
    "pca": pca_method,
    "logistic": logistic_method,
    "logistic_l1": logistic_l1_method,
    "lda": lda_method,
    "subspace": subspace_method,
}


def get_method(name: str, **options) -> Method:
    """The method `name` with the options its factory accepts (others are ignored: C, k ...)."""
    if name not in METHODS:
        raise ValueError(f"Invalid method: {name!r} (expected one of {', '.join(METHODS)})")
    factory = METHODS[name]
    accepted = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in options.items() if k in accepted and v is not None})


def _paired(aggregator, name: str, rescale: bool = False) -> Method:
    def _method(data: ConceptData) -> Direction:
        pos, contrast = data.pos.float(), data.contrast.float()
        if rescale:
            # Regularization strength depends on the data's scale, which varies by model and layer (residual
            # norms from ~1 to ~1000): divide by the deltas' RMS entry so that C means the same everywhere.
            # One scalar for every coordinate: the geometry, hence the direction, is unchanged.
            rms = float((pos - contrast).pow(2).mean().sqrt())
            pos, contrast = pos / max(rms, 1e-12), contrast / max(rms, 1e-12)
        with warnings.catch_warnings():
            # steering-vectors builds a tensor from a list of ndarrays (slow-path warning, harmless here).
            warnings.filterwarnings("ignore", message="Creating a tensor from a list of numpy", category=UserWarning)
            vector = aggregator(pos, contrast)
        return Direction(_unit(vector, name))

    return _method


def _unit(v: Tensor, name: str) -> Tensor:
    v = v.detach().float().reshape(-1)
    norm = float(v.norm())
    if not norm > 1e-12 or not torch.isfinite(v).all():
        hint = " (L1 penalty too strong: raise C)" if name == "logistic_l1" else ""
        raise ValueError(f"{name}: the direction is zero or not finite{hint}")
    return v / norm


def check_shrinkage(shrinkage: float) -> None:
    if not shrinkage > 0:
        raise ValueError(f"Invalid shrinkage: {shrinkage} (must be > 0: the covariance of a few hundred texts in "
                         f"a wider stream is singular)")


def _check_c(C: float) -> None:
    if not C > 0:
        raise ValueError(f"Invalid C: {C} (inverse regularization strength, must be > 0)")
