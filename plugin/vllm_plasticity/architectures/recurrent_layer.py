"""The one way in for recurrent architectures: per-request, fixed-size state in vLLM's own state-space
machinery, so an architecture supplies only its maths.

Runs in vLLM's worker process. An architecture (the model module, or a part of it with its own state) provides

    recurrent_state_shapes() -> list[tuple[int, ...]]       fp32 state per request, fixed-size
    zero_states(rows, device) -> [(rows, *shape)]           a fresh request's state
    stream(inputs (R, L, ...), states [(R, *shape)]) -> (outputs (R, L, W), new states)
    signal_names() -> list[str]                             optional: per-token signals; when the layer is
                                                            built with signals=True it calls
                                                            stream(..., signals=True), whose output rows
                                                            are the hidden state followed by the signals

and puts a `RecurrentStateLayer` in its model. The inputs are whatever the model feeds the layer per token
(token ids for a whole-model stream; hidden states for one block of a model that runs vLLM attention
layers between its recurrent ones, as SYNTHE does), the outputs `W` columns per token. The layer is a `MambaBase` (vLLM allocates one state slot
per running request from `get_state_shape`/`get_state_dtype`, like Mamba's conv/ssm state) using the
LINEAR attention backend's metadata (`state_indices_tensor`, `query_start_loc`, `seq_lens`, decodes
first). Each step it:
  * runs every decoding request together, one token each, from its slot: a batched O(1) step, so decode
    cost per token does not grow with the context;
  * runs each prefill (or chunk of one) with the architecture's parallel form, starting from zero state
    when the request has no earlier tokens (a reused slot holds another request's state) and from its slot
    otherwise, so chunked prefill continues exactly;
  * writes each request's final state back to its slot.
The op is a vLLM custom op (`plasticity::recurrent_stream`, registered in `static_forward_context`)
marked to break CUDA-graph capture, as vLLM's own linear-attention layers are.

recurrent_config.py holds the config hook vLLM applies to these architectures (prefix caching off, one
state block per request).
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.compilation.breakable_cudagraph import eager_break_during_capture
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

class RecurrentStateLayer(MambaBase, nn.Module):
    """Per-request state for `architecture` (see the module docstring for what it provides)."""

    def __init__(self, architecture: nn.Module, prefix: str, vllm_config: VllmConfig, signals: bool = False) -> None:
        super().__init__()
        self.__dict__["architecture"] = architecture  # not a submodule: its parameters keep their names
        self.prefix = prefix
        self.options = {"signals": True} if signals else {}
        self.shapes = [tuple(s) for s in architecture.recurrent_state_shapes()]
        context = vllm_config.compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        context[prefix] = self

    # ---- what vLLM allocates ------------------------------------------------------------------------
    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        return tuple(self.shapes)

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return (torch.float32,) * len(self.shapes)  # recurrences accumulate: fp32 whatever the weights

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.LINEAR

    # ---- one step --------------------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        torch.ops.plasticity.recurrent_stream(inputs, output, self.prefix)

    def run(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        arch = self.architecture
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(self.prefix)
        if metadata is None:  # a profiling / dummy run: no requests, no slots
            hidden, _ = arch.stream(inputs[None], arch.zero_states(1, inputs.device), **self.options)
            output.copy_(hidden[0].to(output.dtype))
            return
        states = self.kv_cache  # one tensor per state shape, (slots, *shape)
        slots = metadata.state_indices_tensor
        decodes, tokens = metadata.num_decodes, metadata.num_decode_tokens + metadata.num_prefill_tokens
        output[tokens:].zero_()  # padding rows, if any
        if decodes:
            index = slots[:decodes].long()
            hidden, new = arch.stream(inputs[:decodes, None], [s[index] for s in states], **self.options)
            output[:decodes] = hidden[:, 0].to(output.dtype)
            for s, n in zip(states, new):
                s[index] = n
        starts = metadata.query_start_loc.tolist()
        seq_lens = metadata.seq_lens.tolist()
        for r in range(decodes, decodes + metadata.num_prefills):
            start, end = starts[r], starts[r + 1]
            slot = slots[r:r + 1].long()
            fresh = seq_lens[r] == end - start  # no earlier tokens: the slot may hold a finished request's state
            initial = arch.zero_states(1, inputs.device) if fresh else [s[slot] for s in states]
            hidden, new = arch.stream(inputs[None, start:end], initial, **self.options)
            output[start:end] = hidden[0].to(output.dtype)
            for s, n in zip(states, new):
                s[slot] = n


@eager_break_during_capture
def _recurrent_stream(inputs: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    get_forward_context().no_compile_layers[layer_name].run(inputs, output)


def _recurrent_stream_fake(inputs: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    return None


from torch.library import Library  # noqa: E402  (kept next to the registration it serves)

_library = Library("plasticity", "FRAGMENT")  # kept alive: the op lives as long as this object
direct_register_custom_op("recurrent_stream", _recurrent_stream, mutates_args=["output"],
                          fake_impl=_recurrent_stream_fake, target_lib=_library)
