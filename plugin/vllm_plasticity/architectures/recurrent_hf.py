"""The Hugging Face form every project recurrent architecture shares: a PreTrainedModel whose one "decoder
layer" is the architecture's stream, so transformers tools, the trainer's view and extraction treat it like
a decoder. Imports torch and transformers, never vLLM.

An architecture subclasses `RecurrentConfig` (its model_type, the name of its config.json field, its shape
class) and `RecurrentForCausalLM` together with its modules mixin, which provides
`build(shape)`, `stream(ids, states)`, `logits(hidden)`, `zero_states(rows, device)`, `frozen_parameters`.

    >>> out = model(input_ids=ids, use_cache=True)                 # logits (B, T, V); states to continue
    >>> model(input_ids=more, past_key_values=out.past_key_values)  # continues, as decode does

`past_key_values` is the list of per-request state tensors (the same ones vLLM keeps per request), so the
trainer's no_grad context mode and step-by-step tests work. Right padding only: the stream is causal, so
positions after a row's last real token never reach earlier ones. Parameter names carry no prefix
(`base_model_prefix` is empty): they are the reference's, and vLLM's.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from vllm_plasticity.architectures.footprint import require_fits_in_host_memory


class RecurrentConfig(PretrainedConfig):
    """config.json of a project recurrent architecture: its own fields live under `field` (a dict).

    A subclass must define `__init__(self, vocab_size=256, **kwargs)` calling this one: transformers gives a
    config class without its own __init__ a generated one that would skip this."""

    # Class attributes, not annotated (transformers turns annotated config attributes into required fields):
    field = ""  # the config.json field of the architecture's own settings, e.g. "causal_bank"
    shape_class = None  # from_fields(fields, vocab_size) -> shape with hidden_size, max_seq_len

    def __init__(self, vocab_size: int = 256, **kwargs) -> None:
        self.vocab_size = vocab_size
        fields = dict(kwargs.pop(self.field, None) or {})
        setattr(self, self.field, fields)
        shape = self.shape_class.from_fields(fields, vocab_size)
        # Read by vLLM (context length, hidden width) and by tools that expect a decoder's config; set after
        # the base class's __init__, which keeps only the keyword arguments it knows.
        max_positions = kwargs.pop("max_position_embeddings", shape.max_seq_len)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.hidden_size = shape.hidden_size
        self.num_hidden_layers = 1
        self.max_position_embeddings = max_positions

    @property
    def shape(self):
        return self.shape_class.from_fields(getattr(self, self.field), self.vocab_size)


class StreamLayer(nn.Module):
    """The one "decoder layer": ids and states in, the stream out (hooks on it see the readout's state)."""

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        self.__dict__["owner"] = owner  # not a submodule: the parameters keep the reference's names

    def forward(self, ids: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.owner.stream(ids, states)


class RecurrentForCausalLM(PreTrainedModel):
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules: list[str] = []

    def __init__(self, config: RecurrentConfig) -> None:
        super().__init__(config)
        require_fits_in_host_memory(config.shape)  # refused with the figure before anything is allocated
        self.build(config.shape)
        self.layers = nn.ModuleList([StreamLayer(self)])
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # weights come from the checkpoint (or the builder): never re-initialise them here

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: list[torch.Tensor] | None = None, use_cache: bool = False,
                labels: torch.Tensor | None = None, output_hidden_states: bool = False, **_) -> CausalLMOutputWithPast:
        states = past_key_values if past_key_values is not None else self.zero_states(input_ids.shape[0], input_ids.device)
        hidden, states = self.layers[0](input_ids, states)
        logits = self.logits(hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=states if use_cache else None,
                                      hidden_states=(hidden,) if output_hidden_states else None)


def register(config_class: type, model_class: type) -> None:
    """Let AutoConfig / AutoModelForCausalLM load `config_class.model_type` (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(config_class.model_type, config_class)
        AutoModelForCausalLM.register(config_class, model_class)
    except ValueError:
        pass  # already registered in this process
