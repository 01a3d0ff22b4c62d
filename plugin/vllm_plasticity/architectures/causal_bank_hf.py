"""The causal bank as a Hugging Face causal LM (model_type "causal_bank"): the full-sequence form the
trainer runs on views of the served weights, extraction reads activations from, and tests compare with.
Everything but the names is in recurrent_hf.py (shared by the project's recurrent architectures).

    >>> vllm_plasticity.architectures.register_with_transformers()
    >>> model = AutoModelForCausalLM.from_pretrained(model_dir)   # `plasticity import causal-bank` output
"""

from __future__ import annotations

from vllm_plasticity.architectures.causal_bank_config import CausalBankShape
from vllm_plasticity.architectures.causal_bank_modules import CausalBankModules
from vllm_plasticity.architectures.recurrent_hf import RecurrentConfig, RecurrentForCausalLM

MODEL_TYPE = "causal_bank"


class CausalBankConfig(RecurrentConfig):
    """config.json of a served causal bank: `causal_bank` holds every decepticons CausalBankConfig field."""

    model_type = MODEL_TYPE
    field = "causal_bank"
    shape_class = CausalBankShape

    def __init__(self, vocab_size: int = 256, **kwargs) -> None:  # transformers needs each config class's own
        super().__init__(vocab_size, **kwargs)


class CausalBankForCausalLM(CausalBankModules, RecurrentForCausalLM):
    config_class = CausalBankConfig
