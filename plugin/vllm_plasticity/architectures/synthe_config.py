"""SYNTHE as the project serves it: fields, defaults, what is refused, the probe's gating modes, and the shape
(stream width, per-request state). Standard library only.

config.json holds `"synthe": {field: value}`; fields not given take DEFAULTS, which are the reference's
`SyntheConfig` defaults (github kaelvalen/synthe, b7f4305) plus the project's own three:

  probe_gate              "causal" (default), "always" or "never": when the attention probe adds its output.
                          never: the probe is off (the reference with the probe zeroed).
                          always: every token (the reference with `always_on=True`).
                          causal: per token, when exp(-running IOR) < probe_threshold, where the running IOR
                          is a bias-corrected moving average (decay probe_confidence_decay) of the block's
                          Kalman innovation-to-observation ratio over this token and the ones before it. A
                          deviation from the reference, whose gate is decided once per forward call from the
                          last quarter of that call's tokens, so its output depends on how the text is split
                          into calls: not reproducible under continuous batching and chunked prefill.
  probe_confidence_decay  the moving average's decay (0.9375: a 16-token memory, the reference's last
                          quarter of a 64-token call).
  hub_buffer              the memory hub's consolidation ring (the reference's hard-coded 32 tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

DEFAULTS: dict[str, object] = {
    "d_model": 512, "n_blocks": 8, "state_dim": 128, "wiener_state_dim": 64, "n_heads": 8, "ffn_expand": 2.67,
    "tier1_dim": 256, "tier2_dim": 128, "tier3_dim": 64, "tier2_interval": 16, "tier3_interval": 128,
    "router_hidden": 64, "min_depth": 2, "exit_threshold": 0.5, "probe_threshold": 0.35, "probe_window": 256,
    "dropout": 0.0, "max_seq_len": 2048, "tie_embeddings": True,
    "probe_gate": "causal", "probe_confidence_decay": 0.9375, "hub_buffer": 32,
}
PROBE_GATES = ("causal", "always", "never")
MAX_WIENER_STATE = 96  # the reference caps the Kalman state per head here (WienerCore.max_state_dim)
# Fields the reference keeps that change nothing at inference: state_dim (its layers size their state from
# d_model / n_heads) and exit_threshold (the router's exit mask is never used): accepted, recorded, unused.


class UnsupportedConfig(ValueError):
    """A SYNTHE configuration the project cannot serve; the message names the field and why."""


@dataclasses.dataclass(frozen=True)
class SyntheShape:
    vocab_size: int
    d_model: int
    n_blocks: int
    n_heads: int
    wiener_dim: int
    ffn_hidden: int
    window: int
    max_seq_len: int
    fields: dict

    @classmethod
    def from_fields(cls, fields: Mapping[str, object], vocab_size: int) -> "SyntheShape":
        unknown = sorted(set(fields) - set(DEFAULTS))
        if unknown:
            raise UnsupportedConfig(f"synthe.{unknown[0]} is not a SYNTHE field (fields: {sorted(DEFAULTS)})")
        f = {**DEFAULTS, **dict(fields)}
        d, heads = int(f["d_model"]), int(f["n_heads"])
        if f["probe_gate"] not in PROBE_GATES:
            raise UnsupportedConfig(f"synthe.probe_gate={f['probe_gate']!r} is not a probe gating mode "
                                    f"(needs one of {PROBE_GATES})")
        if heads < 1 or d % heads:
            raise UnsupportedConfig(f"synthe.d_model={d} must be a multiple of synthe.n_heads={heads}")
        if float(f["dropout"]) != 0.0:
            raise UnsupportedConfig(f"synthe.dropout={f['dropout']} is not supported (needs 0.0): the served "
                                    "model is the inference-time model, and the trainer's forward is the same")
        if not 0.0 <= float(f["probe_confidence_decay"]) < 1.0:
            raise UnsupportedConfig(f"synthe.probe_confidence_decay={f['probe_confidence_decay']} must be in [0, 1)")
        for name in ("n_blocks", "probe_window", "tier2_interval", "tier3_interval", "hub_buffer", "max_seq_len",
                     "tier1_dim", "tier2_dim", "tier3_dim", "router_hidden", "wiener_state_dim"):
            if int(f[name]) < 1:
                raise UnsupportedConfig(f"synthe.{name}={f[name]} must be >= 1")
        hidden = ((int(d * float(f["ffn_expand"])) + 63) // 64) * 64  # the reference rounds up to 64
        return cls(vocab_size=int(vocab_size), d_model=d, n_blocks=int(f["n_blocks"]), n_heads=heads,
                   wiener_dim=min(int(f["wiener_state_dim"]), MAX_WIENER_STATE), ffn_hidden=hidden,
                   window=int(f["probe_window"]), max_seq_len=int(f["max_seq_len"]), fields=f)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_size(self) -> int:
        """The stream: the residual after the last block plus the memory hub's output, what the head's
        LayerNorm reads (readout and steering, layer 0)."""
        return self.d_model

    @property
    def hub_width(self) -> int:
        f = self.fields
        return int(f["tier1_dim"]) + int(f["tier2_dim"]) + 2 * int(f["tier3_dim"])

    def block_state_shapes(self) -> list[tuple[int, ...]]:
        """One block's recurrent state: the Jordan and Hopfield matrices, the Kalman mean and variance, the
        running IOR (weighted sum, weight)."""
        h, hd = self.n_heads, self.head_dim
        return [(h, hd, hd), (h, hd, hd), (h, self.wiener_dim, 2), (2,)]

    def hub_state_shapes(self) -> list[tuple[int, ...]]:
        """The hub's tiers [tier1 | tier2 | tier3 | tier3 variance] and its consolidation ring."""
        return [(self.hub_width,), (int(self.fields["hub_buffer"]), self.d_model)]

    def state_shapes(self) -> list[tuple[int, ...]]:
        """The full-sequence form's state, per request, fixed-size, in this order: each block's state stacked
        (block_state_shapes), the probes' windows of keys and values (ring, slot = position % window), the
        hub's (hub_state_shapes), tokens seen. The served form keeps the same per block and for the hub in
        vLLM's state slots, and the probes' keys and values in vLLM's paged KV cache."""
        n = self.n_blocks
        jordan, hopfield, wiener, running = self.block_state_shapes()
        return [(n, *jordan), (n, *hopfield), (n, *wiener), (n, self.window, 2, self.d_model), (n, *running),
                *self.hub_state_shapes(), (1,)]
