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
        """x (R, T, d); tiers (R, hub_width); ring (R, B, d); seen (R,) tokens before the chunk.

        What does not depend on the tiers runs on the whole chunk (a prefill pays per token for what stays in
        the loop: research/results/bench_architectures.md): x's share of tier 1's gate and candidate, the
        ring's mean before each token (a sliding-window sum) and what tier 2 moves toward from it, the update
        schedule, and after the loop the reads, the fusion and the ring's new contents. The loop keeps the
        tiers' own recurrences."""
        dtype, (_, T, d) = x.dtype, x.shape
        tier1, tier2, tier3, var = tiers.split(self.dims, dim=-1)
        positions = seen[:, None] + torch.arange(T, device=x.device)  # (R, T): each token's position
        counts = positions + 1
        update2, update3 = (counts % self.interval2 == 0)[..., None], (counts % self.interval3 == 0)[..., None]
        gate_x = F.linear(x, self.tier1_gate.weight[:, :d], self.tier1_gate.bias)  # (R, T, t1)
        candidate_x = F.linear(x, self.tier1_candidate.weight[:, :d], self.tier1_candidate.bias)
        gate_tier, candidate_tier = self.tier1_gate.weight[:, d:], self.tier1_candidate.weight[:, d:]
        summary = self._ring_means(x.detach().float(), ring, positions).to(dtype)  # (R, T, d)
        beta = torch.sigmoid(self.tier2_beta(summary)).float()
        target2 = self.tier2_value(summary).float()
        tiers1, reads2, tiers3, variances = [], [], [], []
        for t in range(T):
            bias21 = self.broadcast_2to1(tier2.to(dtype)).float()
            bias32 = self.broadcast_3to2(tier3.to(dtype)).float()
            biased1 = tier1 + bias21
            tier_in = biased1.to(dtype)
            gate = torch.sigmoid(gate_x[:, t] + F.linear(tier_in, gate_tier)).float()
            tier1 = gate * biased1 + (1 - gate) * torch.tanh(candidate_x[:, t] + F.linear(tier_in, candidate_tier)).float()

            biased2 = tier2 + bias32
            tier2 = torch.where(update2[:, t], biased2 + beta[:, t] * (target2[:, t] - biased2), tier2)

            read2 = self.tier2_read(tier2.to(dtype))
            noise = F.softplus(self.tier3_obs_noise(read2)).float() + self.MIN_OBS_NOISE
            predicted = self.TIER3_DECAY * var + self.TIER3_NOISE
            gain = predicted / (predicted + noise + self.EPS)
            tier3 = torch.where(update3[:, t], tier3 + gain * (self.tier3_obs(read2).float() - tier3), tier3)
            var = torch.where(update3[:, t], (1.0 - gain) * predicted, var)
            tiers1.append(tier1), reads2.append(read2), tiers3.append(tier3), variances.append(var)
        read1 = self.tier1_read(torch.stack(tiers1, 1).to(dtype))
        read3 = self.tier3_read(torch.cat([torch.stack(tiers3, 1), torch.stack(variances, 1)], -1).to(dtype))
        out = self.fusion(torch.cat([read1, torch.stack(reads2, 1), read3], dim=-1))
        return self.norm(out), torch.cat([tier1, tier2, tier3, var], dim=-1), self._ring_after(x, ring, positions)

    @staticmethod
    def _ring_means(x: torch.Tensor, ring: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(R, T, d): the ring's mean over its B slots before each token is written (slot = position % B).
        Token i overwrites what token i - B wrote (from the ring for i < B), so the sum before token t is the
        ring's sum plus the running sum of (x_i - overwritten_i) for i < t, accumulated in fp64."""
        R, T, d = x.shape
        B = ring.shape[1]
        if T == 1:  # a decode step: the ring as it is (the general form's setup would cost more than the step)
            return ring.mean(dim=1, keepdim=True)
        slots = torch.remainder(positions[:, : min(T, B)], B).long()  # the slots the first B tokens overwrite
        overwritten = ring.gather(1, slots[..., None].expand(-1, -1, d))
        if T > B:
            overwritten = torch.cat([overwritten, x[:, : T - B]], dim=1)
        change = (x - overwritten).double().cumsum(dim=1) - (x - overwritten).double()  # before token t
        return ((ring.double().sum(dim=1, keepdim=True) + change) / B).float()

    @staticmethod
    def _ring_after(x: torch.Tensor, ring: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The ring after the chunk: each slot holds the latest token written to it, from the chunk when one was."""
        R, T, d = x.shape
        B = ring.shape[1]
        slot = torch.arange(B, device=x.device)
        if T == 1:  # a decode step: one slot written
            return torch.where((slot == torch.remainder(positions, B))[..., None], x.detach().float(), ring)
        latest = positions[:, -1:] - torch.remainder(positions[:, -1:] - slot, B)  # (R, B): position last in slot
        from_chunk = (latest >= positions[:, :1])[..., None]
        index = (latest - positions[:, :1]).clamp(0, T - 1).long()[..., None].expand(R, B, d)
        return torch.where(from_chunk, x.detach().float().gather(1, index), ring)
