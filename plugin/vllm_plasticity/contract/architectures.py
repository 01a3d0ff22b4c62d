"""Every architecture plasticity serves, in one table that both sides read.

Any process; standard library only. Everything that differs between architectures and is needed outside an
architecture's own files is a field of its row here, and each user derives what it needs from the table:

    vllm_plasticity.register()        registers every `vllm_class` with vLLM's ModelRegistry
    architectures.register_with_transformers()   registers every `hf_form` with transformers' Auto classes
    plasticity serve (cli.py)         serves a checkpoint of a stock architecture as the row that `extends` it
    plasticity default-model --arch   offers every `builtin` (built by default_model.build_model)
    hf_view.build_hf_view             fused views for stock forms, same-name views for the project's (`hf_form`)
    contract.settings.param_kind      the parameters of kind "embeddings" (`embeddings`)

Adding an architecture is a row here and its own files (DESIGN.md, "Adding an architecture"). Paths are
"module:Class" strings, so reading the table imports nothing: a `builtin` names a training-side class that
only the training side loads.

    >>> architecture("CausalBankForCausalLM").model_type
    'causal_bank'
"""

from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str  # what vLLM's ModelRegistry knows it by: config.json's "architectures" entry (or the override)
    vllm_class: str  # "module:Class" of the served form, loaded only in the process that builds the model
    model_type: str  # config.json's model_type
    extends: str | None = None  # the stock architecture whose checkpoints are served as this subclass
    hf_form: str | None = None  # "module:Class" of the project's Hugging Face form; None: transformers ships it
    # Parameter-name prefixes of the embedding tables (kind "embeddings" in /train's parameter filter).
    embeddings: tuple[str, ...] = ("model.embed_tokens", "lm_head")
    builtin: str | None = None  # "module:Spec" of its built-in model (`plasticity default-model --arch`)


_PLUGIN, _ARCHS, _TRAINING = "vllm_plasticity.models", "vllm_plasticity.architectures", "plasticity_training"

REGISTRY: tuple[Architecture, ...] = (
    # vLLM's own models, subclassed so their weights can stay shareable in place (models.py).
    Architecture("PlasticityLlamaForCausalLM", f"{_PLUGIN}:PlasticityLlamaForCausalLM", "llama",
                 extends="LlamaForCausalLM", builtin=f"{_TRAINING}.default_model:ModelSpec"),
    Architecture("PlasticityQwen2ForCausalLM", f"{_PLUGIN}:PlasticityQwen2ForCausalLM", "qwen2",
                 extends="Qwen2ForCausalLM"),
    Architecture("PlasticityQwen3ForCausalLM", f"{_PLUGIN}:PlasticityQwen3ForCausalLM", "qwen3",
                 extends="Qwen3ForCausalLM"),
    Architecture("PlasticityQwen3NextForCausalLM", f"{_PLUGIN}:PlasticityQwen3NextForCausalLM", "qwen3_next",
                 extends="Qwen3NextForCausalLM"),  # Gated DeltaNet hybrid (bfloat16 on CPU)
    Architecture("PlasticityQwen3_5ForCausalLM", f"{_PLUGIN}:PlasticityQwen3_5ForCausalLM", "qwen3_5_text",
                 extends="Qwen3_5ForCausalLM"),  # Qwen 3.5 dense, the same hybrid
    Architecture("PlasticityQwen3_5MoeForCausalLM", f"{_PLUGIN}:PlasticityQwen3_5MoeForCausalLM", "qwen3_5_moe_text",
                 extends="Qwen3_5MoeForCausalLM"),  # Qwen 3.5 with experts
    Architecture("PlasticityQwen3_5ForConditionalGeneration", f"{_PLUGIN}:PlasticityQwen3_5ForConditionalGeneration",
                 "qwen3_5", extends="Qwen3_5ForConditionalGeneration"),  # Qwen 3.5 as released: its text model
    Architecture("PlasticityQwen3_5MoeForConditionalGeneration",
                 f"{_PLUGIN}:PlasticityQwen3_5MoeForConditionalGeneration", "qwen3_5_moe",
                 extends="Qwen3_5MoeForConditionalGeneration"),  # Qwen 3.5 MoE as released: its text model
    # Architectures stock vLLM cannot serve, written in this project (architectures/).
    Architecture("CausalBankForCausalLM", f"{_ARCHS}.causal_bank_vllm:CausalBankForCausalLM", "causal_bank",
                 hf_form=f"{_ARCHS}.causal_bank_hf:CausalBankForCausalLM",
                 embeddings=("linear_embedding", "local_embedding"),
                 builtin=f"{_TRAINING}.default_causal_bank:CausalBankSpec"),
    Architecture("TKCForCausalLM", f"{_ARCHS}.tkc_vllm:TKCForCausalLM", "tkc",
                 hf_form=f"{_ARCHS}.tkc_hf:TKCForCausalLM", embeddings=("embed",),
                 builtin=f"{_TRAINING}.default_tkc:TKCSpec"),
    Architecture("SyntheForCausalLM", f"{_ARCHS}.synthe_vllm:SyntheForCausalLM", "synthe",
                 hf_form=f"{_ARCHS}.synthe_hf:SyntheForCausalLM", embeddings=("embedding", "pos_embedding"),
                 builtin=f"{_TRAINING}.default_synthe:SyntheSpec"),
)


def served_names() -> str:
    """Every row, a stock one by the name its checkpoints carry: what refusal messages list as servable."""
    return ", ".join(arch.extends or arch.name for arch in REGISTRY)


def architecture(name: str) -> Architecture:
    """The row registered as `name`; KeyError naming the registered ones otherwise."""
    for arch in REGISTRY:
        if arch.name == name:
            return arch
    raise KeyError(f"{name!r} is not a registered architecture (registered: {[a.name for a in REGISTRY]})")


def of_model_type(model_type: str) -> Architecture:
    """The row whose config.json model_type is `model_type`; KeyError naming the registered ones otherwise."""
    for arch in REGISTRY:
        if arch.model_type == model_type:
            return arch
    raise KeyError(f"model type {model_type!r} is not registered (registered: {[a.model_type for a in REGISTRY]})")


def is_embedding(name: str) -> bool:
    """Whether parameter `name` (HF's or vLLM's name: both keep these prefixes) is a registered embedding table."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in _EMBEDDINGS)


def load(path: str):
    """The object a "module:Name" path names (imports its module)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


_EMBEDDINGS = frozenset(prefix for arch in REGISTRY for prefix in arch.embeddings)
