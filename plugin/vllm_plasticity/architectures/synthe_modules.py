"""SYNTHE (github kaelvalen/synthe b7f4305, MIT), written from the reference's maths, not its code:

    ids -> embedding + pos_embedding(position % max_seq_len) -> LayerNorm
        -> blocks: x += Jordan(x); x += Hopfield(x); x += Wiener(x); x += FFN(LayerNorm(x));
                   x += gate * Probe(x);  from block min_depth on, x *= sigmoid(router(block input))
        -> x += hub(x)  (unless memory_hub is false) (the stream: readout and steering read and write it here)
        -> out_norm -> lm_head (tied to the embedding unless tie_embeddings is false) -> logits

The depth router never exits early (neither does the reference at inference): it scales each token's
stream after the block by its budget, one shared estimator for all blocks. The reference's exploration noise in its training
mode is not applied: the trainer's forward is the served model's. The probe's gate is `probe_gate`
(synthe_config.py): never, always, or causal (per token, from the block's running Kalman confidence).

The Hugging Face form runs `stream` (per token: the stream and the new state, the probes' windows kept in
the state); the served form (synthe_vllm.py) runs the same parts (`embed`, `block_recurrence`,
`probe_gate`, the probe's projections, `memory_hub.scan`) around vLLM's attention for the probes. Both end
with `logits`. Per-request state is fixed-size (synthe_config.SyntheShape); decode is one step per token: its
cost is bounded by the probe's window, never the context. Torch only.
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

    def block_zero_states(self, rows: int, device: torch.device) -> list[torch.Tensor]:
        """A fresh request's block state: zeros, except the Kalman variances (WienerCore.INITIAL_VARIANCE)."""
        states = [torch.zeros(rows, *s, device=device) for s in self.synthe.block_state_shapes()]
        states[2][..., 1] = WienerCore.INITIAL_VARIANCE
        return states

    def hub_zero_states(self, rows: int, device: torch.device) -> list[torch.Tensor]:
        """A fresh request's hub: the initial tiers (tier-3 variance 1) and an empty ring."""
        return [self.memory_hub.initial_tiers(rows, device), torch.zeros(rows, *self.synthe.hub_state_shapes()[1],
                                                                          device=device)]

    def zero_states(self, rows: int, device: torch.device) -> list[torch.Tensor]:
        """A fresh request's state in the full-sequence form's layout (SyntheShape.state_shapes)."""
        n, window = self.synthe.n_blocks, torch.zeros(rows, self.synthe.n_blocks, self.synthe.window, 2,
                                                      self.synthe.d_model, device=device)
        jordan, hopfield, wiener, running = (s[:, None].expand(rows, n, *s.shape[1:]).clone()
                                             for s in self.block_zero_states(rows, device))
        return [jordan, hopfield, wiener, window, running, *self.hub_zero_states(rows, device),
                torch.zeros(rows, 1, device=device)]

    # ---- per token, with state ------------------------------------------------------------------------
    def stream(self, ids: torch.Tensor, states: list[torch.Tensor], signals: bool = False
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """ids (R, T) continuing from `states` (fp32, as state_shapes) -> the stream (R, T, d) in the weights'
        dtype and the states after the last token. Inputs are never modified in place. With `signals`, the
        stream is followed by the per-token signals (R, T, d + len(signal_names())) in the same dtype.
        The probes read their window from the state's ring; the served form reads vLLM's paged KV cache."""
        f = self.synthe.fields
        jordan, hopfield, wiener, probe, confidence, tiers, ring, seen = states
        start = seen[:, 0].long()  # (R,) tokens before this chunk = the first one's position
        x = self.embed(ids, start[:, None] + torch.arange(ids.shape[1], device=ids.device))
        new, reported = [[], [], [], [], []], []
        for i, block in enumerate(self.blocks):
            budget = self.router(x) if i >= int(f["min_depth"]) else None  # from the block's input
            x, ior, running_confidence, surprise, (Sj, Sh, Sw, running) = self.block_recurrence(
                i, x, [jordan[:, i], hopfield[:, i], wiener[:, i], confidence[:, i]])
            gate = self.probe_gate(running_confidence)
            if gate is None:
                kv = probe[:, i]
            else:
                out, kv = block.probe.scan(x, probe[:, i], start)
                x = x + gate[..., None].to(x.dtype) * out
            if budget is not None:
                x = x * budget
            for bucket, value in zip(new, (Sj, Sh, Sw, kv, running)):
                bucket.append(value)
            if signals:
                reported += self.block_signals(ior, running_confidence, gate, budget, surprise)
        if f["memory_hub"]:
            hub, tiers, ring = self.memory_hub.scan(x, tiers, ring, seen[:, 0])
            x = x + hub
        if signals:
            x = torch.cat([x, torch.stack(reported, dim=-1).to(x.dtype)], dim=-1)
        return x, [*(torch.stack(b, 1) for b in new), tiers, ring, seen + ids.shape[1]]

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The blocks' input: token + learned position embedding (position % max_seq_len), LayerNorm."""
        where = torch.remainder(positions, self.synthe.max_seq_len)
        return self.embed_norm(self.embedding(ids) + self.pos_embedding(where))

    def block_recurrence(self, i: int, x: torch.Tensor, state: list[torch.Tensor]):
        """Block i up to its probe: x += Jordan, Hopfield, Wiener, FFN. state = block_state_shapes ->
        (x, IOR, running confidence, Hopfield surprise (each (R, T)), the block's new state)."""
        block = self.blocks[i]
        Sj, Sh, Sw, running = state
        out, Sj = block.jordan.scan(x, Sj)
        x = x + out
        out, Sh, surprise = block.hopfield.scan(x, Sh)
        x = x + out
        out, Sw, ior = block.wiener.scan(x, Sw)
        x = x + out
        x = x + block.ffn(block.ffn_norm(x))
        running_confidence, running = self.running_confidence(ior, running)
        return x, ior, running_confidence, surprise, [Sj, Sh, Sw, running]

    @staticmethod
    def block_signals(ior, running_confidence, gate, budget, surprise) -> list[torch.Tensor]:
        """One block's signals per token, in signal_names' order."""
        return [torch.exp(-ior), running_confidence, torch.zeros_like(ior) if gate is None else gate.float(),
                torch.ones_like(ior) if budget is None else budget[..., 0].float(), surprise]

    def signal_names(self) -> list[str]:
        """The per-token signals, per block b: the Kalman confidence exp(-IOR) of this token, the running
        confidence the causal gate reads, the probe gate (1 on, 0 off), the router's budget (1 before
        min_depth), the Hopfield surprise (mean over heads of |v - S k| before the update)."""
        kinds = ("kalman_confidence", "running_confidence", "probe", "router_budget", "hopfield_surprise")
        return [f"{kind}/{b}" for b in range(self.synthe.n_blocks) for kind in kinds]

    def running_confidence(self, ior: torch.Tensor, running: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token, exp(-running IOR), the running IOR a bias-corrected moving average (decay
        probe_confidence_decay) of this token's IOR and the earlier ones'; and the state after the chunk
        ([weighted sum, weight], kept in every mode)."""
        rho = float(self.synthe.fields["probe_confidence_decay"])
        total, weight = running[:, 0], running[:, 1]
        confidence = []
        for t in range(ior.shape[1]):
            total, weight = rho * total + ior[:, t].detach(), rho * weight + 1.0
            confidence.append(torch.exp(-total / weight))
        return torch.stack(confidence, 1), torch.stack([total, weight], dim=1)

    def probe_gate(self, running_confidence: torch.Tensor) -> torch.Tensor | None:
        """Per token, 1 where the probe's output is added, 0 where not (None: mode never, nothing added)."""
        mode = self.synthe.fields["probe_gate"]
        if mode == "never":
            return None
        if mode == "always":
            return torch.ones_like(running_confidence)
        return (running_confidence < float(self.synthe.fields["probe_threshold"])).float()

    def probe_gates(self, ids: torch.Tensor) -> torch.Tensor:
        """(blocks, R, T): each token's probe gate from a fresh state (diagnostics: how often it fires)."""
        out, _ = self.stream(ids, self.zero_states(ids.shape[0], ids.device), signals=True)
        names = self.signal_names()
        columns = [self.synthe.d_model + names.index(f"probe/{b}") for b in range(self.synthe.n_blocks)]
        return out[..., columns].permute(2, 0, 1).float()

    # ---- per token, stateless --------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embedding.weight if self.synthe.fields["tie_embeddings"] else self.lm_head.weight
        return nn.functional.linear(self.out_norm(hidden), weight)

