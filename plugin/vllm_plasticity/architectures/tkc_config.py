"""Transformer Killer Core (`mamba_dualmem` controller) as the project serves it: fields, defaults, what is
refused, and the shape (stream width, per-request state). Standard library only.

config.json holds `"tkc": {field: value}`; fields not given take DEFAULTS (the seed document's defaults:
`ControllerConfig` and `DualTierMirasConfig` in ../shared/seeds/003).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

DEFAULTS: dict[str, object] = {
    "d_model": 128, "n_layers": 2, "max_seq_len": 256, "backbone": "gru",
    "mem_slots": 64, "temperature": 1.0, "surprise_threshold": 0.5, "use_ema": False, "ema_decay": 0.99,
    "lr_fast": 1.0, "lr_deep": 0.5,
}
BACKBONES = ("gru",)  # the seed's documented fallback; "mamba2" (vLLM's MambaMixer2) is not built yet
STATS = 6  # per-request scalars: fast pointer, deep pointer, tokens seen, surprise mean, surprise var, deep writes


class UnsupportedConfig(ValueError):
    """A TKC configuration the project cannot serve; the message names the field and why."""


@dataclasses.dataclass(frozen=True)
class TKCShape:
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
        f = {**DEFAULTS, **dict(fields)}
        if f["backbone"] not in BACKBONES:
            raise UnsupportedConfig(f"tkc.backbone={f['backbone']!r} is not supported (needs one of {BACKBONES}): "
                                    "the Mamba2 backbone is not built yet")
        if int(f["d_model"]) % 2:
            raise UnsupportedConfig(f"tkc.d_model={f['d_model']} must be even (sinusoidal positions)")
        if not 0.0 < float(f["temperature"]):
            raise UnsupportedConfig(f"tkc.temperature={f['temperature']} must be > 0")
        if not 0.0 <= float(f["ema_decay"]) < 1.0:
            raise UnsupportedConfig(f"tkc.ema_decay={f['ema_decay']} must be in [0, 1)")
        if int(f["mem_slots"]) < 1 or int(f["n_layers"]) < 1:
            raise UnsupportedConfig("tkc.mem_slots and tkc.n_layers must be >= 1")
        return cls(vocab_size=int(vocab_size), d_model=int(f["d_model"]), n_layers=int(f["n_layers"]),
                   mem_slots=int(f["mem_slots"]), max_seq_len=int(f["max_seq_len"]), fields=f)

    @property
    def hidden_size(self) -> int:
        """The stream: the fused backbone + memory vector the head reads (readout and steering, layer 0)."""
        return self.d_model

    def state_shapes(self) -> list[tuple[int, ...]]:
        """Per request, fixed-size: backbone hidden states, fast keys/values, deep keys/values, slot
        strengths (fast, deep), and the STATS scalars."""
        d, M = self.d_model, self.mem_slots
        return [(self.n_layers, d), (M, d), (M, d), (M, d), (M, d), (2, M), (STATS,)]
