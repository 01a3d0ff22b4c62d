"""Transformer Killer Core's `mamba_dualmem` controller, written from the seed's description (not its code):

    ids -> embedding + sinusoidal position -> backbone layers (residual: h + mixer(LayerNorm(h)), the mixer
           a GRU or a Mamba2 mixer, `backbone`)
        -> DualTierMiras read (query = the backbone output) -> gated fusion -> LayerNorm -> head -> logits
        -> DualTierMiras write (key, value from the backbone output), for the next tokens

DualTierMiras, per request and fixed-size: a fast tier and a deep tier, each `mem_slots` key/value slots
with strengths. A read is a softmax over the used slots of cosine(query, key) / temperature, per tier;
the tiers blend with w_fast = sigmoid(mix_logit + context_gate(h)). Every token writes the fast tier at its
ring pointer (value scaled by lr_fast); the deep tier is written (value scaled by lr_deep, its own ring
pointer) only when the token is surprising: surprise = 1 - cosine(what the memory read, the token's value),
a deep write iff surprise > surprise_threshold. With use_ema a write into a used slot blends
(ema_decay * old + (1 - ema_decay) * new) instead of overwriting. Writes are tensor ops on every row
(masked by the surprise gate): no per-request Python branch. Running surprise mean and variance and the
deep-write count are kept per request (diagnostics).

Both forms call `stream` (per token: the fused vector the head reads, and the new state) and `logits`;
the served Mamba2 form runs the backbone in vLLM's own MambaMixer2 layers and `memory_stream` in a state
layer of its own (tkc_vllm.py). The memory is sequential by design (each token reads what earlier tokens
wrote), so `memory_stream` loops over the tokens of a chunk for the reads and writes alone (the
projections and the fusion run on the whole chunk); the backbone runs the chunk at once (nn.GRU
from the saved hidden state, or the Mamba2 scan from the saved convolution and SSM states). Decode is one
step: its cost does not grow with the context. Torch (and transformers' Mamba2 scan) only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vllm_plasticity.architectures.mamba2_form import Mamba2Form
from vllm_plasticity.architectures.tkc_config import TKCShape

_UNUSED = -1e9  # the similarity of an empty slot: no weight once any slot is used (empty slots hold zeros)


class GRUBlock(nn.Module):
    """One backbone layer: h + GRU(LayerNorm(h)), the GRU carrying its hidden state across tokens."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.gru = nn.GRU(d, d, batch_first=True)


class Mamba2Block(nn.Module):
    """One backbone layer: h + Mamba2(LayerNorm(h)); the served model swaps `mixer` for vLLM's MambaMixer2."""

    def __init__(self, shape: TKCShape) -> None:
        super().__init__()
        f = shape.fields
        self.norm = nn.LayerNorm(shape.d_model)
        self.mixer = Mamba2Form(shape.d_model, shape.mamba_inner, shape.mamba_heads, int(f["mamba_headdim"]),
                                int(f["mamba_d_state"]), int(f["mamba_d_conv"]), int(f["mamba_chunk_size"]))


