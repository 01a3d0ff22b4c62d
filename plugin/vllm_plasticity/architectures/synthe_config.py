"""SYNTHE as the project serves it: fields, defaults, what is refused, the probe's gating modes, and the shape
(stream width, per-request state). Standard library only.

config.json holds `"synthe": {field: value}`; fields not given take DEFAULTS, which are the reference's
`SyntheConfig` defaults (github kaelvalen/synthe, b7f4305) plus the project's own four:

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
  memory_hub              true (default): the hub's output is added to the stream after the blocks, as in the
                          reference. false: it is not (its weights and state stay, unused): with the
                          reference's design the hub's LayerNorm output is ~96% of the stream's norm at the
                          reference's initialisation, and the blocks' signal hardly reaches the head; a model
                          trained from scratch learns the memory tasks only without it (research/results/
                          synthe_memory.md, with PyTorch's initialisation and min_depth >= n_blocks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

from vllm_plasticity.architectures.config_fields import (
    MAX_COUNT, MAX_LENGTH, MAX_WIDTH, Flag, Int, OneOf, Real, UnsupportedConfig, check_fields, check_vocab_size)

DEFAULTS: dict[str, object] = {
    "d_model": 512, "n_blocks": 8, "state_dim": 128, "wiener_state_dim": 64, "n_heads": 8, "ffn_expand": 2.67,
    "tier1_dim": 256, "tier2_dim": 128, "tier3_dim": 64, "tier2_interval": 16, "tier3_interval": 128,
    "router_hidden": 64, "min_depth": 2, "exit_threshold": 0.5, "probe_threshold": 0.35, "probe_window": 256,
    "dropout": 0.0, "max_seq_len": 2048, "tie_embeddings": True,
    "probe_gate": "causal", "probe_confidence_decay": 0.9375, "hub_buffer": 32, "memory_hub": True,
}
PROBE_GATES = ("causal", "always", "never")
MAX_WIENER_STATE = 96  # the reference caps the Kalman state per head here (WienerCore.max_state_dim)
# Every field's type and valid range (config_fields.py); the relational rules are in SyntheShape.from_fields.
FIELDS = {
    "d_model": Int(1, MAX_WIDTH), "n_blocks": Int(1, MAX_COUNT), "state_dim": Int(1, MAX_WIDTH),
    "wiener_state_dim": Int(1, MAX_WIDTH), "n_heads": Int(1, MAX_COUNT), "ffn_expand": Real(0, 64, open_lo=True),
    "tier1_dim": Int(1, MAX_WIDTH), "tier2_dim": Int(1, MAX_WIDTH), "tier3_dim": Int(1, MAX_WIDTH),
    "tier2_interval": Int(1, MAX_LENGTH), "tier3_interval": Int(1, MAX_LENGTH), "router_hidden": Int(1, MAX_WIDTH),
    "min_depth": Int(0, MAX_COUNT),
    # Thresholds on a confidence in (0, 1]: beyond it, the gate is always or never (any finite value means something).
    "exit_threshold": Real(-1e6, 1e6), "probe_threshold": Real(-1e6, 1e6),
    "probe_window": Int(1, MAX_LENGTH), "dropout": Real(0, 1, open_hi=True), "max_seq_len": Int(1, MAX_LENGTH),
    "tie_embeddings": Flag(), "probe_gate": OneOf(PROBE_GATES, "is not a probe gating mode"),
    "probe_confidence_decay": Real(0, 1, open_hi=True), "hub_buffer": Int(1, MAX_LENGTH), "memory_hub": Flag(),
}
# Fields the reference keeps that change nothing at inference: state_dim (its layers size their state from
# d_model / n_heads) and exit_threshold (the router's exit mask is never used): accepted, recorded, unused.


@dataclasses.dataclass(frozen=True)
class SyntheShape:
    MODULES: ClassVar[str] = "vllm_plasticity.architectures.synthe_modules:SyntheModules"  # its builder (footprint.py)

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
        check_fields("synthe", fields, FIELDS)
        check_vocab_size("synthe", vocab_size)
        f = {**DEFAULTS, **dict(fields)}
        d, heads = f["d_model"], f["n_heads"]
        if d % heads:
            raise UnsupportedConfig(f"synthe.d_model={d} must be a multiple of synthe.n_heads={heads}")
        if f["dropout"] != 0.0:
            raise UnsupportedConfig(f"synthe.dropout={f['dropout']} is not supported (needs 0.0): the served "
                                    "model is the inference-time model, and the trainer's forward is the same")
        hidden = ((int(d * f["ffn_expand"]) + 63) // 64) * 64  # the reference rounds up to 64
        if hidden < 1:
            raise UnsupportedConfig(f"synthe.ffn_expand={f['ffn_expand']} gives no feed-forward width: "
                                    f"d_model * ffn_expand = {d * f['ffn_expand']:g} must be >= 1")
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
