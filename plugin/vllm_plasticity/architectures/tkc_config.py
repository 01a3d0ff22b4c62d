"""Transformer Killer Core (`mamba_dualmem` controller) as the project serves it: fields, defaults, what is
refused, and the shape (stream width, per-request state). Standard library only.

config.json holds `"tkc": {field: value}`; fields not given take DEFAULTS (the seed document's defaults:
`ControllerConfig` and `DualTierMirasConfig` in ../shared/seeds/003).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

from vllm_plasticity.architectures.config_fields import (
    MAX_COUNT, MAX_LENGTH, MAX_WIDTH, Flag, Int, OneOf, Real, UnsupportedConfig, check_fields, check_vocab_size)

DEFAULTS: dict[str, object] = {
    "d_model": 128, "n_layers": 2, "max_seq_len": 256, "backbone": "gru",
    "mem_slots": 64, "temperature": 1.0, "surprise_threshold": 0.5, "use_ema": False, "ema_decay": 0.99,
    "lr_fast": 1.0, "lr_deep": 0.5,
    # The Mamba2 backbone's own settings (mamba_ssm's Mamba2 defaults; one group), read only when
    # backbone is "mamba2".
    "mamba_d_state": 128, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_headdim": 64, "mamba_chunk_size": 256,
}
# "mamba2" is the seed's backbone (served by vLLM's own MambaMixer2); "gru" its documented fallback.
BACKBONES = ("gru", "mamba2")
STATS = 6  # per-request scalars: fast pointer, deep pointer, tokens seen, surprise mean, surprise var, deep writes
# Every field's type and valid range (config_fields.py); the relational rules are in TKCShape.from_fields.
FIELDS = {
    "d_model": Int(2, MAX_WIDTH), "n_layers": Int(1, MAX_COUNT), "max_seq_len": Int(1, MAX_LENGTH),
    "backbone": OneOf(BACKBONES), "mem_slots": Int(1, MAX_WIDTH), "temperature": Real(0, 1e6, open_lo=True),
    "surprise_threshold": Real(-1e6, 1e6),  # surprise is 1 - a cosine, in [0, 2]: below 0 every token writes
    "use_ema": Flag(), "ema_decay": Real(0, 1, open_hi=True), "lr_fast": Real(0, 1000), "lr_deep": Real(0, 1000),
    "mamba_d_state": Int(1, MAX_WIDTH), "mamba_d_conv": Int(2, 256), "mamba_expand": Int(1, 64),
    "mamba_headdim": Int(1, MAX_WIDTH), "mamba_chunk_size": Int(1, MAX_LENGTH),
}


@dataclasses.dataclass(frozen=True)
class TKCShape:
    MODULES: ClassVar[str] = "vllm_plasticity.architectures.tkc_modules:TKCModules"  # its builder (footprint.py)

    vocab_size: int
    d_model: int
    n_layers: int
    mem_slots: int
    max_seq_len: int
    fields: dict

    @classmethod
    def from_fields(cls, fields: Mapping[str, object], vocab_size: int) -> "TKCShape":
        unknown = sorted(set(fields) - set(DEFAULTS))
        if unknown:
            raise UnsupportedConfig(f"tkc.{unknown[0]} is not a TKC field (fields: {sorted(DEFAULTS)})")
        check_fields("tkc", fields, FIELDS)
        check_vocab_size("tkc", vocab_size)
        f = {**DEFAULTS, **dict(fields)}
        inner = f["mamba_expand"] * f["d_model"]
        if f["backbone"] == "mamba2" and inner % f["mamba_headdim"]:
            raise UnsupportedConfig(f"tkc.mamba_headdim={f['mamba_headdim']} must divide mamba_expand * d_model "
                                    f"= {inner} (the Mamba2 heads)")
        if f["d_model"] % 2:
            raise UnsupportedConfig(f"tkc.d_model={f['d_model']} must be even (sinusoidal positions)")
        return cls(vocab_size=int(vocab_size), d_model=int(f["d_model"]), n_layers=int(f["n_layers"]),
                   mem_slots=int(f["mem_slots"]), max_seq_len=int(f["max_seq_len"]), fields=f)

    @property
    def hidden_size(self) -> int:
        """The stream: the fused backbone + memory vector the head reads (readout and steering, layer 0)."""
        return self.d_model

    @property
    def backbone(self) -> str:
        return str(self.fields["backbone"])

    @property
    def mamba_inner(self) -> int:
        return int(self.fields["mamba_expand"]) * self.d_model

    @property
    def mamba_heads(self) -> int:
        return self.mamba_inner // int(self.fields["mamba_headdim"])

    @property
    def mamba_conv_dim(self) -> int:
        """Channels of the Mamba2 convolution: x, B and C (one group)."""
        return self.mamba_inner + 2 * int(self.fields["mamba_d_state"])

    def state_shapes(self) -> list[tuple[int, ...]]:
        """Per request, fixed-size: the backbone's, then the memory's."""
        return self.backbone_state_shapes() + self.memory_state_shapes()

    def backbone_state_shapes(self) -> list[tuple[int, ...]]:
        """GRU: every layer's hidden state. Mamba2, per layer: the convolution's last d_conv - 1 inputs
        (channels first) and the SSM state (heads, headdim, d_state), vLLM's MambaMixer2 layout."""
        if self.backbone == "gru":
            return [(self.n_layers, self.d_model)]
        f = self.fields
        per_layer = [(self.mamba_conv_dim, int(f["mamba_d_conv"]) - 1),
                     (self.mamba_heads, int(f["mamba_headdim"]), int(f["mamba_d_state"]))]
        return per_layer * self.n_layers

    def memory_state_shapes(self) -> list[tuple[int, ...]]:
        """DualTierMiras: fast keys/values, deep keys/values, slot strengths (fast, deep), the STATS scalars."""
        d, M = self.d_model, self.mem_slots
        return [(M, d), (M, d), (M, d), (M, d), (2, M), (STATS,)]
