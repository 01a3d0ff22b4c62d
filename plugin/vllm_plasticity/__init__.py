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

from vllm_plasticity.contract.architectures import REGISTRY

__version__ = "0.1.0"

# Derived from the one architecture table (contract/architectures.py), for the CLI and the worker extension:
# a stock Hugging Face architecture -> the registered subclass that keeps weights shareable in place, and
# every architecture the plugin serves with training, readout and steering.
ARCHITECTURES: dict[str, str] = {arch.extends: arch.name for arch in REGISTRY if arch.extends}
SERVED_ARCHITECTURES = frozenset(arch.name for arch in REGISTRY)
WORKER_EXTENSION = "vllm_plasticity.worker_extension.PlasticityWorkerExtension"


def register() -> None:
    """Register the project's architectures with vLLM's ModelRegistry (idempotent)."""
    if os.environ.get("PLASTICITY_DISABLE") == "1":
        return
    from vllm_plasticity.parent_death import die_with_parent

    die_with_parent()
    from vllm import ModelRegistry

    from vllm_plasticity.vllm_patches import compile_key_without_local_path, qwen3_5_importable

    qwen3_5_importable()  # Qwen 3.5 (stock or the plugin's subclass) starts without torchvision
    compile_key_without_local_path(serves_itself)  # a restart from a checkpoint reuses the compiled graph

    supported = set(ModelRegistry.get_supported_archs())
    for arch in REGISTRY:
        if arch.name not in supported:
            ModelRegistry.register_model(arch.name, arch.vllm_class)
    own = [arch.name for arch in REGISTRY if arch.hf_form]  # the project's own architectures
    if own:
        # vLLM reads config.json with transformers' AutoConfig (the model types must be known to it), and
        # applies MODELS_CONFIG_MAP's hook per architecture: ours turns prefix caching off and sizes the
        # per-request state block (architectures/recurrent_layer.py). The hook module is light (no model code).
        from vllm_plasticity.architectures import register_with_transformers
        from vllm_plasticity.architectures.recurrent_config import RecurrentModelConfig
        from vllm_plasticity.vllm_patches import register_config_hook

        register_with_transformers()
        for name in own:
            register_config_hook(name, RecurrentModelConfig)


def serves_itself(model_config) -> bool:
    """Whether a vLLM ModelConfig names one of the architectures this plugin serves."""
    return bool(SERVED_ARCHITECTURES.intersection(getattr(model_config.hf_config, "architectures", None) or ()))
