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
    otherwise, so chunked prefill continues exactly; the step's prefills run together in segments (every
    one for the shortest's length, the longer ones on from there), so a recurrence's per-token loop runs as
    many times as the longest prefill has tokens, not once per request;
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
            hidden = self._advance(inputs[:decodes, None], metadata.state_indices_tensor_d[:decodes, 0])
            output[:decodes] = hidden.reshape(decodes, -1).to(output.dtype)
        for rows, continues in _prefill_groups(metadata.prefills):
            self._prefill_together(inputs, output, metadata, rows, continues)

    def _prefill_together(self, inputs: torch.Tensor, output: torch.Tensor, metadata: RecurrentStateMetadata,
                          rows: list[int], continues: bool) -> None:
        """Run the prefills `rows` (shortest first) as one batch, in segments: every row for the shortest one's
        length, then the longer rows on from their states for the next length, and so on; each row's state goes
        into its slot when its tokens end. A recurrence's per-token loop so runs as many times as the longest
        prefill has tokens, not as all of them together (chunked prefill already checks that continuing from
        a state mid-sequence is exact)."""
        arch = self.architecture
        ranges = [metadata.prefills[i][:2] for i in rows]
        slots = torch.cat([metadata.state_indices_tensor_p[i:i + 1] for i in rows]).long()
        # A request with no earlier tokens starts from zero: its slot may hold a finished request's state.
        states = (arch.zero_states(len(rows), inputs.device) if not continues
                  else [s.index_select(0, slots) for s in self.kv_cache])
        done, first = 0, 0  # tokens of every unfinished row run so far; the first unfinished row
        while first < len(rows):
            length = ranges[first][1] - ranges[first][0]
            batch = torch.stack([inputs[start + done:start + length] for start, _ in ranges[first:]])
            hidden, states = arch.stream(batch, states, **self.options)
            for r, (start, _) in enumerate(ranges[first:]):
                output[start + done:start + length] = hidden[r].to(output.dtype)
            ended = first
            while ended < len(rows) and ranges[ended][1] - ranges[ended][0] == length:
                ended += 1
            for s, n in zip(self.kv_cache, states):
                s[slots[first:ended]] = n[:ended - first]  # into the slots of the rows that ended, in place
            states = [n[ended - first:] for n in states]
            done, first = length, ended

    def _advance(self, inputs: torch.Tensor, slots: torch.Tensor, initial: list[torch.Tensor] | None = None
                 ) -> torch.Tensor:
        """Run `inputs` (R, L, ...) from the states in `slots` (R,) (or from `initial`), write the states after
        the last token back into the slots, in place, and return the outputs (R, L, W)."""
        index = slots.long()
        states = self.kv_cache
        if initial is None:
            initial = [s.index_select(0, index) for s in states]
        hidden, new = self.architecture.stream(inputs, initial, **self.options)
        for s, n in zip(states, new):
            s[index] = n  # into the slot, in place
        return hidden


def _prefill_groups(prefills: tuple[tuple[int, int, bool], ...]) -> list[tuple[list[int], bool]]:
    """The step's prefills (start, end, continues) as the rows that run together: those starting from zero,
    and those continuing from their slots, each shortest first. Host data only (vLLM's builder made the ranges)."""
    groups: dict[bool, list[int]] = {}
    for i in sorted(range(len(prefills)), key=lambda i: prefills[i][1] - prefills[i][0]):
        groups.setdefault(prefills[i][2], []).append(i)
    return [(rows, continues) for continues, rows in groups.items()]


@eager_break_during_capture
def _recurrent_stream(inputs: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    get_forward_context().no_compile_layers[layer_name].run(inputs, output)


def _recurrent_stream_fake(inputs: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    return None


from torch.library import Library  # noqa: E402  (kept next to the registration it serves)

_library = Library("plasticity", "FRAGMENT")  # kept alive: the op lives as long as this object
direct_register_custom_op("recurrent_stream", _recurrent_stream, mutates_args=["output"],
                          fake_impl=_recurrent_stream_fake, target_lib=_library)
