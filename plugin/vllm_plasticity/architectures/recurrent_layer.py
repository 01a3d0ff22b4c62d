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
layers between its recurrent ones, as SYNTHE does), the outputs `W` columns per token. The layer is a
`MambaBase` (vLLM allocates one state slot per running request from `get_state_shape`/`get_state_dtype`,
like Mamba's conv/ssm state) whose metadata is vLLM's Mamba metadata plus each prefill's token range as
host integers (recurrent_metadata.py). Each step it:
  * runs every decoding request together, one token each, from its slot: one batched O(1) step for the
    whole batch, no per-request Python, so decode cost per token does not grow with the context;
  * runs each prefill (or chunk of one) with the architecture's parallel form, starting from zero state
    when the request has no earlier tokens (a reused slot holds another request's state) and from its slot
    otherwise, so chunked prefill continues exactly;
  * writes each request's final state back into its slot, in place.
It reads no device tensor on the host (no `.tolist()`/`.item()`: tests/test_recurrent_no_host_sync.py), so
on a GPU a decode-only step can run inside a full CUDA graph, as vLLM's own Mamba layers do: the builder is
vLLM's Mamba one (UNIFORM_BATCH graph support, the decode slots in its persistent, null-padded buffer). The
op is a vLLM custom op (`plasticity::recurrent_stream`, registered in `static_forward_context`); under
vLLM's breakable CUDA graphs it runs eagerly between captured segments, as vLLM's Mamba ops do.

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

from vllm_plasticity.architectures.recurrent_metadata import RecurrentStateBackend, RecurrentStateMetadata


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

    def get_attn_backend(self) -> type[RecurrentStateBackend]:
        """vLLM's Mamba metadata plus host-side prefill ranges (recurrent_metadata.py)."""
        return RecurrentStateBackend

    # ---- one step --------------------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        torch.ops.plasticity.recurrent_stream(inputs, output, self.prefix)

    def run(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(self.prefix)
        self.step(inputs, output, metadata)

    def step(self, inputs: torch.Tensor, output: torch.Tensor, metadata: RecurrentStateMetadata | None) -> None:
        """One engine step. Reads no device tensor on the host: the counts and the prefills' ranges are
        host data vLLM's builder made, the slots stay on the device (so a decode-only step can be captured
        in a CUDA graph: the same kernels, the slots read from vLLM's persistent buffer)."""
        arch = self.architecture
        if metadata is None:  # a profiling / dummy run: no requests, no slots
            hidden, _ = arch.stream(inputs[None], arch.zero_states(1, inputs.device), **self.options)
            output.copy_(hidden[0].to(output.dtype))
            return
        decodes = metadata.num_decodes
        tokens = metadata.num_decode_tokens + metadata.num_prefill_tokens
        output[tokens:].zero_()  # padding rows, if any
        if decodes:  # all decoding requests at once, one token each, from and back to their slots
            self._advance(inputs[:decodes, None], output[:decodes], metadata.state_indices_tensor_d[:decodes, 0])
        for i, (start, end, continues) in enumerate(metadata.prefills):
            # A request with no earlier tokens starts from zero: its slot may hold a finished request's state.
            self._advance(inputs[None, start:end], output[start:end], metadata.state_indices_tensor_p[i:i + 1],
                          None if continues else arch.zero_states(1, inputs.device))

    def _advance(self, inputs: torch.Tensor, output: torch.Tensor, slots: torch.Tensor,
                 initial: list[torch.Tensor] | None = None) -> None:
        """Run `inputs` (R, L, ...) from the states in `slots` (R,) (or from `initial`), write the outputs
        (R * L rows) and the states after the last token back into the slots, in place."""
        index = slots.long()
        states = self.kv_cache
        if initial is None:
            initial = [s.index_select(0, index) for s in states]
        hidden, new = self.architecture.stream(inputs, initial, **self.options)
        output.copy_(hidden.reshape(output.shape).to(output.dtype))
        for s, n in zip(states, new):
            s[index] = n  # into the slot, in place


@eager_break_during_capture
def _recurrent_stream(inputs: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    get_forward_context().no_compile_layers[layer_name].run(inputs, output)


def _recurrent_stream_fake(inputs: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    return None


from torch.library import Library  # noqa: E402  (kept next to the registration it serves)

_library = Library("plasticity", "FRAGMENT")  # kept alive: the op lives as long as this object
direct_register_custom_op("recurrent_stream", _recurrent_stream, mutates_args=["output"],
                          fake_impl=_recurrent_stream_fake, target_lib=_library)
