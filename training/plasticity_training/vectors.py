"""From a corpus, its activations and a method to one unit vector per (layer, concept).

Runs in the extraction process.

    >>> contrasts = Contrasts(corpus, acts, pooling="mean")         # positives/negatives per concept
    >>> result = extract_vectors(contrasts, get_method("pooled"))
    >>> result.vectors[layer].shape                                  # (n_concepts, hidden), unit rows

`Contrasts.data(concept, layer)` is what a method sees (methods.ConceptData). For the subspace method the
negatives' mean projector is (sum over all texts - sum over the positives) / n_negatives, from one sum
per layer kept on the compute device, so a concept costs its positives' projectors and one eigh.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from plasticity_training.activations import Activations, progress_bar
from plasticity_training.corpus import Corpus
from plasticity_training.methods import ConceptData, Method


@dataclasses.dataclass
class Extraction:
    concepts: list[str]
    layers: list[int]
    vectors: dict[int, Tensor]  # layer -> (C, H), unit rows, fp32
    eigenvalues: dict[int, Tensor] | None = None  # layer -> (C, SPECTRUM_LEN), subspace only (nan-padded)


class Contrasts:
    """Builds each concept's ConceptData at a layer; caches the subspace projector sums per layer."""

    def __init__(self, corpus: Corpus, acts: Activations, pooling: str = "mean", device: str | None = None) -> None:
        if pooling not in acts.pooled:
            raise ValueError(f"Invalid pooling: {pooling!r} (expected one of {', '.join(acts.pooled)})")
        self.corpus, self.acts, self.pooling = corpus, acts, pooling
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pos = {c: corpus.positives(c) for c in corpus.concepts}
        self.neg = {c: corpus.negatives(c) for c in corpus.concepts}
        self.partner = {c: corpus.contrast(c) for c in corpus.concepts}
        self._projector_sums: dict[int, Tensor] = {}

    def data(self, concept: str, layer: int, exclude: int | None = None) -> ConceptData:
        """ConceptData for `concept` at `layer`; `exclude` drops one positive (leave-one-out)."""
        X = self.acts.pooled[self.pooling][layer]  # (N, H)
        keep = [(i, p) for i, p in zip(self.pos[concept], self.partner[concept]) if i != exclude]
        if not keep:
            raise ValueError(f"{concept}: no positive left at layer {layer}")
        pos_idx = [i for i, _ in keep]
        neg = X[self.neg[concept]]  # (N_neg, H)
        neg_mean = neg.mean(0)
        contrast = torch.stack([X[p] if p is not None else neg_mean for _, p in keep])  # (P, H)
        pos_bases = neg_projector = None
        if self.acts.bases is not None:
            bases = self.acts.bases[layer]
            pos_bases = [bases[i] for i in pos_idx]
            own = torch.zeros_like(self._projector_sum(layer))
            for i in self.pos[concept]:  # the negatives never include any positive, held out or not
                V = bases[i].to(own.device)
                own += V.T @ V
            neg_projector = (self._projector_sum(layer) - own) / len(self.neg[concept])  # (H, H)
        return ConceptData(pos=X[pos_idx], neg=neg, contrast=contrast, pos_bases=pos_bases,
                           neg_projector=neg_projector)

    def _projector_sum(self, layer: int) -> Tensor:
        if layer not in self._projector_sums:
            H = self.acts.hidden_size
            total = torch.zeros(H, H, device=self.device)
            for V in self.acts.bases[layer]:
                V = V.to(self.device)  # (r_i, H)
                total += V.T @ V
            self._projector_sums[layer] = total
        return self._projector_sums[layer]


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
