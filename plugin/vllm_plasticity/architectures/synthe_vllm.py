"""SYNTHE served by vLLM: `SyntheForCausalLM`, registered by `vllm_plasticity.register`.

Runs in vLLM's worker process. The maths is synthe_modules.py (what the Hugging Face form runs); the vLLM
side (state slots holding every block's recurrent state, the probe's window and the memory hub, readout
tap, weight loading and sharing) is recurrent_vllm.py.
"""

from __future__ import annotations

from vllm_plasticity.architectures.recurrent_vllm import RecurrentForCausalLM
from vllm_plasticity.architectures.synthe_config import SyntheShape
from vllm_plasticity.architectures.synthe_modules import SyntheModules


class SyntheForCausalLM(SyntheModules, RecurrentForCausalLM):
    field = "synthe"
    shape_class = SyntheShape
