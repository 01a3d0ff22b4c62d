"""Architectures stock vLLM cannot serve, written in this project (DESIGN.md "Custom architectures").

Each has a torch-only maths module (shared by both forms), a Hugging Face form (training, extraction,
tests; imports transformers, never vLLM) and a vLLM form (serving; built on recurrent_layer.py), and a row
in contract/architectures.py that names both. This package's __init__ imports neither vLLM nor torch-heavy
modules until asked.
"""

from __future__ import annotations

from vllm_plasticity.contract.architectures import REGISTRY, load


def register_with_transformers() -> None:
    """Make transformers' Auto classes know every project model type in the registry (idempotent, cheap)."""
    from vllm_plasticity.architectures.recurrent_hf import register

    for arch in REGISTRY:
        if arch.hf_form:
            model_class = load(arch.hf_form)
            register(model_class.config_class, model_class)
