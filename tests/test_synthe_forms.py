"""SYNTHE's full-sequence form without a server: it equals the MIT reference's figures with the probe off and
on (tests/synthe_reference.py), it continues from its saved state exactly in every probe mode, it is causal,
the causal gate follows the Kalman confidence, and what is refused is named."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.synthe_reference import FIELDS, FIGURES, VOCAB, inputs, seeded_weights
from vllm_plasticity.architectures.synthe_config import UnsupportedConfig
from vllm_plasticity.architectures.synthe_hf import SyntheConfig, SyntheForCausalLM


def model(**fields) -> SyntheForCausalLM:
    m = SyntheForCausalLM(SyntheConfig(vocab_size=VOCAB, synthe={**FIELDS, **fields})).eval()
    m.load_state_dict(seeded_weights({n: tuple(p.shape) for n, p in m.named_parameters()}))
    return m


@pytest.mark.parametrize("mode", ["never", "always"])
def test_equals_the_reference_figures(mode):
    figures = load_file(FIGURES)
    assert torch.equal(figures["input_ids"], inputs())
    with torch.no_grad():
        logits = model(probe_gate=mode)(input_ids=figures["input_ids"]).logits
    assert (logits - figures[mode]).abs().max().item() <= 1e-4
    assert (figures["always"] - figures["never"]).abs().max().item() > 0.5  # the probe matters in these figures


def test_causal_gate_at_its_limits_is_always_or_never():
    ids = inputs()
    with torch.no_grad():
        never, always = (model(probe_gate=m)(input_ids=ids).logits for m in ("never", "always"))
        assert torch.allclose(model(probe_threshold=0.0)(input_ids=ids).logits, never, atol=1e-5)
        assert torch.allclose(model(probe_threshold=1.01)(input_ids=ids).logits, always, atol=1e-5)


@pytest.mark.parametrize("mode", ["never", "always", "causal"])
def test_split_anywhere_equals_the_whole_sequence_and_later_tokens_change_nothing_earlier(mode):
    m = model(probe_gate=mode, probe_threshold=0.4)
    ids = torch.randint(0, VOCAB, (3, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(input_ids=ids).logits
        state, parts = None, []
        for a, b in ((0, 5), (5, 6), (6, 23), (23, 24), (24, 45)):  # windows of 6, hub intervals 4 and 8, wrap at 32
            out = m(input_ids=ids[:, a:b], past_key_values=state, use_cache=True)
            state, parts = out.past_key_values, parts + [out.logits]
        alone = m(input_ids=ids[1:2]).logits
        changed = ids.clone()
        changed[:, 20:] = (changed[:, 20:] + 1) % VOCAB
        later = m(input_ids=changed).logits
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-4
    assert (alone - full[1:2]).abs().max().item() <= 1e-4
    assert torch.equal(later[:, :20], full[:, :20]) and not torch.equal(later[:, 20:], full[:, 20:])
    assert state[-1][0, 0].item() == 45  # tokens seen


def test_the_causal_gate_fires_where_the_running_confidence_is_below_the_threshold():
    """The gate is exp(-running IOR) < threshold per token, the running IOR a bias-corrected moving average
    of this token's IOR and the earlier ones': surprising tokens fire it, predictable ones after them do not."""
    m = model(probe_gate="causal")
    ior = torch.tensor([[2.0, 2.0, 0.0, 0.0, 0.0, 3.0]])
    running = torch.zeros(1, 2)
    gate, new = m.probe_gate(ior, running)
    rho = FIELDS.get("probe_confidence_decay", 0.9375)
    weights = torch.tensor([rho ** k for k in range(6)]).flip(0)  # token t's weight at the end
    assert torch.allclose(new[0], torch.tensor([float((weights * ior[0]).sum()), float(weights.sum())]))
    confidence = []
    total = weight = 0.0
    for x in ior[0].tolist():
        total, weight = rho * total + x, rho * weight + 1
        confidence.append(torch.exp(torch.tensor(-total / weight)).item())
    assert gate[0].tolist() == [float(c < 0.35) for c in confidence]
    assert gate[0].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]  # fires, the average falls, a surprise


def test_unsupported_settings_are_refused_naming_the_field():
    with pytest.raises(UnsupportedConfig, match=r"synthe.probe_gate='sometimes' is not a probe gating mode"):
        model(probe_gate="sometimes")
    with pytest.raises(UnsupportedConfig, match=r"synthe.dropout=0.1 is not supported"):
        model(dropout=0.1)
    with pytest.raises(UnsupportedConfig, match=r"synthe.heads is not a SYNTHE field"):
        model(heads=4)
