"""The built-in SYNTHE model: a byte-level SYNTHE (two blocks, the probe gated causally) trained here on the
project's own text. `plasticity default-model --arch synthe`.

    >>> path = default_model_path(SyntheSpec())                      # built once (a few minutes on 2 cores), cached
    >>> raw = build_model(SyntheSpec(train_steps=0), "/tmp/synthe")  # random init, for parity tests

Smaller than the reference's `tiny()` (d_model 256, 4 blocks): its per-token recurrences run as Python loops
on CPU. Same spec, same text, same machine: same bytes (fixed seeds and thread count, deterministic algorithms).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from plasticity_training.default_byte_model import ByteModelSpec


@dataclasses.dataclass(frozen=True)
class SyntheSpec(ByteModelSpec):
    """Everything that determines the built model; saved beside it as `plasticity_spec.json`."""

    architecture: ClassVar[str] = "SyntheForCausalLM"
    name: ClassVar[str] = "synthe"
    summary: ClassVar[str] = "a byte-level SYNTHE (2 blocks, attention probe gated causally)"

    d_model: int = 64
    n_blocks: int = 2
    n_heads: int = 2  # head size 32: the probe's attention runs on vLLM's kernels (CPU: 32 and up)
    wiener_state_dim: int = 16
    tier_dims: tuple[int, int, int] = (64, 32, 16)
    probe_window: int = 32
    probe_gate: str = "causal"
    probe_threshold: float = 0.35
    memory_hub: bool = True  # False: the hub adds nothing (synthe_config.py; research/results/synthe_memory.md)
    min_depth: int | None = None  # the first block the router scales; None: min(2, n_blocks - 1); n_blocks: none
    max_seq_len: int = 512
    reference_init: bool = True  # the reference's N(0, 0.02) weights; False: PyTorch's defaults (larger, so
    #                               parity tests see every part's effect well above their tolerance)
    train_steps: int = 120  # 0 = random init (fast, for parity tests)
    seq_len: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0

    def fields(self) -> dict:
        t1, t2, t3 = self.tier_dims
        return {"d_model": self.d_model, "n_blocks": self.n_blocks, "n_heads": self.n_heads,
                "wiener_state_dim": self.wiener_state_dim, "tier1_dim": t1, "tier2_dim": t2, "tier3_dim": t3,
                "probe_window": self.probe_window, "probe_gate": self.probe_gate,
                "probe_threshold": self.probe_threshold, "max_seq_len": self.max_seq_len,
                "router_hidden": 16, "memory_hub": self.memory_hub,
                "min_depth": min(2, self.n_blocks - 1) if self.min_depth is None else self.min_depth}

    def initialise(self, model) -> None:
        if self.reference_init:
            model.reference_init()

    def describe(self, tokenizer) -> str:
        return (f"byte vocabulary, {self.n_blocks} blocks, probe {self.probe_gate} over {self.probe_window} tokens")
