"""Architectures stock vLLM cannot serve, written in this project (DESIGN.md "Custom architectures").

Each has a torch-only maths module (shared by both forms), a Hugging Face form (training, extraction,
tests; imports transformers, never vLLM) and a vLLM form (serving; built on recurrent_layer.py). This
package's __init__ imports neither vLLM nor torch-heavy modules until asked.
"""

from __future__ import annotations


def register_with_transformers() -> None:
    """Make transformers' Auto classes know every project model type (idempotent, cheap)."""
    from vllm_plasticity.architectures.causal_bank_hf import register_with_transformers as causal_bank
    from vllm_plasticity.architectures.synthe_hf import register_with_transformers as synthe
    from vllm_plasticity.architectures.tkc_hf import register_with_transformers as tkc

    causal_bank()
    synthe()
    tkc()
