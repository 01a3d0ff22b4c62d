"""Transformer Killer Core as a Hugging Face causal LM (model_type "tkc"): the full-sequence form (memory
written causally per token) the trainer runs, extraction reads and tests compare the server with.
Everything but the names is in recurrent_hf.py."""

from __future__ import annotations

from vllm_plasticity.architectures.recurrent_hf import RecurrentConfig, RecurrentForCausalLM
from vllm_plasticity.architectures.tkc_config import TKCShape
from vllm_plasticity.architectures.tkc_modules import TKCModules

MODEL_TYPE = "tkc"


class TKCConfig(RecurrentConfig):
    """config.json of a served TKC model: `tkc` holds its fields (tkc_config.DEFAULTS for the rest)."""

    model_type = MODEL_TYPE
    field = "tkc"
    shape_class = TKCShape

    def __init__(self, vocab_size: int = 256, **kwargs) -> None:  # transformers needs each config class's own
        kwargs.pop("mamba_chunk_size", None)  # derived below, never a setting of its own
        super().__init__(vocab_size, **kwargs)
        # vLLM's Mamba2 kernels read their chunk size here (else 2048): the same chunks as the HF form's scan.
        self.mamba_chunk_size = int(self.shape.fields["mamba_chunk_size"])


class TKCForCausalLM(TKCModules, RecurrentForCausalLM):
    config_class = TKCConfig
