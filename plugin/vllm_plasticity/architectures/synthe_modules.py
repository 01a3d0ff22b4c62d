"""SYNTHE (github kaelvalen/synthe b7f4305, MIT), written from the reference's maths, not its code:

    ids -> embedding + pos_embedding(position % max_seq_len) -> LayerNorm
        -> blocks: x += Jordan(x); x += Hopfield(x); x += Wiener(x); x += FFN(LayerNorm(x));
                   x += gate * Probe(x);  from block min_depth on, x *= sigmoid(router(block input))
        -> x += hub(x)                         (the stream: readout and steering read and write it here)
        -> out_norm -> lm_head (tied to the embedding unless tie_embeddings is false) -> logits

The depth router never exits early (neither does the reference at inference): it scales each token's block
output by its budget, one shared estimator for all blocks. The reference's exploration noise in its training
mode is not applied: the trainer's forward is the served model's. The probe's gate is `probe_gate`
(synthe_config.py): never, always, or causal (per token, from the block's running Kalman confidence).

Both forms call `stream` (per token: the stream and the new state) and `logits`. Per-request state is
fixed-size (synthe_config.SyntheShape.state_shapes); decode is one step per token: its cost is bounded by
the probe's window, never the context. Torch only.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_plasticity.architectures.synthe_config import SyntheShape
from vllm_plasticity.architectures.synthe_hub import UNUSED_REFERENCE_MODULES, TemporalMemoryHub
from vllm_plasticity.architectures.synthe_layers import AttentionProbe, FeedForward, HopfieldCore, JordanLayer, WienerCore


class SyntheBlock(nn.Module):
    def __init__(self, shape: SyntheShape) -> None:
        super().__init__()
        d, h = shape.d_model, shape.n_heads
        self.jordan, self.hopfield = JordanLayer(d, h), HopfieldCore(d, h)
        self.wiener = WienerCore(d, h, shape.wiener_dim)
        self.probe = AttentionProbe(d, h, shape.window)
        self.ffn, self.ffn_norm = FeedForward(d, shape.ffn_hidden), nn.LayerNorm(d)


class DepthRouter(nn.Module):
    """The per-token compute budget sigmoid(MLP(x)) (the reference's `estimator`)."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.estimator = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.estimator(x))


class SyntheModules:
    """Mixed into an nn.Module: `build(shape)` adds the modules; `stream` and `logits` run them."""

    synthe: SyntheShape
    frozen_parameters: frozenset[str] = frozenset()
    # In reference checkpoints, never used by its outputs (and lm_head.weight, the embedding when tied).
    skipped_weights: tuple[str, ...] = (*UNUSED_REFERENCE_MODULES, "router.confidence_fuser.")

    def build(self, shape: SyntheShape) -> None:
        f, d = shape.fields, shape.d_model
        self.synthe = shape
        self.embedding = nn.Embedding(shape.vocab_size, d)
        self.pos_embedding = nn.Embedding(shape.max_seq_len, d)
        self.embed_norm = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(SyntheBlock(shape) for _ in range(shape.n_blocks))
        self.memory_hub = TemporalMemoryHub(d, int(f["tier1_dim"]), int(f["tier2_dim"]), int(f["tier3_dim"]),
                                            int(f["tier2_interval"]), int(f["tier3_interval"]))
        self.router = DepthRouter(d, int(f["router_hidden"]))
        self.out_norm = nn.LayerNorm(d)
        if not f["tie_embeddings"]:
            self.lm_head = nn.Linear(d, shape.vocab_size, bias=False)
        else:
            self.skipped_weights = (*self.skipped_weights, "lm_head.weight")

    def reference_init(self) -> None:
        """The reference's initial weights as they end up: its model-wide pass (every Linear and Embedding
        N(0, 0.02), biases 0) runs after, and so replaces, its layers' own initialisations. LayerNorms 1, 0."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def zero_states(self, rows: int, device: torch.device) -> list[torch.Tensor]:
        """A fresh request's state: zeros, except the Kalman variances (5) and the hub's tier-3 variance (1)."""
        states = [torch.zeros(rows, *s, device=device) for s in self.synthe.state_shapes()]
        states[2][..., 1] = WienerCore.INITIAL_VARIANCE
        states[5] = self.memory_hub.initial_tiers(rows, device)
        return states

    # ---- per token, with state ------------------------------------------------------------------------
    def stream(self, ids: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """ids (R, T) continuing from `states` (fp32, as state_shapes) -> the stream (R, T, d) in the weights'
        dtype and the states after the last token. Inputs are never modified in place."""
        shape, f = self.synthe, self.synthe.fields
        jordan, hopfield, wiener, probe, confidence, tiers, ring, seen = states
        start = seen[:, 0].long()  # (R,) tokens before this chunk = the first one's position
        positions = start[:, None] + torch.arange(ids.shape[1], device=ids.device)
        x = self.embed_norm(self.embedding(ids) + self.pos_embedding(torch.remainder(positions, shape.max_seq_len)))
        new = [[], [], [], [], []]
        for i, block in enumerate(self.blocks):
            budget = self.router(x) if i >= int(f["min_depth"]) else None  # from the block's input
            out, Sj = block.jordan.scan(x, jordan[:, i])
            x = x + out
            out, Sh, _surprise = block.hopfield.scan(x, hopfield[:, i])
            x = x + out
            out, Sw, ior = block.wiener.scan(x, wiener[:, i])
            x = x + out
            x = x + block.ffn(block.ffn_norm(x))
            gate, running = self.probe_gate(ior, confidence[:, i])
            if gate is None:
                kv = probe[:, i]
            else:
                out, kv = block.probe.scan(x, probe[:, i], start)
                x = x + gate[..., None].to(x.dtype) * out
            if budget is not None:
                x = x * budget
            for bucket, value in zip(new, (Sj, Sh, Sw, kv, running)):
                bucket.append(value)
        hub, tiers, ring = self.memory_hub.scan(x, tiers, ring, seen[:, 0])
        return x + hub, [*(torch.stack(b, 1) for b in new), tiers, ring, seen + ids.shape[1]]

    def probe_gate(self, ior: torch.Tensor, running: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Per token, whether the probe's output is added (None: never), and the running IOR state after the
        chunk ([weighted sum, weight] of a bias-corrected moving average, updated in every mode)."""
        f = self.synthe.fields
        rho = float(f["probe_confidence_decay"])
        total, weight = running[:, 0], running[:, 1]
        confidence = []
        for t in range(ior.shape[1]):
            total, weight = rho * total + ior[:, t].detach(), rho * weight + 1.0
            confidence.append(torch.exp(-total / weight))
        new = torch.stack([total, weight], dim=1)
        mode = f["probe_gate"]
        if mode == "never":
            return None, new
        if mode == "always":
            return torch.ones_like(ior), new
        return (torch.stack(confidence, 1) < float(f["probe_threshold"])).float(), new

    # ---- per token, stateless --------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embedding.weight if self.synthe.fields["tie_embeddings"] else self.lm_head.weight
        return nn.functional.linear(self.out_norm(hidden), weight)

