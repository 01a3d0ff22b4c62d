"""Transformer Killer Core served by vLLM: `TKCForCausalLM`, registered by `vllm_plasticity.register`.

Runs in vLLM's worker process. The maths is tkc_modules.py (what the Hugging Face form runs); the vLLM
side (state slots holding the backbone state and the whole DualTierMiras memory, readout tap, weight
loading and sharing) is recurrent_vllm.py.
"""

from __future__ import annotations

from vllm.model_executor.models.interfaces import IsAttentionFree

from vllm_plasticity.architectures.recurrent_vllm import RecurrentForCausalLM
from vllm_plasticity.architectures.tkc_config import TKCShape
from vllm_plasticity.architectures.tkc_modules import TKCModules


class TKCForCausalLM(TKCModules, RecurrentForCausalLM, IsAttentionFree):
    field = "tkc"
    shape_class = TKCShape
