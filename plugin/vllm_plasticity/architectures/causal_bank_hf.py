"""The causal bank as a Hugging Face causal LM (model_type "causal_bank"): the full-sequence form the
trainer runs on views of the served weights, extraction reads activations from, and tests compare with.

Imports torch and transformers, never vLLM. `register_with_transformers()` makes AutoConfig /
AutoModelForCausalLM know the type, so a model directory from `plasticity import causal-bank` or
`plasticity default-model --arch causal-bank` loads like any other:

    >>> register_with_transformers()
    >>> model = AutoModelForCausalLM.from_pretrained(model_dir)
    >>> out = model(input_ids=ids, use_cache=True)                 # logits (B, T, V); states to continue
    >>> model(input_ids=more, past_key_values=out.past_key_values)  # continues, as decode does

Shape of the model for tools written for transformers: one decoder "layer" (`model.layers[0]`, no
parameters of its own) whose output is the stream (CausalBankModules.stream), so hidden_size is the
stream's width, num_hidden_layers is 1, and a forward hook on layers[0] sees what the server's readout
reads. Parameter names are the reference's (no prefix: `base_model_prefix` is empty).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from vllm_plasticity.architectures.causal_bank_config import CausalBankShape
from vllm_plasticity.architectures.causal_bank_modules import CausalBankModules

MODEL_TYPE = "causal_bank"
ARCHITECTURE = "CausalBankForCausalLM"


class CausalBankConfig(PretrainedConfig):
    """config.json of a served causal bank: `causal_bank` holds every decepticons CausalBankConfig field."""

    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 256, causal_bank: dict | None = None, **kwargs) -> None:
        self.vocab_size = vocab_size
        self.causal_bank = dict(causal_bank or {})
        shape = CausalBankShape.from_fields(self.causal_bank, vocab_size)
        # Read by vLLM (context length, hidden width) and by tools that expect a decoder's config.
        self.hidden_size = shape.hidden_size
        self.num_hidden_layers = 1
        kwargs.setdefault("max_position_embeddings", shape.max_seq_len)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def shape(self) -> CausalBankShape:
        return CausalBankShape.from_fields(self.causal_bank, self.vocab_size)


class StreamLayer(nn.Module):
    """The one "decoder layer": ids and states in, the stream out (hooks on it see the readout's state)."""

    def __init__(self, owner: "CausalBankForCausalLM") -> None:
        super().__init__()
        self.__dict__["owner"] = owner  # not a submodule: the parameters keep the reference's names

    def forward(self, ids: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.owner.stream(ids, states)


class CausalBankForCausalLM(CausalBankModules, PreTrainedModel):
    config_class = CausalBankConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules: list[str] = []

    def __init__(self, config: CausalBankConfig) -> None:
        super().__init__(config)
        self.build_causal_bank(config.shape)
        self.layers = nn.ModuleList([StreamLayer(self)])
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # weights come from the checkpoint (or the builder): never re-initialise them here

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: list[torch.Tensor] | None = None, use_cache: bool = False,
                labels: torch.Tensor | None = None, output_hidden_states: bool = False, **_) -> CausalLMOutputWithPast:
        """Right padding only (positions after a row's last real token never reach earlier ones: causal)."""
        states = past_key_values if past_key_values is not None else self.zero_states(input_ids.shape[0], input_ids.device)
        hidden, states = self.layers[0](input_ids, states)
        logits = self.logits(hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=states if use_cache else None,
                                      hidden_states=(hidden,) if output_hidden_states else None)


def register_with_transformers() -> None:
    """Let AutoConfig / AutoModelForCausalLM load model_type "causal_bank" (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(MODEL_TYPE, CausalBankConfig)
        AutoModelForCausalLM.register(CausalBankConfig, CausalBankForCausalLM)
    except ValueError:
        pass  # already registered in this process
