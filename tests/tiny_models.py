"""A tiny model and its weights laid out the way vLLM holds them, for tests that need no server."""

from __future__ import annotations

from pathlib import Path

import pytest

from plasticity_training.default_model import ModelSpec, build_model
from plasticity_training.vllm_layouts import vllm_gather, vllm_layout, vllm_shard  # noqa: F401 (the tests' layouts)

TEXT = "\n\n".join(f"The {a} saw the {b} near the {c}." for a, b, c in
                   zip(["cat", "dog", "owl"] * 30, ["river", "tree", "gate"] * 30, ["hill", "barn", "lake"] * 30))
TINY_SPEC = ModelSpec(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, train_steps=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random-init 2-layer Llama (HF layout) in a temporary directory."""
    return build_model(TINY_SPEC, tmp_path_factory.mktemp("tiny") / "m", text=TEXT, log=lambda m: None)
