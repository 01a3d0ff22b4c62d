"""The diagonal linear recurrence h_t = a * h_{t-1} + b_t, in blocks: the causal bank's substrate and its
selective-scan state are both this recurrence with a constant per-channel decay `a`.

Torch only (the served model and the trainer's full-sequence form call the same function, so they agree
by construction). Within a block of K tokens the states are a product with the K x K lower-triangular
matrix a^(i-j) (the reference's own "kernel" form, restricted to a block), every block of every row in one
batched matmul over channels; across blocks the state is carried (one multiply-add per block), so memory
is O(K^2 * channels) whatever the length and a prefill continues exactly from a request's saved state. A
single token (decode) is one multiply-add. tests/test_decay_scan.py checks it against the per-token
recurrence, gradients included.

    >>> states, last = decay_scan(a, b, h0)     # a (N,), b (R, L, N), h0 (R, N) -> (R, L, N), (R, N)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 64  # tokens per block: 64 x 64 x 256 modes is 4 MiB of fp32 powers


def decay_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """All states (R, L, N) and the last one (R, N) of h_t = a * h_{t-1} + b_t from h_{-1} = h0, in fp32."""
    a, b, h = a.float(), b.float(), h0.float()
    R, L, N = b.shape
    if L == 1:
        h = a * h + b[:, 0]
        return h[:, None], h
    K = min(block, L)
    blocks = -(-L // K)
    if blocks * K != L:  # zeros after the last token: they change no state up to it
        b = F.pad(b, (0, 0, 0, blocks * K - L))
    step = torch.arange(K, device=b.device, dtype=torch.float32)
    delta = step[:, None] - step[None, :]  # (K, K): i - j
    # a^(i-j) below the diagonal, 0 above, one K x K matrix per channel; a^(i+1) carries the state entering
    # a block to its position i.
    # (K powers per channel, laid out by index: a million pow calls for 256 channels would cost more than the scan.)
    lags = a[:, None] ** step  # (N, K): a^0 .. a^(K-1)
    powers = lags[:, delta.clamp(min=0).long()] * (delta >= 0)  # (N, K, K)
    carry = (lags * a[:, None]).T  # (K, N): a^(i+1)
    # Every block's own contribution in one batched product over channels, on contiguous operands: an einsum
    # over the channel index batches it the same way but copies each channel's small matrices one by one
    # (on CPU most of its time; research/results/bench_architectures.md).
    inputs = b.view(R, blocks, K, N).permute(3, 2, 0, 1).reshape(N, K, R * blocks)  # (N, j, rows x blocks)
    within = torch.bmm(powers, inputs).view(N, K, R, blocks).permute(2, 3, 1, 0)  # (R, blocks, i, N)
    pieces = []
    for m in range(blocks):  # across blocks: the state carried in, one multiply-add per block
        pieces.append(within[:, m] + carry * h[:, None])  # (new tensors: the trainer's backward needs each h)
        h = pieces[-1][:, -1]
    out = torch.cat(pieces, dim=1)[:, :L]
    return out, out[:, -1]