def sinusoid(positions: torch.Tensor, d: int) -> torch.Tensor:
    """(R, T) absolute positions -> (R, T, d): sines of d/2 frequencies, then their cosines."""
    freqs = torch.exp(torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / d))
    angles = positions.float()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TKCModules:
    """Mixed into an nn.Module: `build(shape)` adds the modules; `stream` and `logits` run them."""

    tkc: TKCShape
    frozen_parameters: frozenset[str] = frozenset()

    def build(self, shape: TKCShape) -> None:
        d, V = shape.d_model, shape.vocab_size
        self.tkc = shape
        self.embed = nn.Embedding(V, d)
        self.backbone = nn.ModuleList((GRUBlock(d) if shape.backbone == "gru" else Mamba2Block(shape))
                                      for _ in range(shape.n_layers))
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.mix_logit = nn.Parameter(torch.zeros(1))
        self.context_gate = nn.Linear(d, 1)
        self.fusion_gate, self.fusion_out = nn.Linear(2 * d, d), nn.Linear(d, d)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, V)

    def zero_states(self, rows: int, device: torch.device) -> list[torch.Tensor]:
        return [torch.zeros(rows, *s, device=device) for s in self.tkc.state_shapes()]

    def memory_zero_states(self, rows: int, device: torch.device) -> list[torch.Tensor]:
        return [torch.zeros(rows, *s, device=device) for s in self.tkc.memory_state_shapes()]

    # ---- per token, with state ------------------------------------------------------------------------
    def stream(self, ids: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """ids (R, T) continuing from `states` (fp32, as state_shapes) -> the fused stream (R, T, d) in the
        weights' dtype and the states after the last token. Inputs are never modified in place."""
        split = len(self.tkc.backbone_state_shapes())
        backbone, memory = states[:split], list(states[split:])
        T = ids.shape[1]
        positions = memory[-1][:, 2:3] + torch.arange(T, device=ids.device)[None]  # (R, T): tokens seen before
        x = self.embed(ids)
        x = x + sinusoid(positions, self.tkc.d_model).to(x.dtype)
        x, backbone = self.backbone_stream(x, backbone)
        fused, memory = self.memory_stream(x, memory)
        return fused, [*backbone, *memory]

    def backbone_stream(self, x: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The residual backbone layers over a chunk x (R, T, d), from and to the backbone's states."""
        new = []
        if self.tkc.backbone == "gru":
            hidden = states[0]
            for layer, block in enumerate(self.backbone):
                y, h_n = block.gru(block.norm(x), hidden[:, layer][None].to(x.dtype).contiguous())
                x = x + y
                new.append(h_n[0].float())
            return x, [torch.stack(new, dim=1)]
        for layer, block in enumerate(self.backbone):
            y, conv, ssm = block.mixer.scan(block.norm(x), states[2 * layer], states[2 * layer + 1])
            x = x + y
            new += [conv, ssm]
        return x, new

    def memory_stream(self, h: torch.Tensor, memory: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """DualTierMiras over a chunk of backbone outputs h (R, T, d) -> the fused stream. What a token computes
        from its own backbone output (query, key, value, tier blend, the fusion with what it read) runs for the
        whole chunk at once; only the reads and writes, which depend on earlier tokens' writes, run token by
        token (a per-token loop of eager ops is the cost of a prefill: research/results/bench_architectures.md)."""
        q = F.normalize(self.query(h).float(), dim=-1)  # (R, T, d)
        key, value = self.key(h).float(), self.value(h).float()
        w_fast = torch.sigmoid(self.mix_logit + self.context_gate(h)).float()  # (R, T, 1)
        slots = torch.arange(self.tkc.mem_slots, device=h.device, dtype=torch.float32)  # pointers are fp32 state
        reads = []
        for t in range(h.shape[1]):
            v, memory = self.memory_update(q[:, t], key[:, t], value[:, t], w_fast[:, t], memory, slots)
            reads.append(v)
        v = torch.stack(reads, dim=1).to(h.dtype)  # (R, T, d): what each token read
        return h + torch.sigmoid(self.fusion_gate(torch.cat([h, v], dim=-1))) * self.fusion_out(v), memory

    def memory_update(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, w_fast: torch.Tensor,
                      memory: list[torch.Tensor], slots: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One token (each (R, ...)): read both tiers with the unit query q, blend them by w_fast, then write
        key and value. -> what it read (R, d) and the memory after its writes."""
        f = self.tkc.fields
        fast_k, fast_v, deep_k, deep_v, strength, stats = memory

        def read(keys: torch.Tensor, values: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
            # (Batched products as bmm: an einsum here costs a permute, a copy and a clone per token.)
            sim = torch.bmm(F.normalize(keys, dim=-1), q[:, :, None])[..., 0] / float(f["temperature"])
            weights = torch.softmax(sim.masked_fill(~used, _UNUSED), dim=-1)  # (R, M)
            return torch.bmm(weights[:, None], values)[:, 0]

        v = w_fast * read(fast_k, fast_v, strength[:, 0] > 0) + (1 - w_fast) * read(deep_k, deep_v, strength[:, 1] > 0)
        surprise = 1.0 - F.cosine_similarity(v, value, dim=-1, eps=1e-8)  # (R,): 1 when the memory is empty
        deep = (surprise > float(f["surprise_threshold"])).float()  # (R,): the write gate, no branch
        M = self.tkc.mem_slots
        ema = float(f["ema_decay"]) if f["use_ema"] else 0.0

        def write(keys, values, tier, gate, scale):
            pointer = stats[:, tier]
            # (R, M): the slot written, or none. A comparison, not F.one_hot: on CPU one_hot reads the
            # pointers' range on the host, which the served step must not do (recurrent_layer.py).
            slot = (slots == pointer[:, None]).float()  # whole numbers in fp32: exact
            if gate is not None:
                slot = slot * gate[:, None]
            used = strength[:, tier]
            step = (slot * (1 - ema * (used > 0).float()) if ema else slot)[..., None]  # overwrite, or blend
            keys = keys + step * (key[:, None] - keys)
            values = values + step * (scale * value[:, None] - values)
            advanced = pointer + 1 if gate is None else pointer + gate
            return keys, values, torch.maximum(used, slot), torch.remainder(advanced, M)

        fast_k, fast_v, fast_used, fast_ptr = write(fast_k, fast_v, 0, None, float(f["lr_fast"]))  # every token
        deep_k, deep_v, deep_used, deep_ptr = write(deep_k, deep_v, 1, deep, float(f["lr_deep"]))
        seen = stats[:, 2] + 1
        s = surprise.detach()
        delta = s - stats[:, 3]
        mean = stats[:, 3] + delta / seen
        var = stats[:, 4] + (delta * (s - mean) - stats[:, 4]) / seen
        stats = torch.stack([fast_ptr, deep_ptr, seen, mean, var, stats[:, 5] + deep], dim=1)
        return v, [fast_k, fast_v, deep_k, deep_v, torch.stack([fast_used, deep_used], dim=1), stats]

    # ---- per token, stateless --------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden))
