"""SYNTHE's four online-learning primitives and its feed-forward, written from the reference's maths (github
kaelvalen/synthe b7f4305, MIT), not its code. Parameter names are the reference's, so its weights load.

Each primitive reads a chunk `x (R, T, d)` and its fp32 state and returns (output, new state); the state is
per request and fixed-size, so a chunk continues exactly where the previous one stopped. All use pre-norm
(their own LayerNorm) and are added to the residual by the block. Torch only.

  JordanLayer   gated EMA of k (x) v per head:     S = a S + (1 - a) k v^T,  y = q S
  HopfieldCore  delta rule per head:                e = v - S k,  S = g S + beta e k^T,  y = S q
  WienerCore    diagonal Kalman filter per head:    IOR = mean|z - mu| / mean|z|, then predict / gain / update,
                                                    y = W_read [mu | sigma^2]
  AttentionProbe  sliding-window attention (no positional encoding, window of `window` tokens including
                  the current one) over a ring of the last `window` keys and values
The recurrences are per-token loops: the delta rule's and the Kalman gain's updates are nonlinear in the
state, and one loop for all keeps the three identical between prefill and decode (decode is one step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# _PER_TOKEN: inside the per-token loops, products are written as matmul rather than einsum: on CPU an einsum
# with batch dimensions adds a permute, a copy and a clone per call, ~40 us each time (a prefill runs these
# loops once per token: research/results/bench_architectures.md).


def heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(R, T, n * k) -> (R, T, n, k)"""
    return x.unflatten(-1, (n, -1))


