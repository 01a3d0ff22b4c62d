"""A hostile config.json for the project's own architectures (causal bank, TKC, SYNTHE) is refused before
anything is built: every field's type and range, naming the field, the value and the valid range; and a
configuration whose weights and per-request state cannot fit is refused with the figure, at vLLM's config
time (the server's start) and in the Hugging Face form's constructor (trainer, builders, import). No server.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

from vllm_plasticity.architectures import causal_bank_config, synthe_config, tkc_config
from vllm_plasticity.architectures.causal_bank_hf import CausalBankConfig, CausalBankForCausalLM
from vllm_plasticity.architectures.config_fields import Flag, Int, Ints, OneOf, Real
from vllm_plasticity.architectures.footprint import ConfigTooLarge, footprint, require_fits
from vllm_plasticity.architectures.synthe_hf import SyntheConfig, SyntheForCausalLM
from vllm_plasticity.architectures.tkc_hf import TKCConfig, TKCForCausalLM

# (config module, its field in config.json, HF config class, HF model class)
ARCHS = {"causal_bank": (causal_bank_config, CausalBankConfig, CausalBankForCausalLM),
         "tkc": (tkc_config, TKCConfig, TKCForCausalLM), "synthe": (synthe_config, SyntheConfig, SyntheForCausalLM)}
SHAPES = {"causal_bank": causal_bank_config.CausalBankShape, "tkc": tkc_config.TKCShape,
          "synthe": synthe_config.SyntheShape}
SMALL = {"causal_bank": {"embedding_dim": 8, "linear_modes": 16, "linear_hidden": [16], "local_hidden": [16]},
         "tkc": {"d_model": 16, "mem_slots": 4}, "synthe": {"d_model": 32, "n_blocks": 2, "n_heads": 2}}


def bad_values(rule) -> list:
    """Values the rule must refuse: out of range below and above, and the wrong JSON type."""
    if isinstance(rule, Int):
        return [rule.lo - 1, rule.hi + 1, True, "8", 8.0]
    if isinstance(rule, Real):
        return [rule.lo - 1, rule.hi * 2 + 1, math.nan, math.inf, "0.5", False]
    if isinstance(rule, Flag):
        return [1, "true", None]
    if isinstance(rule, OneOf):
        return ["nope", 1, None]
    if isinstance(rule, Ints):
        return [[rule.lo - 1], [rule.hi + 1], [True], 8, [1] * (rule.longest + 1)]
    raise AssertionError(rule)


def every_field():
    for arch, (module, *_) in ARCHS.items():
        for field, rule in module.FIELDS.items():
            for value in bad_values(rule):
                yield pytest.param(arch, field, value, id=f"{arch}.{field}={value!r}"[:60])


@pytest.mark.parametrize("arch, field, value", list(every_field()))
def test_every_field_out_of_range_or_of_the_wrong_type_is_refused_naming_field_value_and_range(arch, field, value):
    module, config_class, _ = ARCHS[arch]
    with pytest.raises(module.UnsupportedConfig) as err:
        config_class(vocab_size=256, **{arch: {**SMALL[arch], field: value}})
    message = str(err.value)
    assert message.startswith(f"{arch}.{field}={repr(value)[:50]}"), message  # long values are cut short
    assert "needs" in message  # the valid range (or the accepted values), not an allocation error


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_default_is_inside_its_own_range(arch):
    module = ARCHS[arch][0]
    assert set(module.FIELDS) <= set(module.DEFAULTS)
    module.check_supported(module.DEFAULTS) if arch == "causal_bank" else SHAPES[arch].from_fields(module.DEFAULTS, 256)


@pytest.mark.parametrize("arch, fields, message", [
    ("tkc", {"d_model": -4}, "tkc.d_model=-4 is out of range: needs an integer in [2, 65536]"),
    ("tkc", {"mem_slots": 0}, "tkc.mem_slots=0 is out of range: needs an integer in [1, 65536]"),
    ("causal_bank", {"embedding_dim": -1}, "causal_bank.embedding_dim=-1 is out of range"),
    ("causal_bank", {"local_window": 10**12}, "causal_bank.local_window=1000000000000 is out of range"),
    ("causal_bank", {"state_dim": 10, "num_heads": 4}, "causal_bank.state_dim=10 must be a multiple of causal_bank.num_heads=4"),
    ("causal_bank", {"readout_bands": 32, "linear_modes": 16}, "causal_bank.readout_bands=32 is more than causal_bank.linear_modes=16"),
    ("synthe", {"n_blocks": -1}, "synthe.n_blocks=-1 is out of range"),
    ("synthe", {"wiener_state_dim": -3}, "synthe.wiener_state_dim=-3 is out of range"),
    ("synthe", {"ffn_expand": 0.001}, "synthe.ffn_expand=0.001 gives no feed-forward width"),
])
def test_the_reported_hostile_configs_are_refused_before_building(arch, fields, message):
    module, config_class, _ = ARCHS[arch]
    with pytest.raises(module.UnsupportedConfig, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        config_class(vocab_size=256, **{arch: {**SMALL[arch], **fields}})


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_a_bad_vocab_size_is_refused(arch):
    module, config_class, _ = ARCHS[arch]
    for vocab in (-5, 0, True, 2**40):
        with pytest.raises(module.UnsupportedConfig, match=rf"{arch}: vocab_size={vocab!r} is out of range"):
            config_class(vocab_size=vocab, **{arch: SMALL[arch]})


@pytest.mark.parametrize("arch, fields", [
    ("causal_bank", {}), ("causal_bank", {"state_dim": 16, "num_heads": 4, "mix_mode": "gated"}),
    ("causal_bank", {"readout_bands": 4, "linear_readout_kind": "routed_sqrelu_experts", "band_experts": [0, 4, 2, 4]}),
    ("tkc", {}), ("tkc", {"backbone": "mamba2", "mamba_d_state": 8, "mamba_headdim": 8}),
    ("synthe", {}), ("synthe", {"tie_embeddings": False}),
])
def test_the_estimate_counts_exactly_the_weights_the_model_builds(arch, fields):
    _, config_class, model_class = ARCHS[arch]
    config = config_class(vocab_size=256, **{arch: {**SMALL[arch], **fields}})
    model = model_class(config)
    built = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    need = footprint(config.shape, torch.bfloat16, sequences=3)
    assert need.parameters == built
    assert need.weight_bytes == 2 * built
    per_request = sum(z[0].numel() for z in model.zero_states(1, torch.device("meta"))) * 4  # fp32 state
    assert need.state_bytes_per_request == per_request
    assert need.total_bytes == need.weight_bytes + 3 * per_request


def test_a_config_too_large_for_the_memory_is_refused_with_the_figure():
    shape = tkc_config.TKCShape.from_fields({"d_model": 65536, "n_layers": 64}, 256)
    with pytest.raises(ConfigTooLarge) as err:
        require_fits(shape, torch.bfloat16, 256, available=64 << 30, where="the GPU")
    message = str(err.value)
    assert message.startswith("the tkc configuration needs 3.1 TiB, more than the GPU holds (64.0 GiB)")
    assert "x 2 bytes (bfloat16)" in message and "x 256 sequences" in message
    assert "the largest weight is backbone.0.gru.weight_ih_l0 [196608, 65536]" in message
    small = tkc_config.TKCShape.from_fields(SMALL["tkc"], 256)
    assert require_fits(small, torch.bfloat16, 256, available=64 << 30, where="the GPU").total_bytes < 64 << 30


@pytest.mark.parametrize("arch, fields", [
    ("tkc", {"d_model": 65536, "n_layers": 64}),
    ("causal_bank", {"embedding_dim": 65536, "linear_modes": 65536, "local_window": 65536}),
    ("synthe", {"d_model": 65536, "n_blocks": 64, "n_heads": 64}),
])
def test_building_the_hugging_face_form_refuses_before_allocating(arch, fields):
    """Each needs more than a TiB: no machine that runs these tests holds it."""
    _, config_class, model_class = ARCHS[arch]
    config = config_class(vocab_size=256, **{arch: {**SMALL[arch], **fields}})  # every field in range
    with pytest.raises(ConfigTooLarge, match=rf"^the {arch} configuration needs .* more than this machine's memory holds"):
        model_class(config)
    with torch.device("meta"):  # a meta build (the trainer's view builder) allocates nothing: not refused
        model_class(config)


def fake_vllm_config(hf_config, max_num_seqs: int):
    return types.SimpleNamespace(
        model_config=types.SimpleNamespace(hf_config=hf_config, dtype=torch.bfloat16, architecture="TKCForCausalLM",
                                           max_model_len=256),
        cache_config=types.SimpleNamespace(enable_prefix_caching=True, mamba_block_size=None, mamba_cache_mode="all",
                                           gpu_memory_utilization=0.9),
        scheduler_config=types.SimpleNamespace(max_num_seqs=max_num_seqs))


def test_vllms_config_hook_refuses_at_server_start_with_the_figure():
    """The hook vLLM runs while it builds its config in the API server, before any model is built."""
    from vllm_plasticity.architectures.recurrent_config import RecurrentModelConfig

    huge = fake_vllm_config(TKCConfig(vocab_size=256, tkc={"d_model": 65536, "n_layers": 64}), max_num_seqs=128)
    with pytest.raises(ConfigTooLarge, match=r"^the tkc configuration needs 3\.\d TiB, more than the CPU memory"):
        RecurrentModelConfig.verify_and_update_config(huge)
    # Small weights, but the state of many requests: the state counts too.
    many = fake_vllm_config(TKCConfig(vocab_size=256, tkc={"d_model": 16384, "mem_slots": 65536}), max_num_seqs=4096)
    with pytest.raises(ConfigTooLarge, match=r"per-request state 16\.0 GiB x 4096 sequences"):
        RecurrentModelConfig.verify_and_update_config(many)
    fine = fake_vllm_config(TKCConfig(vocab_size=256, tkc=SMALL["tkc"]), max_num_seqs=128)
    RecurrentModelConfig.verify_and_update_config(fine)
    assert fine.cache_config.enable_prefix_caching is False and fine.cache_config.mamba_block_size == 256
