"""From a corpus, its activations and a method to one unit vector per (layer, concept).

Runs in the extraction process.

    >>> contrasts = Contrasts(corpus, acts, pooling="mean")         # positives/negatives per concept
    >>> result = extract_vectors(contrasts, get_method("pooled"))
    >>> result.vectors[layer].shape                                  # (n_concepts, hidden), unit rows

`Contrasts.data(concept, layer)` is what a method sees (methods.ConceptData); `held_out=` leaves texts out of
everything (held-out accuracy). For the lda method the within-concept covariance is factored once per
layer. For the subspace method the negatives' mean projector is (sum over all texts - sum over the positives) / n_negatives, from one sum
per layer kept on the compute device, so a concept costs its positives' projectors and one eigh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection

import torch
from torch import Tensor

from plasticity_training.activations import Activations, progress_bar
from plasticity_training.corpus import Corpus
from plasticity_training.methods import DEFAULT_SHRINKAGE, ConceptData, Method, check_shrinkage


@dataclasses.dataclass
class Extraction:
    concepts: list[str]
    layers: list[int]
    vectors: dict[int, Tensor]  # layer -> (C, H), unit rows, fp32
    eigenvalues: dict[int, Tensor] | None = None  # layer -> (C, SPECTRUM_LEN), subspace only (nan-padded)


class Contrasts:
    """Builds each concept's ConceptData at a layer; caches per layer (and held-out set) the subspace
    projector sums and the lda whitening."""

    def __init__(self, corpus: Corpus, acts: Activations, pooling: str = "mean", device: str | None = None,
                 whiten: bool = False, shrinkage: float = DEFAULT_SHRINKAGE) -> None:
        if pooling not in acts.pooled:
            raise ValueError(f"Invalid pooling: {pooling!r} (expected one of {', '.join(acts.pooled)})")
        check_shrinkage(shrinkage)
        self.corpus, self.acts, self.pooling = corpus, acts, pooling
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.whiten, self.shrinkage = whiten, shrinkage
        self.pos = {c: corpus.positives(c) for c in corpus.concepts}
        self.neg = {c: corpus.negatives(c) for c in corpus.concepts}
        self.partner = {c: corpus.contrast(c) for c in corpus.concepts}
        self._projector_sums: dict[tuple[int, frozenset[int]], Tensor] = {}
        self._whiteners: dict[tuple[int, frozenset[int]], Callable[[Tensor], Tensor]] = {}

    def data(self, concept: str, layer: int, held_out: Collection[int] = ()) -> ConceptData:
        """ConceptData for `concept` at `layer`, as if the texts in `held_out` were not in the corpus (they are
        neither positives, negatives, nor part of any shared statistic): held-out accuracy (report.py)."""
        held = frozenset(held_out)
        X = self.acts.pooled[self.pooling][layer]  # (N, H)
        keep = [(i, p) for i, p in zip(self.pos[concept], self.partner[concept]) if i not in held]
        if not keep:
            raise ValueError(f"{concept}: no positive left at layer {layer}")
        pos_idx = [i for i, _ in keep]
        neg = X[[i for i in self.neg[concept] if i not in held]]  # (N_neg, H)
        neg_mean = neg.mean(0)
        contrast = torch.stack([X[p] if p is not None and p not in held else neg_mean for _, p in keep])  # (P, H)
        pos_bases = neg_projector = None
        if self.acts.bases is not None:
            bases = self.acts.bases[layer]
            pos_bases = [bases[i] for i in pos_idx]
            own = torch.zeros_like(self._projector_sum(layer, held))
            for i in self.pos[concept]:  # the negatives never include any positive, held out or not
                if i not in held:
                    V = bases[i].to(own.device)
                    own += V.T @ V
            neg_projector = (self._projector_sum(layer, held) - own) / len(neg)  # (H, H)
        whiten = self._whitener(layer, held) if self.whiten else None
        return ConceptData(pos=X[pos_idx], neg=neg, contrast=contrast, pos_bases=pos_bases,
                           neg_projector=neg_projector, whiten=whiten)

    def _projector_sum(self, layer: int, held: frozenset[int]) -> Tensor:
        """Sum of V_i^T V_i over every text not held out."""
        if (layer, held) not in self._projector_sums:
            H = self.acts.hidden_size
            total = torch.zeros(H, H, device=self.device)
            for i, V in enumerate(self.acts.bases[layer]):
                if i not in held:
                    V = V.to(self.device)  # (r_i, H)
                    total += V.T @ V
            self._projector_sums[(layer, held)] = total
        return self._projector_sums[(layer, held)]

    def _whitener(self, layer: int, held: frozenset[int]) -> Callable[[Tensor], Tensor]:
        """x -> (S + shrinkage * tr(S)/H * I)^-1 x, S the within-concept covariance: every concept's positives
        around their own mean (what varies between texts of one emotion), pooled over the concepts."""
        if (layer, held) not in self._whiteners:
            X = self.acts.pooled[self.pooling][layer].double()
            residuals = []
            for c in self.corpus.concepts:
                rows = [i for i in self.pos[c] if i not in held]
                if len(rows) > 1:
                    residuals.append(X[rows] - X[rows].mean(0))
            R = torch.cat(residuals) if residuals else torch.zeros(1, X.shape[1], dtype=X.dtype)
            self._whiteners[(layer, held)] = make_whitener(R, self.shrinkage)
        return self._whiteners[(layer, held)]


def make_whitener(residuals: Tensor, shrinkage: float = DEFAULT_SHRINKAGE) -> Callable[[Tensor], Tensor]:
    """x -> (S + shrinkage * tr(S)/H * I)^-1 x for S = residuals^T residuals / n (residuals: (n, H), each row a
    text minus its own concept's mean). Factored once (Cholesky); each call is two triangular solves."""
    check_shrinkage(shrinkage)
    R = residuals.double()
    H = R.shape[1]
    S = R.T @ R / max(1, len(R))
    ridge = shrinkage * max(float(S.trace()) / H, 1e-12)
    factor = torch.linalg.cholesky(S + ridge * torch.eye(H, dtype=S.dtype))

    def whiten(x: Tensor) -> Tensor:
        return torch.cholesky_solve(x.double().reshape(-1, 1), factor).reshape(x.shape).to(x.dtype)

    return whiten


def extract_vectors(contrasts: Contrasts, method: Method, progress: bool = False) -> Extraction:
    """Run `method` for every (layer, concept); a failure names the concept and layer."""
    concepts, layers = contrasts.corpus.concepts, contrasts.acts.layers
    vectors: dict[int, Tensor] = {}
    spectra: dict[int, Tensor] = {}
    bar = progress_bar(len(layers) * len(concepts), progress, desc="vectors")
    try:
        for L in layers:
            rows, eig = [], []
            for c in concepts:
                try:
                    direction = method(contrasts.data(c, L))
                except ValueError as e:
                    raise ValueError(f"concept {c!r}, layer {L}: {e}") from e
                rows.append(direction.vector)
                if direction.eigenvalues is not None:
                    eig.append(direction.eigenvalues)
                bar.update(1)
            vectors[L] = torch.stack(rows)  # (C, H)
            if eig:
                width = max(e.numel() for e in eig)
                spectra[L] = torch.stack([torch.nn.functional.pad(e, (0, width - e.numel()), value=float("nan"))
                                          for e in eig])
    finally:
        bar.close()
    return Extraction(concepts=list(concepts), layers=list(layers), vectors=vectors, eigenvalues=spectra or None)
