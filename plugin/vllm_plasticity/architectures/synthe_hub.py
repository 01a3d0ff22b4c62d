"""SYNTHE's temporal memory hub (the reference's TemporalMemoryHub maths, b7f4305), per request and fixed-size.

Per token, with c = the token's position + 1 (tokens seen, counting it):
  bias21 = tanh(broadcast_2to1(tier2)), bias32 = tanh(broadcast_3to2(tier3))            (before any update)
  tier1: GRU-style, from [x | tier1 + bias21]                                            every token
  tier2: tier2 + bias32 moved by sigmoid(beta) toward tier2_value(mean of the ring)      when c % tier2_interval == 0
  tier3: diagonal Kalman step toward tier3_obs(tier2_read(tier2)), variance 0.99 v + 0.01 when c % tier3_interval == 0
  out  = fusion([tier1_read(tier1) | tier2_read(tier2) | tier3_read([tier3 | variance])])
  ring[(c - 1) % hub_buffer] = x (detached, as in the reference); the hub's output is LayerNorm(out).
The interval updates are computed for every row and kept where the row's count says so (torch.where): no
per-request branch. The reference also builds modules whose outputs it never uses (compress_1to2,
compress_2to3, tier2_key, consolidation_gate): they are not built here and their weights are skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

UNUSED_REFERENCE_MODULES = ("memory_hub.compress_1to2.", "memory_hub.compress_2to3.", "memory_hub.tier2_key.",
                            "memory_hub.consolidation_gate.")


class Broadcaster(nn.Module):
    """tanh(Linear(upper)): the reference's `net` Sequential, kept so its weight names load."""

    def __init__(self, upper: int, lower: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(upper, lower), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TemporalMemoryHub(nn.Module):
    TIER3_DECAY, TIER3_NOISE, MIN_OBS_NOISE, EPS = 0.99, 0.01, 0.01, 1e-8  # the reference's constants

    def __init__(self, d: int, t1: int, t2: int, t3: int, interval2: int, interval3: int) -> None:
        super().__init__()
        self.dims, self.interval2, self.interval3 = (t1, t2, t3, t3), interval2, interval3
        self.tier1_gate, self.tier1_candidate = nn.Linear(d + t1, t1), nn.Linear(d + t1, t1)
        self.tier1_read = nn.Linear(t1, d)
        self.tier2_value, self.tier2_beta, self.tier2_read = nn.Linear(d, t2), nn.Linear(d, 1), nn.Linear(t2, d)
        self.tier3_obs, self.tier3_obs_noise, self.tier3_read = nn.Linear(d, t3), nn.Linear(d, t3), nn.Linear(2 * t3, d)
        self.broadcast_3to2, self.broadcast_2to1 = Broadcaster(t3, t2), Broadcaster(t2, t1)
        self.fusion = nn.Linear(3 * d, d)
        self.norm = nn.LayerNorm(d)

    def initial_tiers(self, rows: int, device: torch.device) -> torch.Tensor:
        """[tier1 | tier2 | tier3 | tier3 variance]: zeros, and variance 1."""
        tiers = torch.zeros(rows, sum(self.dims), device=device)
        tiers[:, -self.dims[3]:] = 1.0
        return tiers

    def scan(self, x: torch.Tensor, tiers: torch.Tensor, ring: torch.Tensor, seen: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (R, T, d); tiers (R, hub_width); ring (R, B, d); seen (R,) tokens before the chunk."""
        dtype = x.dtype
        tier1, tier2, tier3, var = tiers.split(self.dims, dim=-1)
        slots = torch.arange(ring.shape[1], device=x.device)
        out = []
        for t in range(x.shape[1]):
            xt = x[:, t]
            c = seen + t + 1  # (R,)
            bias21 = self.broadcast_2to1(tier2.to(dtype)).float()
            bias32 = self.broadcast_3to2(tier3.to(dtype)).float()
            biased1 = tier1 + bias21
            both = torch.cat([xt, biased1.to(dtype)], dim=-1)
            gate = torch.sigmoid(self.tier1_gate(both)).float()
            tier1 = gate * biased1 + (1 - gate) * torch.tanh(self.tier1_candidate(both)).float()

            summary = ring.mean(dim=1).to(dtype)  # the ring before this token is added
            biased2 = tier2 + bias32
            beta = torch.sigmoid(self.tier2_beta(summary)).float()
            moved = biased2 + beta * (self.tier2_value(summary).float() - biased2)
            tier2 = torch.where((c % self.interval2 == 0)[:, None], moved, tier2)

            read2 = self.tier2_read(tier2.to(dtype))
            noise = F.softplus(self.tier3_obs_noise(read2)).float() + self.MIN_OBS_NOISE
            predicted = self.TIER3_DECAY * var + self.TIER3_NOISE
            gain = predicted / (predicted + noise + self.EPS)
            step3 = (c % self.interval3 == 0)[:, None]
            tier3 = torch.where(step3, tier3 + gain * (self.tier3_obs(read2).float() - tier3), tier3)
            var = torch.where(step3, (1.0 - gain) * predicted, var)

            read1, read3 = self.tier1_read(tier1.to(dtype)), self.tier3_read(torch.cat([tier3, var], -1).to(dtype))
            out.append(self.fusion(torch.cat([read1, read2, read3], dim=-1)))
            written = (slots == torch.remainder(c - 1, ring.shape[1])[:, None])[..., None]  # (R, B, 1)
            ring = torch.where(written, xt.detach().float()[:, None], ring)
        return self.norm(torch.stack(out, 1)), torch.cat([tier1, tier2, tier3, var], dim=-1), ring
