"""Which decepticons causal-bank configurations the project serves, and the shape of a served one.

Imports nothing but the standard library: the vLLM model, the trainer's view, the importer and the tests
all read the same table, so a configuration is supported (or refused, with the field and the reason) in
one place. DESIGN.md ("Custom architectures: the causal bank") prints this table.

A served model's `config.json` holds `"causal_bank": {every CausalBankConfig field}`; `CausalBankShape`
is what the model needs from it (widths of the per-token stream, per-request state) after checking.

    >>> shape = CausalBankShape.from_fields({"embedding_dim": 32, ...}, vocab_size=256)
    >>> shape.hidden_size        # the width of the stream the readout reads and steering adds to
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import ClassVar

from vllm_plasticity.architectures.config_fields import (
    MAX_COUNT, MAX_LENGTH, MAX_WIDTH, Flag, Int, Ints, OneOf, Real, UnsupportedConfig, check_fields, check_vocab_size)

# The reference's defaults (decepticons 0.1.3 CausalBankConfig) for the fields this file reads; a config.json
# may omit a field only where the reference's default applies.
DEFAULTS: dict[str, object] = {
    "embedding_dim": 32, "linear_modes": 256, "max_seq_len": 256, "linear_hidden": (128,),
    "linear_readout_kind": "mlp", "linear_readout_depth": 1, "linear_readout_num_experts": 4,
    "readout_bands": 1, "band_experts": (), "local_window": 8, "local_hidden": (128,), "local_scale": 0.25,
    "mix_mode": "additive", "share_embedding": False, "enable_linear": True, "enable_local": True,
    "substrate_mode": "frozen", "state_dim": 0, "state_impl": "scan", "num_heads": 1,
    "tied_readout_normalize": False,
}

# The type and valid range of every field the model reads (config_fields.py), checked after REFUSED (which
# names the reason a value is not served) and before the relational rules in check_supported. The choices
# of substrate_mode, linear_readout_kind and state_impl are REFUSED's.
FIELDS = {
    "embedding_dim": Int(1, MAX_WIDTH), "linear_modes": Int(1, MAX_WIDTH), "max_seq_len": Int(1, MAX_LENGTH),
    "linear_hidden": Ints(1, MAX_WIDTH, 16), "linear_readout_depth": Int(1, MAX_COUNT),
    # Experts and bands multiply (two modules per expert per band): 64 each bounds the build at 8192 modules.
    "linear_readout_num_experts": Int(0, 64),  # fewer than 2: an MLP readout, as in this port
    "readout_bands": Int(1, 64), "band_experts": Ints(0, 64, 64),
    "local_window": Int(1, MAX_WIDTH), "local_hidden": Ints(1, MAX_WIDTH, 16), "local_scale": Real(-1e6, 1e6),
    "mix_mode": OneOf(("additive", "gated")), "share_embedding": Flag(), "enable_linear": Flag(),
    "enable_local": Flag(), "state_dim": Int(0, MAX_WIDTH), "num_heads": Int(1, MAX_COUNT),
    "tied_readout_normalize": Flag(),
}

_false = (lambda v: not v, "it off")
_zero = (lambda v: v == 0, "0")
_one = (lambda v: v == 1, "1")

# field -> (accepts(value), what is required, why). A field not listed here either changes only
# initialisation or training (half-lives, seeds, learning-rate multipliers, noise) or is read by the model.
REFUSED: dict[str, tuple[Callable[[object], bool], str, str]] = {
    "substrate_mode": (lambda v: v in ("frozen", "learnable_decays", "learnable_mixing"),
                       "frozen, learnable_decays or learnable_mixing",
                       "the other substrates (learned_recurrence, gated_retention, gated_delta) are not ported yet"),
    "linear_readout_kind": (lambda v: v in ("mlp", "routed_sqrelu_experts", "tied_embed_readout", "tied_recursive"),
                            "mlp, routed_sqrelu_experts, tied_embed_readout or tied_recursive",
                            "the 'recurrent' readout runs a GRU over time, a second recurrent state not ported"),
    "oscillatory_frac": (*_zero, "damped-oscillator modes are not a per-mode real decay; not ported"),
    "num_blocks": (*_one, "stacked substrate blocks are not ported"),
    "state_impl": (lambda v: v == "scan", "scan", "hierarchical and retention state paths are not ported"),
    "patch_size": (*_one, "patch encoding predicts several bytes per position; not a causal LM step"),
    "patch_n": (*_one, "patch-at-readout predicts several bytes per position; not a causal LM step"),
    "patch_causal_decoder": (lambda v: v == "none", "none", "patch decoders are not ported"),
    "trust_routing": (*_false, "trust routing reads an n-gram table in numpy, per row; not batchable"),
    "memory_kind": (lambda v: v == "none", "none", "online n-gram memories run a Python loop per row and token"),
    "table_path": (lambda v: not v, "empty", "n-gram tables are not served"),
    "temporal_attention": (*_false, "its snapshot bank grows with the sequence (T/64), not fixed-size state"),
    "sticky_registers": (*_zero, "sticky registers are not ported"),
    "local_poly_order": (*_one, "polynomial local features are not ported"),
    "substrate_poly_order": (*_one, "polynomial substrate features are not ported"),
    "magnitude_normalize": (*_false, "substrate transforms are not ported"),
    "overwrite_gate": (*_false, "substrate transforms are not ported"),
    "mode_selector": (*_false, "substrate transforms are not ported"),
    "substrate_bank_router": (*_false, "substrate transforms are not ported"),
    "hash_memory": (*_false, "hash memory is not ported"),
    "complex_rotation": (*_false, "rotating substrates are not ported"),
    "lasso_rotation": (*_false, "rotating substrates are not ported"),
    "quaternion_rotation": (*_false, "rotating substrates are not ported"),
    "quintic_rotation": (*_false, "rotating substrates are not ported"),
    "so5_rotation": (*_false, "rotating substrates are not ported"),
    "adaptive_substrate": (*_false, "the adaptive complex substrate is not ported"),
    "position_signal": (*_false, "it feeds log(1+t) into gates of substrates that are not ported"),
}


def check_supported(fields: Mapping[str, object]) -> None:
    """Raise UnsupportedConfig for the first field outside the supported set (refused at model load)."""
    for name, (accepts, required, why) in REFUSED.items():
        if name in fields and not accepts(fields[name]):
            raise UnsupportedConfig(f"causal_bank.{name}={fields[name]!r} is not supported (needs {required}): {why}")
    check_fields("causal_bank", fields, FIELDS)
    value = lambda k: fields.get(k, DEFAULTS[k])
    if not value("enable_linear") and not value("enable_local"):
        raise UnsupportedConfig("causal_bank: enable_linear and enable_local are both off (the reference refuses it too)")
    if value("linear_readout_kind") in ("tied_embed_readout", "routed_sqrelu_experts", "tied_recursive"):
        if len(tuple(value("linear_hidden"))) != 1:
            raise UnsupportedConfig(f"causal_bank.linear_hidden={value('linear_hidden')!r}: the "
                                    f"{value('linear_readout_kind')} readout takes exactly one hidden width")
    if value("state_dim") % value("num_heads"):
        raise UnsupportedConfig(f"causal_bank.state_dim={value('state_dim')} must be a multiple of "
                                f"causal_bank.num_heads={value('num_heads')} (the reference refuses it too)")
    if value("enable_linear") and value("readout_bands") > value("linear_modes"):
        raise UnsupportedConfig(f"causal_bank.readout_bands={value('readout_bands')} is more than "
                                f"causal_bank.linear_modes={value('linear_modes')}: every band needs a mode")


@dataclasses.dataclass(frozen=True)
class CausalBankShape:
    """The sizes a served causal bank needs, from its `causal_bank` fields (after `check_supported`)."""

    MODULES: ClassVar[str] = "vllm_plasticity.architectures.causal_bank_modules:CausalBankModules"  # its builder (footprint.py)

    vocab_size: int
    embedding_dim: int
    linear_modes: int  # 0 when the linear path is off
    local_window: int  # 0 when the local path is off
    state_heads: int  # selective-scan state: heads x head_dim (0 x 0 when off)
    state_head_dim: int
    max_seq_len: int
    fields: dict

    @classmethod
    def from_fields(cls, fields: Mapping[str, object], vocab_size: int) -> "CausalBankShape":
        check_supported(fields)
        check_vocab_size("causal_bank", vocab_size)
        value = lambda k: fields.get(k, DEFAULTS[k])
        linear, local = bool(value("enable_linear")), bool(value("enable_local"))
        heads = max(int(value("num_heads")), 1)
        state_dim = int(value("state_dim")) if linear else 0
        return cls(vocab_size=int(vocab_size), embedding_dim=int(value("embedding_dim")),
                   linear_modes=int(value("linear_modes")) if linear else 0,
                   local_window=int(value("local_window")) if local else 0,
                   state_heads=heads if state_dim > 0 else 0,
                   state_head_dim=max(state_dim // heads, 1) if state_dim > 0 else 0,
                   max_seq_len=int(value("max_seq_len")), fields={**DEFAULTS, **dict(fields)})

    @property
    def linear_width(self) -> int:
        """Substrate modes followed by the linear path's embedding: the linear readout's input."""
        return self.linear_modes + self.embedding_dim if self.linear_modes else 0

    @property
    def local_width(self) -> int:
        """The local path's window of embeddings, oldest first: the local readout's input."""
        return self.local_window * self.embedding_dim

    @property
    def hidden_size(self) -> int:
        """The per-token stream: [substrate modes | linear embedding | local window]. Readout reads it and
        steering adds to it (layer 0, the model's only layer)."""
        return self.linear_width + self.local_width

    def state_shapes(self) -> list[tuple[int, ...]]:
        """Per-request recurrent state, fixed-size: substrate modes, selective-scan state, and the last
        local_window - 1 local embeddings. Never empty (vLLM allocates at least one tensor)."""
        shapes = [(max(self.linear_modes, 1),)]
        if self.state_heads:
            shapes.append((self.state_heads * self.state_head_dim,))
        if self.local_window > 1:
            shapes.append((self.local_window - 1, self.embedding_dim))
        return shapes
