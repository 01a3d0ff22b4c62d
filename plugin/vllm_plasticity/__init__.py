"""vllm_plasticity: a vLLM plugin that trains, reads out and steers the model it serves.

`register()` is the `vllm.general_plugins` entry point. vLLM calls it in every process it starts (API
server, engine core, workers, model-inspection subprocesses), so it is cheap and idempotent: it makes the
processes vLLM starts die with their parent (parent_death.py: a SIGKILLed API server takes its engine core
and workers along), imports vLLM lazily, registers this project's architectures by "module:Class" string
(the classes load only in the process that builds the model), and does nothing when PLASTICITY_DISABLE=1.

    $ plasticity serve                   # the built-in model, plugin fully enabled
    $ VLLM_PLUGINS=plasticity vllm serve MODEL \\
        --hf-overrides '{"architectures": ["PlasticityLlamaForCausalLM"]}' \\
        --worker-extension-cls vllm_plasticity.worker_extension.PlasticityWorkerExtension
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

# Base Hugging Face architecture -> the registered subclass that keeps weights shareable in place.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "PlasticityLlamaForCausalLM",
    "Qwen2ForCausalLM": "PlasticityQwen2ForCausalLM",
    "Qwen3ForCausalLM": "PlasticityQwen3ForCausalLM",
    "Qwen3NextForCausalLM": "PlasticityQwen3NextForCausalLM",  # Gated DeltaNet hybrid (bfloat16 on CPU)
}
# Architectures stock vLLM cannot serve, written in this project (plugin/vllm_plasticity/architectures/):
# registered name -> (vLLM class "module:Class", transformers model_type registered for the same model).
CUSTOM_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "CausalBankForCausalLM": ("vllm_plasticity.architectures.causal_bank_vllm:CausalBankForCausalLM", "causal_bank"),
    "TKCForCausalLM": ("vllm_plasticity.architectures.tkc_vllm:TKCForCausalLM", "tkc"),
    "SyntheForCausalLM": ("vllm_plasticity.architectures.synthe_vllm:SyntheForCausalLM", "synthe"),
}
# Every architecture the plugin serves with training, readout and steering.
SERVED_ARCHITECTURES = frozenset(ARCHITECTURES.values()) | frozenset(CUSTOM_ARCHITECTURES)
WORKER_EXTENSION = "vllm_plasticity.worker_extension.PlasticityWorkerExtension"


def register() -> None:
    """Register the project's architectures with vLLM's ModelRegistry (idempotent)."""
    if os.environ.get("PLASTICITY_DISABLE") == "1":
        return
    from vllm_plasticity.parent_death import die_with_parent

    die_with_parent()
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for name in ARCHITECTURES.values():
        if name not in supported:
            ModelRegistry.register_model(name, f"vllm_plasticity.models:{name}")
    if CUSTOM_ARCHITECTURES:
        # vLLM reads config.json with transformers' AutoConfig (the model types must be known to it), and
        # applies MODELS_CONFIG_MAP's hook per architecture: ours turns prefix caching off and sizes the
        # per-request state block (architectures/recurrent_layer.py). The hook module is light (no model code).
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP

        from vllm_plasticity.architectures import register_with_transformers
        from vllm_plasticity.architectures.recurrent_config import RecurrentModelConfig

        register_with_transformers()
        for name, (target, _) in CUSTOM_ARCHITECTURES.items():
            if name not in supported:
                ModelRegistry.register_model(name, target)
            MODELS_CONFIG_MAP.setdefault(name, RecurrentModelConfig)
