"""The causal bank's blocked scan (decay_scan.py) against the per-token recurrence it replaces: every state
and the last one, continuing from a saved state, across block boundaries and ragged last blocks, and the
gradients the trainer takes through it (learnable decays)."""

import pytest
import torch

from vllm_plasticity.architectures.decay_scan import decay_scan


def per_token(a, b, h):
    states = []
    for t in range(b.shape[1]):
        h = a * h + b[:, t]
        states.append(h)
    return torch.stack(states, 1), h


@pytest.mark.parametrize("length", [1, 2, 7, 63, 64, 65, 128, 200])
def test_every_state_equals_the_per_token_recurrence_from_a_saved_state(length):
    g = torch.Generator().manual_seed(length)
    a = torch.rand(48, generator=g) * 0.999  # half-lives from under a token to ~700 tokens
    b, h0 = torch.randn(3, length, 48, generator=g), torch.randn(3, 48, generator=g)
    states, last = decay_scan(a, b, h0, block=16)
    want, want_last = per_token(a.double(), b.double(), h0.double())
    assert states.shape == (3, length, 48) and last.shape == (3, 48)
    torch.testing.assert_close(states.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last.double(), want_last, atol=1e-5, rtol=1e-5)


def test_a_sequence_split_anywhere_continues_exactly():
    g = torch.Generator().manual_seed(0)
    a, b, h0 = torch.rand(32, generator=g), torch.randn(2, 150, 32, generator=g), torch.randn(2, 32, generator=g)
    whole, _ = decay_scan(a, b, h0, block=16)
    first, h = decay_scan(a, b[:, :37], h0, block=16)
    rest, _ = decay_scan(a, b[:, 37:], h, block=16)
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, atol=1e-5, rtol=1e-5)


def test_gradients_equal_the_per_token_recurrences():
    g = torch.Generator().manual_seed(1)
    a0, b0, h0 = torch.rand(16, generator=g), torch.randn(2, 70, 16, generator=g), torch.randn(2, 16, generator=g)
    weights = torch.randn(2, 70, 16, generator=g)
    grads = []
    for scan in (lambda a, b: decay_scan(a, b, h0, block=16), lambda a, b: per_token(a, b, h0)):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        states, last = scan(a, b)
        ((states * weights).sum() + last.sum()).backward()
        grads.append((a.grad, b.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-4, rtol=1e-4)
