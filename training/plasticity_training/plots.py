"""PNG plots for the quality report (matplotlib, Agg backend: no display needed).

Runs in the extraction process.

    >>> cosine_heatmap(cos, names, clusters, "bank/cosine_L12.png", title="layer 12")
    >>> spectra(vectors, eigenvalues, "bank/spectrum_L12.png", layer=12)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def cosine_heatmap(cos: Tensor, names: list[str], clusters: list[str], path: str | Path, title: str) -> Path:
    """Concept-by-concept cosine matrix, concepts grouped by manifest cluster (then name)."""
    plt = _pyplot()
    order = sorted(range(len(names)), key=lambda i: (clusters[i], names[i]))
    m = cos[order][:, order].numpy()
    n = len(names)
    size = min(24.0, max(5.0, 0.12 * n + 3))
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    fontsize = max(2.0, min(8.0, 500.0 / max(n, 1)))
    ax.set_xticks(range(n), [names[i] for i in order], rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), [names[i] for i in order], fontsize=fontsize)
    for k in range(1, n):  # cluster boundaries
        if clusters[order[k]] != clusters[order[k - 1]]:
            ax.axhline(k - 0.5, color="k", lw=0.4)
            ax.axvline(k - 0.5, color="k", lw=0.4)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.03, label="cosine")
    return _save(fig, path)


def spectra(vectors: Tensor, eigenvalues: Tensor | None, path: str | Path, layer: int) -> Path:
    """Left (subspace method): each concept's top eigenvalues of M_pos - M_neg, normalised by the first,
    with the median; a flat curve means the concept is spread over several directions. Right: the
    singular values of the bank itself (how many dimensions the concepts span)."""
    plt = _pyplot()
    panels = 2 if eigenvalues is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    if eigenvalues is not None:
        ax = axes[0, 0]
        ev = eigenvalues / eigenvalues[:, :1].clamp(min=1e-12)  # (C, k)
        for row in ev:
            ax.plot(range(1, len(row) + 1), row.numpy(), color="0.6", lw=0.5, alpha=0.6)
        ax.plot(range(1, ev.shape[1] + 1), torch.nanmedian(ev, dim=0).values.numpy(), color="C3", lw=2, label="median")
        ax.axhline(0, color="k", lw=0.5)
        ax.set(xlabel="eigenvalue index", ylabel="lambda_k / lambda_1", title=f"subspace spectra, layer {layer}")
        ax.legend()
    ax = axes[0, -1]
    s = torch.linalg.svdvals(vectors.double())
    ax.plot(range(1, len(s) + 1), (s**2 / (s**2).sum()).numpy(), marker=".", lw=1)
    ax.set_yscale("log")
    ax.set(xlabel="component", ylabel="share of variance", title=f"bank singular values, layer {layer}")
    return _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
