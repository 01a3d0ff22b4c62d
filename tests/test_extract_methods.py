"""Every extraction method recovers a planted direction in synthetic activations (plasticity_training.methods)."""

from __future__ import annotations

import pytest
import torch

from plasticity_training.activations import row_basis
from plasticity_training.methods import METHODS, ConceptData, get_method, subspace_method
from plasticity_training.vectors import make_whitener

H = 32


def planted(direction: torch.Tensor, seed: int = 0, P: int = 40, N: int = 80, noise: float = 0.5) -> ConceptData:
    """Positives = offset + noise + 2 * direction; negatives = offset + noise. Half the positives are paired
    with a negative (a "baseline"), half with the negatives' mean (a "story"). Token trajectories: each text
    spans 3 random nuisance directions; every positive's also visits `direction`."""
    g = torch.Generator().manual_seed(seed)
    u = direction / direction.norm()
    offset = 3 * torch.randn(H, generator=g)
    pos = offset + noise * torch.randn(P, H, generator=g) + 2 * u
    neg = offset + noise * torch.randn(N, H, generator=g)
    contrast = torch.cat([neg[: P // 2], neg.mean(0).expand(P - P // 2, H)])

    def trajectory(concept: bool) -> torch.Tensor:
        T = 12
        states = torch.randn(T, 3, generator=g) @ torch.randn(3, H, generator=g)  # (T, H)
        if concept:
            states = states + 2 * torch.randn(T, 1, generator=g) * u
        return row_basis(states, None)

    pos_bases = [trajectory(True) for _ in range(P)]
    neg_projector = sum(V.T @ V for V in (trajectory(False) for _ in range(N))) / N
    whiten = make_whitener(torch.cat([pos - pos.mean(0), neg - neg.mean(0)]))
    return ConceptData(pos=pos, neg=neg, contrast=contrast, pos_bases=pos_bases, neg_projector=neg_projector,
                       whiten=whiten)


def sparse_direction() -> torch.Tensor:
    return torch.zeros(H).index_fill_(0, torch.tensor([3, 17]), 1.0)


def dense_direction() -> torch.Tensor:
    return torch.randn(H, generator=torch.Generator().manual_seed(42))


@pytest.mark.parametrize("name", list(METHODS))
def test_recovers_sparse_planted_direction(name):
    u = sparse_direction()
    data = planted(u)
    v = get_method(name)(data).vector
    assert abs(float(v.norm()) - 1) < 1e-5
    assert float(v @ u / u.norm()) >= 0.9, name  # right direction and right sign
    assert float(v @ (data.pos.mean(0) - data.neg.mean(0))) > 0


@pytest.mark.parametrize("name", [m for m in METHODS if m != "logistic_l1"])
def test_recovers_dense_planted_direction(name):
    # L1 is left out on purpose: it finds the sparsest separating direction, not a dense generator.
    u = dense_direction()
    v = get_method(name)(planted(u, seed=1)).vector
    assert float(v @ u / u.norm()) >= 0.9, name


@pytest.mark.parametrize("name", list(METHODS))
def test_deterministic(name):
    data = planted(sparse_direction(), seed=2)
    a, b = get_method(name)(data), get_method(name)(data)
    assert torch.equal(a.vector, b.vector)


def test_pooled_and_mean_are_diffs_of_means():
    data = planted(dense_direction(), seed=3)
    pooled = get_method("pooled")(data).vector
    want = data.pos.mean(0) - data.neg.mean(0)
    assert torch.allclose(pooled, want / want.norm(), atol=1e-6)
    paired = get_method("mean")(data).vector
    want = (data.pos - data.contrast).mean(0)
    assert torch.allclose(paired, want / want.norm(), atol=1e-6)


def test_logistic_l1_is_sparse():
    v = get_method("logistic_l1")(planted(sparse_direction(), seed=4)).vector
    assert int((v != 0).sum()) <= 8
    with pytest.raises(ValueError, match="raise C"):
        get_method("logistic_l1", C=1e-6)(planted(sparse_direction(), seed=4))


def test_subspace_clamps_negative_eigenvalues():
    # Positives' trajectories all span u alone; the negatives' span 6 random directions. M = u u^T - M_neg
    # has one clearly positive eigenvalue; with k=5 the others are <= ~0 and must not contribute.
    g = torch.Generator().manual_seed(5)
    u = torch.nn.functional.normalize(torch.randn(H, generator=g), dim=0)
    neg_bases = [row_basis(torch.randn(6, H, generator=g), None) for _ in range(10)]
    proj = sum(V.T @ V for V in neg_bases) / 10
    pos = torch.randn(4, H, generator=g) + 3 * u
    data = ConceptData(pos=pos, neg=torch.randn(10, H, generator=g), contrast=torch.zeros(4, H),
                       pos_bases=[u[None]] * 4, neg_projector=proj)
    d = subspace_method(k=5)(data)
    evals = d.eigenvalues
    assert torch.all(evals[:-1] >= evals[1:])  # descending
    assert float(evals[0]) > 0.5 and float(evals[1]) <= 0.05
    top = torch.linalg.eigh(torch.outer(u, u) - proj).eigenvectors[:, -1]
    assert abs(float(d.vector @ top)) > 0.99  # (near-)zero-weight eigenvectors add almost nothing
    assert float(d.vector @ u) > 0.8


def test_subspace_without_contrast_raises():
    eye = torch.eye(H)
    data = ConceptData(pos=torch.randn(3, H), neg=torch.randn(5, H), contrast=torch.zeros(3, H),
                       pos_bases=[eye] * 3, neg_projector=eye)  # every text spans everything
    with pytest.raises(ValueError, match="no positive eigenvalue"):
        subspace_method()(data)
    with pytest.raises(ValueError, match="bases=True"):
        subspace_method()(ConceptData(pos=torch.randn(3, H), neg=torch.randn(5, H), contrast=torch.zeros(3, H)))


def test_invalid_options():
    with pytest.raises(ValueError, match="Invalid method: 'fisher'"):
        get_method("fisher")
    with pytest.raises(ValueError, match="Invalid C"):
        get_method("logistic", C=0)
    with pytest.raises(ValueError, match="Invalid k"):
        get_method("subspace", k=0)
    get_method("pooled", C=2.0, k=3)  # options a factory does not take are ignored


def test_lda_ignores_a_loud_direction_that_every_text_varies_along():
    """What lda is for: texts vary a lot along a direction that has nothing to do with the concept (in a real
    stream: length, topic, the shared component); with a few positives the difference of means picks part of
    it up, the whitened difference does not."""
    g = torch.Generator().manual_seed(3)
    u = torch.zeros(H).index_fill_(0, torch.tensor([5]), 1.0)  # the concept
    loud = torch.nn.functional.normalize(torch.randn(H, generator=g), dim=0)
    loud = loud - (loud @ u) * u
    loud = loud / loud.norm()

    def texts(n, concept):
        return (0.3 * torch.randn(n, H, generator=g) + 20 * torch.randn(n, 1, generator=g) * loud
                + (2 * u if concept else 0))

    pos, neg = texts(4, True), texts(200, False)
    data = ConceptData(pos=pos, neg=neg, contrast=neg.mean(0).expand(4, H),
                       whiten=make_whitener(torch.cat([pos - pos.mean(0), neg - neg.mean(0)])))
    pooled, lda = get_method("pooled")(data).vector, get_method("lda")(data).vector
    assert float(lda @ u) > 0.8
    assert float(lda @ u) > float(pooled @ u) + 0.2
