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


def test_memory_hub_off_adds_nothing_and_still_continues_from_its_state():
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    on, off = model(probe_gate="always"), model(probe_gate="always", memory_hub=False)
    with torch.no_grad():
        silenced = model(probe_gate="always")
        silenced.memory_hub.norm.weight.zero_()  # the hub's output is its LayerNorm's: 0 * x + 0
        silenced.memory_hub.norm.bias.zero_()
        full = off(input_ids=ids).logits
        assert (full - silenced(input_ids=ids).logits).abs().max().item() <= 1e-5
        assert (full - on(input_ids=ids).logits).abs().max().item() > 0.1  # the hub matters when on
        first = off(input_ids=ids[:, :17], use_cache=True)
        second = off(input_ids=ids[:, 17:], past_key_values=first.past_key_values, use_cache=True)
    assert (torch.cat([first.logits, second.logits], dim=1) - full).abs().max().item() <= 1e-4


def test_the_causal_gate_fires_where_the_running_confidence_is_below_the_threshold():
    """The gate is exp(-running IOR) < threshold per token, the running IOR a bias-corrected moving average
    of this token's IOR and the earlier ones': surprising tokens fire it, predictable ones after them do not."""
    m = model(probe_gate="causal")
    ior = torch.tensor([[2.0, 2.0, 0.0, 0.0, 0.0, 3.0]])
    confidence, new = m.running_confidence(ior, torch.zeros(1, 2))
    gate = m.probe_gate(confidence)
    rho = 0.9375  # synthe_config's default decay
    weights = torch.tensor([rho ** k for k in range(6)]).flip(0)  # token t's weight at the end
    assert torch.allclose(new[0], torch.tensor([float((weights * ior[0]).sum()), float(weights.sum())]))
    expected = []
    total = weight = 0.0
    for x in ior[0].tolist():
        total, weight = rho * total + x, rho * weight + 1
        expected.append(torch.exp(torch.tensor(-total / weight)).item())
    assert torch.allclose(confidence[0], torch.tensor(expected))
    assert gate[0].tolist() == [float(c < 0.35) for c in expected]
    assert gate[0].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]  # fires, the average falls, a surprise


def test_signals_follow_the_stream_and_say_what_the_model_did():
    m = model(probe_gate="causal", probe_threshold=0.4)
    ids = inputs()
    with torch.no_grad():
        plain, _ = m.stream(ids, m.zero_states(2, ids.device))
        both, _ = m.stream(ids, m.zero_states(2, ids.device), signals=True)
    names, d = m.signal_names(), FIELDS["d_model"]
    assert both.shape == (2, 40, d + 5 * FIELDS["n_blocks"]) and len(names) == both.shape[-1] - d
    assert torch.equal(both[..., :d], plain)
    signal = {name: both[..., d + k] for k, name in enumerate(names)}
    assert torch.equal(signal["router_budget/0"], torch.ones(2, 40))  # before min_depth 2: not scaled
    assert 0 < signal["router_budget/2"].min() and signal["router_budget/2"].max() < 1
    for b in range(FIELDS["n_blocks"]):
        assert torch.equal(signal[f"probe/{b}"], (signal[f"running_confidence/{b}"] < 0.4).float())
    assert torch.equal(m.probe_gates(ids), torch.stack([signal[f"probe/{b}"] for b in range(FIELDS["n_blocks"])]))
    fired = m.probe_gates(ids).mean().item()
    assert 0 < fired < 1, fired  # the gate is exercised both ways in this check


def test_unsupported_settings_are_refused_naming_the_field():
    with pytest.raises(UnsupportedConfig, match=r"synthe.probe_gate='sometimes' is not a probe gating mode"):
        model(probe_gate="sometimes")
    with pytest.raises(UnsupportedConfig, match=r"synthe.dropout=0.1 is not supported"):
        model(dropout=0.1)
    with pytest.raises(UnsupportedConfig, match=r"synthe.heads is not a SYNTHE field"):
        model(heads=4)
