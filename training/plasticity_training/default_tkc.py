"""The built-in Transformer Killer Core model: a byte-level TKC (GRU or Mamba2 backbone + DualTierMiras
memory) trained here on the project's own text. `plasticity default-model --arch tkc [--backbone mamba2]`.

    >>> path = default_model_path(TKCSpec())                     # built once (about a minute on 2 cores), cached
    >>> raw = build_model(TKCSpec(train_steps=0), "/tmp/tkc")    # random init, for parity tests

Same spec, same text, same machine: same bytes (fixed seeds and thread count, deterministic algorithms).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from plasticity_training.default_byte_model import ByteModelSpec


@dataclasses.dataclass(frozen=True)
class TKCSpec(ByteModelSpec):
    """Everything that determines the built model; saved beside it as `plasticity_spec.json`."""

    architecture: ClassVar[str] = "TKCForCausalLM"
    name: ClassVar[str] = "tkc"
    summary: ClassVar[str] = "a byte-level Transformer Killer Core (GRU backbone + DualTierMiras memory)"
    CLI_OPTIONS: ClassVar[dict] = {
        "backbone": (("gru", "mamba2"), "the backbone (default gru; mamba2 is served by vLLM's MambaMixer2)")}

    d_model: int = 96
    n_layers: int = 2
    backbone: str = "gru"  # or "mamba2" (served by vLLM's MambaMixer2)
    mamba_d_state: int = 32  # Mamba2 settings, used only with backbone "mamba2"
    mamba_headdim: int = 32
    mem_slots: int = 32
    max_seq_len: int = 512
    surprise_threshold: float = 0.5
    train_steps: int = 150  # 0 = random init (fast, for parity tests)
    seq_len: int = 96
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0

    def fields(self) -> dict:
        fields = {"d_model": self.d_model, "n_layers": self.n_layers, "mem_slots": self.mem_slots,
                  "max_seq_len": self.max_seq_len, "surprise_threshold": self.surprise_threshold,
                  "backbone": self.backbone}
        if self.backbone == "mamba2":
            fields |= {"mamba_d_state": self.mamba_d_state, "mamba_headdim": self.mamba_headdim}
        return fields

    def describe(self, tokenizer) -> str:
        return f"{self.backbone} backbone, byte vocabulary, {self.mem_slots} memory slots per tier"
