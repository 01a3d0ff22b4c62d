"""The built-in causal-bank model: a byte-level decepticons-style causal bank trained here, on the project's
own text, with the project's form of the architecture (no download, no reference package needed).

Runs in the CLI process (`plasticity default-model --arch causal-bank`) and in tests.

    >>> path = default_model_path(CausalBankSpec())                      # built once (~1 min on 2 cores), cached
    >>> raw = build_model(CausalBankSpec(train_steps=0), "/tmp/cb")      # random init, for parity tests

The substrate is built the way the reference builds its default one: modes with half-lives spaced
log-uniformly from 1.5 to 512 tokens (decay = 0.5 ** (1 / half_life)) and a Gaussian input projection
scaled by 1/sqrt(embedding_dim), both frozen; the readouts and embeddings train. Same spec, same text,
same machine: same bytes (fixed seeds and thread count, deterministic algorithms).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from plasticity_training.default_byte_model import ByteModelSpec


@dataclasses.dataclass(frozen=True)
class CausalBankSpec(ByteModelSpec):
    """Everything that determines the built model; saved beside it as `plasticity_spec.json`."""

    architecture: ClassVar[str] = "CausalBankForCausalLM"
    name: ClassVar[str] = "causal-bank"
    summary: ClassVar[str] = "a byte-level decepticons causal bank"

    embedding_dim: int = 32
    linear_modes: int = 256
    linear_hidden: tuple[int, ...] = (256,)
    local_window: int = 8
    local_hidden: tuple[int, ...] = (128,)
    max_seq_len: int = 512
    half_life_min: float = 1.5
    half_life_max: float = 512.0
    train_steps: int = 300  # 0 = random init (fast, for parity tests)
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0

    def fields(self) -> dict:
        """The `causal_bank` fields of config.json (the reference's names; the rest take its defaults)."""
        return {"embedding_dim": self.embedding_dim, "linear_modes": self.linear_modes,
                "linear_hidden": list(self.linear_hidden), "local_window": self.local_window,
                "local_hidden": list(self.local_hidden), "max_seq_len": self.max_seq_len,
                "linear_half_life_min": self.half_life_min, "linear_half_life_max": self.half_life_max,
                "substrate_mode": "frozen", "linear_readout_kind": "mlp", "mix_mode": "additive",
                "local_scale": 0.25}

    def initialise(self, model) -> None:
        """The frozen substrate: log-spaced half-lives and a scaled Gaussian input projection."""
        import torch

        g = torch.Generator().manual_seed(self.seed)
        half_lives = torch.logspace(math.log10(self.half_life_min), math.log10(self.half_life_max), self.linear_modes)
        with torch.no_grad():
            model.linear_decays.copy_(0.5 ** (1.0 / half_lives))
            model.linear_in_proj.copy_(torch.randn(self.embedding_dim, self.linear_modes, generator=g)
                                       / math.sqrt(self.embedding_dim))
