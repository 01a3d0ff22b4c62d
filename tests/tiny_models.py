"""A tiny model and its weights laid out the way vLLM holds them, for tests that need no server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plasticity_training.default_model import ModelSpec, build_model

TEXT = "\n\n".join(f"The {a} saw the {b} near the {c}." for a, b, c in
                   zip(["cat", "dog", "owl"] * 30, ["river", "tree", "gate"] * 30, ["hill", "barn", "lake"] * 30))
TINY_SPEC = ModelSpec(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, train_steps=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random-init 2-layer Llama (HF layout) in a temporary directory."""
    return build_model(TINY_SPEC, tmp_path_factory.mktemp("tiny") / "m", text=TEXT, log=lambda m: None)


def vllm_layout(model_dir: Path, pad_vocab_to: int | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under vLLM's names, fused as vLLM fuses them (q|k|v, gate|up); optionally
    the vocabulary rows padded with junk, as vLLM pads them."""
    hf = load_file(str(Path(model_dir) / "model.safetensors"))
    out = {}
    for name, t in hf.items():
        if ".q_proj." in name:
            k, v = hf[name.replace("q_proj", "k_proj")], hf[name.replace("q_proj", "v_proj")]
            out[name.replace("q_proj", "qkv_proj")] = torch.cat([t, k, v]).clone()
        elif ".gate_proj." in name:
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([t, hf[name.replace("gate_proj", "up_proj")]]).clone()
        elif not any(s in name for s in (".k_proj.", ".v_proj.", ".up_proj.")):
            out[name] = t.clone()
    if pad_vocab_to:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in out:
                t = out[name]
                out[name] = torch.cat([t, torch.randn(pad_vocab_to - t.shape[0], t.shape[1])])
    return out