class JordanLayer(nn.Module):
    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.W_k, self.W_v, self.W_q = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.W_alpha = nn.Linear(d, n_heads)
        self.W_out = nn.Linear(d, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def scan(self, x: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xn = self.norm(x)
        k = F.normalize(heads(self.W_k(xn), self.n_heads).float(), dim=-1)
        v, q = heads(self.W_v(xn), self.n_heads).float(), heads(self.W_q(xn), self.n_heads).float()
        a = torch.sigmoid(self.W_alpha(xn)).float()[..., None, None]  # (R, T, h, 1, 1)
        ys = []
        for t in range(x.shape[1]):
            S = a[:, t] * S + (1 - a[:, t]) * k[:, t, :, :, None] * v[:, t, :, None, :]
            ys.append((q[:, t, :, None, :] @ S)[..., 0, :])  # q S per head (matmul: see _PER_TOKEN)
        return self.W_out(torch.stack(ys, 1).flatten(2).to(x.dtype)), S


class HopfieldCore(nn.Module):
    BETA_MIN, BETA_MAX = 0.01, 0.99  # the reference's bounds on the per-head learning rate

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.W_k, self.W_v, self.W_q = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.W_beta, self.W_gate = nn.Linear(d, n_heads), nn.Linear(d, n_heads)
        self.W_out = nn.Linear(d, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def scan(self, x: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> output, new S, surprise (R, T): mean over heads of |v - S k| before the update."""
        xn = self.norm(x)
        k = F.normalize(heads(self.W_k(xn), self.n_heads).float(), dim=-1)
        v, q = heads(self.W_v(xn), self.n_heads).float(), heads(self.W_q(xn), self.n_heads).float()
        beta = (self.BETA_MIN + (self.BETA_MAX - self.BETA_MIN) * torch.sigmoid(self.W_beta(xn))).float()[..., None, None]
        gate = torch.sigmoid(self.W_gate(xn)).float()[..., None, None]
        ys, errors = [], []
        for t in range(x.shape[1]):
            error = v[:, t] - (S @ k[:, t, :, :, None])[..., 0]  # S k per head
            errors.append(error)
            S = gate[:, t] * S + beta[:, t] * error[..., :, None] * k[:, t, :, None, :]
            ys.append((S @ q[:, t, :, :, None])[..., 0])  # S q per head
        surprise = torch.stack(errors, 1).norm(dim=-1).mean(dim=-1)  # (R, T), after the loop: fewer ops per token
        return self.W_out(torch.stack(ys, 1).flatten(2).to(x.dtype)), S, surprise


class WienerCore(nn.Module):
    MIN_OBS_NOISE, MIN_PROCESS_NOISE, EPS = 0.01, 1e-6, 1e-8  # the reference's constants
    INITIAL_VARIANCE = 5.0  # a fresh filter starts uncertain

    def __init__(self, d: int, n_heads: int, state: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.W_obs = nn.Linear(d, n_heads * state, bias=False)
        self.W_noise = nn.Linear(d, 2 * n_heads * state)  # [observation noise r | process noise q]
        self.W_alpha = nn.Linear(d, n_heads * state)
        self.W_read = nn.Linear(2 * n_heads * state, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def scan(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """state (R, h, k, 2) = [mean | variance] -> output, new state, IOR (R, T): the innovation-to-observation
        ratio of each token, measured before its update."""
        xn = self.norm(x)
        z = heads(self.W_obs(xn), self.n_heads).float()
        r_raw, q_raw = self.W_noise(xn).float().chunk(2, dim=-1)
        r = F.softplus(heads(r_raw, self.n_heads)) + self.MIN_OBS_NOISE
        q = F.softplus(heads(q_raw, self.n_heads)) + self.MIN_PROCESS_NOISE
        alpha = torch.sigmoid(heads(self.W_alpha(xn), self.n_heads)).float()
        mu, var = state[..., 0], state[..., 1]
        means, variances, innovations = [], [], []
        for t in range(x.shape[1]):
            innovation = z[:, t] - mu
            innovations.append(innovation)
            predicted = alpha[:, t] * var + q[:, t]
            gain = predicted / (predicted + r[:, t] + self.EPS)
            mu = mu + gain * innovation
            var = (1.0 - gain) * predicted
            means.append(mu), variances.append(var)
        # After the loop, for the whole chunk: what needs no state (fewer ops per token).
        ior = torch.stack(innovations, 1).abs().mean(dim=(-1, -2)) / (z.abs().mean(dim=(-1, -2)) + self.EPS)
        reads = torch.cat([torch.stack(means, 1).flatten(2), torch.stack(variances, 1).flatten(2)], dim=-1)
        return self.W_read(reads.to(x.dtype)), torch.stack([mu, var], dim=-1), ior


class AttentionProbe(nn.Module):
    def __init__(self, d: int, n_heads: int, window: int) -> None:
        super().__init__()
        self.n_heads, self.window = n_heads, window
        self.W_qkv = nn.Linear(d, 3 * d, bias=False)
        self.W_out = nn.Linear(d, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def scan(self, x: torch.Tensor, ring: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (R, T, d) at positions start + 0..T-1; ring (R, W, 2, d): the keys and values of the `window`
        positions before `start` (slot = position % W). -> attention output, the ring after the chunk."""
        R, T, d = x.shape
        W, h = self.window, self.n_heads
        q, k, v = self.W_qkv(self.norm(x)).chunk(3, dim=-1)
        k, v = k.float(), v.float()
        slot = torch.arange(W, device=x.device)
        # The position each ring slot holds before the chunk (negative: never written).
        held = start[:, None] - 1 - torch.remainder(start[:, None] - 1 - slot, W)  # (R, W)
        positions = start[:, None] + torch.arange(T, device=x.device)  # (R, T)
        keys = torch.cat([ring[:, :, 0], k], dim=1)  # (R, W + T, d)
        values = torch.cat([ring[:, :, 1], v], dim=1)
        key_pos = torch.cat([held, positions], dim=1)
        visible = ((key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= positions[:, :, None])
                   & (key_pos[:, None, :] > positions[:, :, None] - W))  # (R, T, W + T)
        scores = torch.einsum("rthd,rshd->rhts", heads(q.float(), h), heads(keys, h)) * (d // h) ** -0.5
        weights = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)
        out = torch.einsum("rhts,rshd->rthd", weights, heads(values, h)).flatten(2)
        # After the chunk each slot holds its latest position: from the chunk when that position is in it.
        latest = positions[:, -1:] - torch.remainder(positions[:, -1:] - slot, W)  # (R, W)
        from_chunk = (latest >= start[:, None])[..., None, None]
        index = (latest - start[:, None]).clamp(0, T - 1)[..., None].expand(R, W, d)
        fresh = torch.stack([k.gather(1, index), v.gather(1, index)], dim=2)
        return self.W_out(out.to(x.dtype)), torch.where(from_chunk, fresh, ring)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
