"""Quality metrics for concept vectors: pure functions on tensors, each with a known answer in the tests.

Runs in the extraction process (report.py assembles them into quality.json).

    >>> first_pc_variance_ratio(deltas)          # 1.0: every positive moves the same way
    >>> ridge_r2(vectors, i)                     # (R^2, coefficients): near 1 = a mix of other concepts
    >>> neuron_alignment(v, down_proj)           # (neuron, cosine): one MLP neuron writes it?
    >>> head_contributions(diff, o_proj, v, n_heads)   # which attention heads write it

A positive's *delta* is its activation minus its pair partner (its scenario's baseline, or the negatives'
mean for a story), the same pairs the paired methods use: the concept's signal in that one text.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Triage thresholds (heuristics from the original system's reports; tune on the served model).
REDUNDANT_R2 = 0.9  # explained this well by the other concepts: a mix of them, not a concept of its own
FRAGMENTED_PC = 0.5  # first principal component of the deltas carries less than this share
FRAGMENTED_AGREEMENT = 0.1  # mean pairwise cosine of the deltas below this: the texts disagree
RIDGE_LAMBDA = 0.01  # keeps coefficients stable when concepts are near-collinear


def first_pc_variance_ratio(deltas: Tensor) -> float | None:
    """Share of the deltas' (uncentered) energy on their first principal direction; None if < 2 deltas.

    1.0 when every positive moves the activation the same way (up to scale); 1/n when they are
    orthogonal. Uncentered because the deltas are already differences: their mean is the signal.
    """
    if deltas.shape[0] < 2:
        return None
    s = torch.linalg.svdvals(deltas.double())  # (min(n, H),)
    return float(s[0] ** 2 / (s**2).sum())


def agreement(deltas: Tensor) -> float | None:
    """Mean pairwise cosine of the deltas (signed: opposite deltas count against); None if < 2."""
    n = deltas.shape[0]
    if n < 2:
        return None
    u = torch.nn.functional.normalize(deltas.double(), dim=1)
    cos = u @ u.T
    return float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))


def alignment_cosines(deltas: Tensor, vector: Tensor) -> Tensor:
    """cos(delta_i, vector) per positive: (n,). The lowest are the outliers."""
    return torch.nn.functional.cosine_similarity(deltas.double(), vector.double()[None], dim=1).float()


def nearest(vectors: Tensor, i: int, k: int = 5) -> list[tuple[int, float]]:
    """The k other rows of `vectors` (C, H) most cosine-similar to row i, best first."""
    u = torch.nn.functional.normalize(vectors.double(), dim=1)
    cos = u @ u[i]
    cos[i] = -math.inf
    top = torch.topk(cos, min(k, len(cos) - 1))
    return [(int(j), float(c)) for c, j in zip(top.values, top.indices)]


def cosine_matrix(vectors: Tensor) -> Tensor:
    u = torch.nn.functional.normalize(vectors.double(), dim=1)
    return (u @ u.T).float()  # (C, C)


def neuron_alignment(vector: Tensor, down_proj: Tensor) -> tuple[int, float]:
    """(neuron j, cos(vector, down_proj[:, j])) for the MLP neuron whose output column is best aligned
    (largest |cos|, sign kept). down_proj: (H, I), column j is what neuron j writes to the residual."""
    cols = torch.nn.functional.normalize(down_proj.double(), dim=0)  # (H, I)
    cos = vector.double() @ cols  # (I,)
    j = int(cos.abs().argmax())
    return j, float(cos[j])


def head_contributions(head_diff: Tensor, o_proj: Tensor, vector: Tensor, n_heads: int) -> Tensor:
    """Each head's share of the concept's score difference: (n_heads,), signed, summing to the attention
    output's total contribution along `vector`.

    head_diff: (n_heads * head_dim,) mean(positives) - mean(negatives) of the o_proj input (the heads'
    concatenated outputs); o_proj: (H, n_heads * head_dim). Head h writes o_proj[:, block_h] @ diff_h.
    """
    hd = head_diff.numel() // n_heads
    per_head = head_diff.double().reshape(n_heads, hd)  # (n_heads, hd)
    blocks = o_proj.double().reshape(o_proj.shape[0], n_heads, hd)  # (H, n_heads, hd)
    writes = torch.einsum("hnd,nd->nh", blocks, per_head)  # (n_heads, H)
    return (writes @ vector.double()).float()


def head_concentration(contributions: Tensor, top: int | None = None) -> float:
    """Share of sum |contribution| carried by the top `top` heads (default: a quarter of them, at least 1).
    Near 1: a sparse head circuit; near top/n_heads: spread evenly."""
    a = contributions.abs().double()
    top = top or max(1, math.ceil(len(a) / 4))
    total = float(a.sum())
    return float(torch.topk(a, top).values.sum() / total) if total > 0 else 0.0


def ridge_r2(vectors: Tensor, i: int, lam: float = RIDGE_LAMBDA) -> tuple[float, Tensor]:
    """Ridge-regress row i of `vectors` (C, H) on the other rows: (R^2, coefficients (C,), 0 at i).

    R^2 = 1 - |residual|^2 / |v|^2 (uncentered: directions, not data with an offset). With C - 1 >= H any
    vector is a combination of the others and R^2 is near 1 by dimension alone: compare r2_chance().
    """
    V = vectors.double()
    v = V[i]  # (H,)
    others = torch.cat([V[:i], V[i + 1 :]])  # (C-1, H)
    gram = others @ others.T + lam * torch.eye(len(others), dtype=V.dtype)
    beta = torch.linalg.solve(gram, others @ v)  # (C-1,)
    resid = v - beta @ others
    r2 = 1.0 - float(resid @ resid / (v @ v))
    coefs = torch.cat([beta[:i], torch.zeros(1, dtype=V.dtype), beta[i:]]).float()
    return r2, coefs


def r2_chance(n_concepts: int, hidden: int) -> float:
    """Expected R^2 of a random direction against n_concepts - 1 random others (no ridge)."""
    return min(1.0, (n_concepts - 1) / hidden)


def pc_correlations(vectors: Tensor, attributes: dict[str, Tensor], n_pcs: int = 3) -> list[dict]:
    """Pearson r of each of the first principal components of the concept vectors (C, H) with each
    attribute (C,) (valence, arousal), plus each PC's explained-variance share. A PC's sign is arbitrary,
    so is r's."""
    X = vectors.double() - vectors.double().mean(0)
    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    scores = U * S  # (C, min(C, H))
    explained = S**2 / (S**2).sum()
    out = []
    for j in range(min(n_pcs, scores.shape[1])):
        row = {"pc": j + 1, "explained": float(explained[j])}
        for name, values in attributes.items():
            row[name] = _pearson(scores[:, j], values.double())
        out.append(row)
    return out


def triage(n_positives: int, agreement_: float | None, first_pc: float | None, r2: float,
           r2_meaningful: bool) -> str:
    """clean, fragmented (its texts disagree), redundant (a mix of other concepts), or thin (one positive
    text: agreement cannot be measured)."""
    if r2_meaningful and r2 >= REDUNDANT_R2:
        return "redundant"
    if n_positives < 2:
        return "thin"
    if (first_pc is not None and first_pc < FRAGMENTED_PC) or (agreement_ is not None and agreement_ < FRAGMENTED_AGREEMENT):
        return "fragmented"
    return "clean"


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0
