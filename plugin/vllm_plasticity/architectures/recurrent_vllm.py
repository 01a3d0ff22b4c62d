"""The vLLM form every project recurrent architecture shares: `RecurrentForCausalLM`.

Runs in vLLM's worker process. An architecture subclasses it together with its modules mixin (the same
maths its Hugging Face form runs) and names its config field and shape class; this class adds vLLM's side:
  * per-request state in a RecurrentStateLayer (recurrent_layer.py): decode is an O(1) step per token,
    prefill the parallel (or per-token) form, chunked prefill continues from the saved state;
  * `forward` returns the per-token stream; `compute_logits` runs `logits` on the rows vLLM samples;
  * readout and steering through the same residual-tap op as the transformers, at layer 0 = the stream
    (when PLASTICITY_VECTORS_DIR is set);
  * weights loaded by their own names and, when shared (PLASTICITY_TRAINING/SHARE_WEIGHTS), moved into the
    shared arena the trainer maps. Plain torch layers read their weight tensors directly, so a write from
    the trainer is what the next step computes with.
An unsupported configuration raises (naming the field) while the model is built, so the server stops
before it serves anything. Tensor parallelism: one device only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import HasInnerState
from vllm.platforms import current_platform

from vllm_plasticity.architectures.recurrent_layer import RecurrentStateLayer
from vllm_plasticity.config import process_config
from vllm_plasticity.contract.weights import WeightManifest, share_cpu_parameters
from vllm_plasticity.residual_tap import install_buffers_for


class RecurrentForCausalLM(nn.Module, HasInnerState):
    """An architecture subclasses it with its modules mixin and vLLM's IsAttentionFree (one state layer:
    the whole model is a stream) or IsHybrid (it also runs vLLM attention layers, and overrides
    `build_state_layers` and `served_stream`)."""

    field: str  # the config.json field holding the architecture's own settings
    shape_class: type  # from_fields(fields, vocab_size) -> the architecture's shape
    skipped_weights: tuple[str, ...] = ()  # names (prefixes or suffixes) in checkpoints the model does not use
    plasticity_manifest: WeightManifest | None = None
    plasticity_in_place = True  # plain torch layers: the weight tensors are what every step reads

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        hf = vllm_config.model_config.hf_config
        if vllm_config.parallel_config.tensor_parallel_size > 1:
            raise ValueError(f"{type(self).__name__} runs on one device (tensor_parallel_size 1)")
        shape = self.shape_class.from_fields(getattr(hf, self.field), hf.vocab_size)
        self.build(shape)
        self.hidden_width = shape.hidden_size
        config = process_config()
        self.tapped = config.vectors_dir is not None
        # Per-token signals (readout's `signals`) only where they can be asked for: with the tap.
        names = tuple(self.signal_names()) if self.tapped and hasattr(self, "signal_names") else ()
        self.signal_count = len(names)
        self.build_state_layers(prefix, vllm_config, signals=bool(names))
        if self.tapped:
            self.buffers = install_buffers_for(vllm_config, 1, self.hidden_width, config.readout_capacity,
                                               config.steer_slots, signal_names=names,
                                               capture_layers=config.capture_layers)

    def build_state_layers(self, prefix: str, vllm_config: VllmConfig, signals: bool) -> None:
        # vLLM binds state to layers by the one integer in the name: this is layer 0.
        self.recurrent = RecurrentStateLayer(self, prefix=f"{prefix}layers.0.recurrent", vllm_config=vllm_config,
                                             signals=signals)

    def recurrent_state_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(z.shape[1:]) for z in self.zero_states(1, torch.device("meta"))]

    def served_stream(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(tokens, hidden_width + signal_count): each token's stream, then its signals."""
        dtype = next(self.parameters()).dtype
        stream = torch.empty(input_ids.shape[0], self.hidden_width + self.signal_count, dtype=dtype,
                             device=input_ids.device)
        self.recurrent(input_ids, stream)
        return stream

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **_) -> torch.Tensor:
        stream = self.served_stream(input_ids, positions)
        if self.signal_count:  # the rows are [hidden | signals]: the signals go to the tap's buffer
            self.buffers.signals[: stream.shape[0]] = stream[:, self.hidden_width:].float()
            stream = stream[:, : self.hidden_width].contiguous()
        if self.tapped:  # the tap's stream is hidden + residual: all of it is the residual here
            torch.ops.plasticity.residual_tap(torch.zeros_like(stream), stream, 0)
        return stream

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits(hidden_states)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} takes token ids, not embeddings")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if self.skipped_weights and (name.endswith(self.skipped_weights) or name.startswith(self.skipped_weights)):
                continue
            if name not in params:
                raise ValueError(f"unexpected weight {name!r} for this {type(self).__name__} configuration")
            if params[name].shape != tensor.shape:
                raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)}, the configuration needs "
                                 f"{tuple(params[name].shape)}")
            with torch.no_grad():
                params[name].copy_(tensor)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} weights the configuration needs: {missing[:5]}")
        if process_config().share_weights and current_platform.is_cpu():
            self.plasticity_manifest = share_cpu_parameters(self)
        return loaded
