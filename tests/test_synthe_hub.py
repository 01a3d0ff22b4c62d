"""SYNTHE's memory hub over a chunk (the ring's means, the reads and the fusion computed for the whole chunk)
against the same tokens fed one at a time, where the ring is written slot by slot: outputs, tiers and ring,
from a saved mid-ring state, across the ring's wrap and the tier-2 / tier-3 update counts."""

import pytest
import torch

from vllm_plasticity.architectures.synthe_hub import TemporalMemoryHub

D, RING = 32, 8


def hub() -> TemporalMemoryHub:
    torch.manual_seed(0)
    module = TemporalMemoryHub(D, 24, 16, 8, interval2=3, interval3=5).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.05)
    return module


@pytest.mark.parametrize("length", [1, 2, RING - 1, RING, RING + 3, 3 * RING + 1])
def test_a_chunk_equals_its_tokens_one_at_a_time(length):
    module, g = hub(), torch.Generator().manual_seed(length)
    tiers = module.initial_tiers(3, torch.device("cpu")) + 0.1 * torch.randn(3, sum(module.dims), generator=g)
    ring = torch.randn(3, RING, D, generator=g)
    seen = torch.tensor([0.0, 5.0, 13.0])  # fresh, mid-ring and past a wrap
    x = torch.randn(3, length, D, generator=g)
    with torch.no_grad():
        out, new_tiers, new_ring = module.scan(x, tiers, ring, seen)
        steps, t_tiers, t_ring = [], tiers, ring
        for t in range(length):
            o, t_tiers, t_ring = module.scan(x[:, t:t + 1], t_tiers, t_ring, seen + t)
            steps.append(o)
    torch.testing.assert_close(out, torch.cat(steps, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_tiers, t_tiers, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_ring, t_ring)


def test_the_ring_mean_each_token_reads_is_the_mean_of_the_last_tokens_before_it():
    g = torch.Generator().manual_seed(1)
    ring, x = torch.randn(2, RING, D, generator=g), torch.randn(2, 30, D, generator=g)
    positions = torch.tensor([[3.0], [20.0]]) + torch.arange(30)
    means = TemporalMemoryHub._ring_means(x, ring, positions)
    slots = ring.clone()
    for t in range(30):
        torch.testing.assert_close(means[:, t], slots.mean(dim=1), atol=1e-6, rtol=1e-6)
        slots[torch.arange(2), (positions[:, t] % RING).long()] = x[:, t]
