"""Causal-bank test models built with the reference package (decepticons 0.1.3), exported the project's way.

Weights are the reference's seeded initialisation plus seeded Gaussian noise on every trained tensor, so no
readout is trivially zero. The selective-scan decays are drawn in [-0.5, 0): the reference computes that
scan in chunks of 32 with its cumulative decay clamped at 1e-8, exact only while a channel keeps more than
1e-8 of its state over 32 tokens (DESIGN.md); within that range the reference is the exact recurrence.
"""

from __future__ import annotations

from pathlib import Path

import torch

VARIANTS = {
    "default": {},
    "learnable_decays_gated": {"substrate_mode": "learnable_decays", "mix_mode": "gated"},
    "bands_experts": {"readout_bands": 4, "linear_readout_kind": "routed_sqrelu_experts", "band_experts": (0, 4, 2, 4)},
    "tied_embed_shared": {"linear_readout_kind": "tied_embed_readout", "share_embedding": True, "local_window": 4},
    "selective_scan": {"state_dim": 16, "num_heads": 4, "substrate_mode": "learnable_mixing"},
}

# What the slow sweep serves: every supported variant's fields in two models, since a server start costs about a
# minute here and the fields combine (each combination equals the reference: tests/test_causal_bank_forms.py).
# The two substrate modes exclude each other, so they split the variants.
SERVED_SWEEP = {
    "decays_gated_bands_experts": {**VARIANTS["learnable_decays_gated"], **VARIANTS["bands_experts"]},
    "scan_tied_shared": {**VARIANTS["selective_scan"], **VARIANTS["tied_embed_shared"]},
}


def reference_model(fields: dict, vocab: int = 256, seed: int = 0, max_seq_len: int = 256):
    from decepticons.causal_bank import CausalBankConfig
    from decepticons.models.causal_bank_torch import CausalBankModel

    model = CausalBankModel(vocab, CausalBankConfig(max_seq_len=max_seq_len, **fields)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "_ssm_A":
                p.copy_(-0.5 * torch.rand(p.shape, generator=g) - 1e-3)
            elif name not in ("linear_decays",) and not name.endswith("_embedding_weight"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def reference_logprobs(model):
    """ids -> [log p(ids[i] | ids[<i])] for i = 1..n-1 from the reference's own forward (fp32)."""
    def run(ids: list[int]) -> list[float]:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
        return [logp[i - 1, t].item() for i, t in enumerate(ids) if i > 0]
    return run


def export_variant(name: str, out: Path, seed: int = 0):
    """(model directory, reference model) for a named variant or served combination."""
    from plasticity_training.causal_bank_export import export_causal_bank

    model = reference_model({**VARIANTS, **SERVED_SWEEP}[name], seed=seed)
    return export_causal_bank(model, out), model
