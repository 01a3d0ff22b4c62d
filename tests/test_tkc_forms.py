"""Transformer Killer Core's full-sequence form without a server: it continues from its saved state exactly,
it is causal, the deep tier is written only above the surprise threshold, its Mamba2 backbone layer computes
what transformers' Mamba2Mixer computes, and what is refused is named."""

from __future__ import annotations

import pytest
import torch

from vllm_plasticity.architectures.tkc_config import UnsupportedConfig
from vllm_plasticity.architectures.tkc_hf import TKCConfig, TKCForCausalLM


def model(**fields) -> TKCForCausalLM:
    torch.manual_seed(0)
    return TKCForCausalLM(TKCConfig(vocab_size=32, tkc={"d_model": 16, "n_layers": 2, "mem_slots": 4, **fields})).eval()


MAMBA2 = {"backbone": "mamba2", "mamba_d_state": 8, "mamba_headdim": 8, "mamba_chunk_size": 8}


@pytest.mark.parametrize("fields", [{}, {"use_ema": True, "ema_decay": 0.5}, {"surprise_threshold": 1.5}, MAMBA2],
                         ids=["gru", "ema", "no-deep-writes", "mamba2"])
def test_split_anywhere_equals_the_whole_sequence_and_later_tokens_change_nothing_earlier(fields):
    m = model(**fields)
    ids = torch.randint(0, 32, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(input_ids=ids).logits
        state, parts = None, []
        for a, b in ((0, 7), (7, 8), (8, 25), (25, 40)):  # the 4 slots wrap around several times
            out = m(input_ids=ids[:, a:b], past_key_values=state, use_cache=True)
            state, parts = out.past_key_values, parts + [out.logits]
        changed = ids.clone()
        changed[:, 20:] = (changed[:, 20:] + 1) % 32
        later = m(input_ids=changed).logits
    # Equal up to float32 rounding: the backbone's matrix products see other shapes when the chunks differ
    # (the Mamba2 scan's chunks of 8 also fall elsewhere).
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5
    assert torch.equal(later[:, :20], full[:, :20]) and not torch.equal(later[:, 20:], full[:, 20:])
    assert state[-1][0, 2].item() == 40  # tokens seen


def test_a_deep_write_happens_only_above_the_surprise_threshold():
    """Query, key and value are the backbone output (identity projections, zero bias): the first token finds
    the memory empty (surprise exactly 1: its read is 0); the same token again reads back almost its own
    value (surprise near 0: only its position and the backbone state differ)."""
    for threshold, deep_writes in ((0.5, 1), (1.5, 0), (-0.5, 2)):
        m = model(surprise_threshold=threshold, n_layers=1)
        with torch.no_grad():
            for layer in (m.query, m.key, m.value):
                layer.weight.copy_(torch.eye(16))
                layer.bias.zero_()
            m.mix_logit.fill_(20.0)  # read the fast tier only
            m.context_gate.weight.zero_()
            m.context_gate.bias.zero_()
            out = m(input_ids=torch.tensor([[5, 5]]), use_cache=True)
        stats = out.past_key_values[-1][0]
        strength = out.past_key_values[-2][0]
        assert stats[5].item() == deep_writes, threshold  # deep writes counted
        assert strength[1].sum().item() == min(deep_writes, 4)  # deep slots used
        assert strength[0].sum().item() == 2  # the fast tier is written every token
        assert 0.5 <= stats[3].item() < 0.55  # mean surprise of (1, near 0)


def test_the_mamba2_backbone_layer_equals_transformers_mamba2_mixer():
    """The same weights (A_log = log(-A)) in transformers' Mamba2Mixer, from an empty state; and continuing
    from the saved convolution and SSM states equals one pass."""
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    mixer = model(**MAMBA2).backbone[0].mixer
    config = Mamba2Config(hidden_size=16, num_heads=mixer.heads, head_dim=8, state_size=8, expand=2, n_groups=1,
                          conv_kernel=4, chunk_size=8, use_conv_bias=True, use_bias=False, layer_norm_epsilon=1e-5,
                          num_hidden_layers=1)
    reference = Mamba2Mixer(config, 0).eval()
    weights = {k: v for k, v in mixer.state_dict().items() if k != "A"}
    reference.load_state_dict({**weights, "A_log": torch.log(-mixer.A.detach())}, strict=True)
    x = torch.randn(2, 19, 16, generator=torch.Generator().manual_seed(2))
    conv, ssm = torch.zeros(2, mixer.conv_dim, 3), torch.zeros(2, mixer.heads, 8, 8)
    with torch.no_grad():
        want = reference(x)
        whole, _, _ = mixer.scan(x, conv, ssm)
        first, conv, ssm = mixer.scan(x[:, :5], conv, ssm)
        rest, _, _ = mixer.scan(x[:, 5:], conv, ssm)
    assert want.abs().max().item() > 0.1  # not a comparison of zeros
    assert (whole - want).abs().max().item() <= 1e-5
    assert (torch.cat([first, rest], dim=1) - want).abs().max().item() <= 1e-5


def test_unsupported_settings_are_refused_naming_the_field():
    with pytest.raises(UnsupportedConfig, match=r"tkc.backbone='lstm' is not supported"):
        model(backbone="lstm")
    with pytest.raises(UnsupportedConfig, match=r"tkc.mamba_headdim=12 must divide mamba_expand \* d_model = 32"):
        model(**{**MAMBA2, "mamba_headdim": 12})
    with pytest.raises(UnsupportedConfig, match=r"tkc.heads is not a TKC field"):
        model(heads=4)
