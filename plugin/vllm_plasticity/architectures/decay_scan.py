"""The diagonal linear recurrence h_t = a * h_{t-1} + b_t, in blocks: the causal bank's substrate and its
selective-scan state are both this recurrence with a constant per-channel decay `a`.

Torch only (the served model and the trainer's full-sequence form call the same function, so they agree
by construction). Within a block of K tokens the states are one matmul with the K x K lower-triangular
matrix a^(i-j) (the reference's own "kernel" form, restricted to a block); across blocks the state is
carried, so memory is O(K^2 * channels) whatever the length and a prefill continues exactly from a
request's saved state. A single token (decode) is one multiply-add.

    >>> states, last = decay_scan(a, b, h0)     # a (N,), b (R, L, N), h0 (R, N) -> (R, L, N), (R, N)
"""

from __future__ import annotations

import torch

BLOCK = 64  # tokens per block: 64 x 64 x 256 modes is 4 MiB of fp32 powers


def decay_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """All states (R, L, N) and the last one (R, N) of h_t = a * h_{t-1} + b_t from h_{-1} = h0, in fp32."""
    a, b, h = a.float(), b.float(), h0.float()
    R, L, N = b.shape
    if L == 1:
        h = a * h + b[:, 0]
        return h[:, None], h
    K = min(block, L)
    step = torch.arange(K, device=b.device, dtype=torch.float32)
    delta = step[:, None] - step[None, :]  # (K, K): i - j
    lower = delta >= 0
    # a^(i-j) below the diagonal, 0 above; a^(i+1) carries the state entering the block to position i.
    powers = torch.where(lower[..., None], a ** delta.clamp(min=0)[..., None], torch.zeros((), device=b.device))
    carry = a ** (step + 1)[:, None]  # (K, N)
    out = torch.empty(R, L, N, device=b.device, dtype=torch.float32)
    for start in range(0, L, K):
        n = min(K, L - start)
        block_states = torch.einsum("ijc,rjc->ric", powers[:n, :n], b[:, start:start + n]) + carry[:n] * h[:, None]
        out[:, start:start + n] = block_states
        h = block_states[:, -1]
    return out, h
