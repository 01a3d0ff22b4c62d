"""The causal bank served by vLLM: `CausalBankForCausalLM`, registered by `vllm_plasticity.register`.

Runs in vLLM's worker process. The maths is causal_bank_modules.py (what the Hugging Face form runs); the
vLLM side (state slots, readout tap, weight loading and sharing) is recurrent_vllm.py.
"""

from __future__ import annotations

from vllm.model_executor.models.interfaces import IsAttentionFree

from vllm_plasticity.architectures.causal_bank_config import CausalBankShape
from vllm_plasticity.architectures.causal_bank_modules import CausalBankModules
from vllm_plasticity.architectures.recurrent_vllm import RecurrentForCausalLM


class CausalBankForCausalLM(CausalBankModules, RecurrentForCausalLM, IsAttentionFree):
    field = "causal_bank"
    shape_class = CausalBankShape
    # In the reference's state dicts but not needed: the T x T kernel (the recurrence replaces it), its
    # index buffer, and the tied readout's alias of the embedding.
    skipped_weights = ("linear_kernel", "_kernel_time_idx", "._embedding_weight")
