"""SYNTHE as a Hugging Face causal LM (model_type "synthe"): the full-sequence form the trainer runs,
extraction reads and tests compare the server with. Everything but the names is in recurrent_hf.py."""

from __future__ import annotations

from vllm_plasticity.architectures.recurrent_hf import RecurrentConfig, RecurrentForCausalLM
from vllm_plasticity.architectures.synthe_config import SyntheShape
from vllm_plasticity.architectures.synthe_modules import SyntheModules

MODEL_TYPE = "synthe"


class SyntheConfig(RecurrentConfig):
    """config.json of a served SYNTHE model: `synthe` holds its fields (synthe_config.DEFAULTS for the rest)."""

    model_type = MODEL_TYPE
    field = "synthe"
    shape_class = SyntheShape

    def __init__(self, vocab_size: int = 256, **kwargs) -> None:  # transformers needs each config class's own
        super().__init__(vocab_size, **kwargs)
        # The probe's attention shape, read by vLLM to size its paged KV cache (one head size, no GQA).
        shape = self.shape
        self.num_attention_heads = self.num_key_value_heads = shape.n_heads
        self.head_dim = shape.head_dim


class SyntheForCausalLM(SyntheModules, RecurrentForCausalLM):
    config_class = SyntheConfig
