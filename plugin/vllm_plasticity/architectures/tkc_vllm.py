"""Transformer Killer Core served by vLLM: `TKCForCausalLM`, registered by `vllm_plasticity.register`.

Runs in vLLM's worker process. The maths is tkc_modules.py (what the Hugging Face form runs); the vLLM
side (state slots, readout tap, weight loading and sharing) is recurrent_vllm.py. Per backbone:
  * "gru": the whole model is one stream in one state layer (`layers.0.recurrent`: the GRU hidden states
    and the whole DualTierMiras memory in the request's slot);
  * "mamba2": each backbone layer's mixer is vLLM's own `MambaMixer2` (`layers.{i}.mixer`, its convolution
    and SSM states in vLLM's Mamba2 state slots, its prefill and decode kernels), and the memory runs in a
    state layer of its own after them (`layers.{n_layers}.memory`). vLLM pads the two state layouts to one
    page size (`unify_kv_cache_spec_page_size`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2
from vllm.model_executor.models.interfaces import IsAttentionFree

from vllm_plasticity.architectures.mamba2_form import Mamba2Form
from vllm_plasticity.architectures.recurrent_layer import RecurrentStateLayer
from vllm_plasticity.architectures.recurrent_vllm import RecurrentForCausalLM
from vllm_plasticity.architectures.tkc_config import TKCShape
from vllm_plasticity.architectures.tkc_modules import TKCModules, sinusoid
from vllm_plasticity.weights_in_place import keep_weights_in_place


class MemoryStream:
    """DualTierMiras as a RecurrentStateLayer's architecture (Mamba2 backbone): backbone outputs in, the
    fused stream the head reads out."""

    def __init__(self, model: "TKCForCausalLM") -> None:
        self.model = model

    def recurrent_state_shapes(self) -> list[tuple[int, ...]]:
        return self.model.tkc.memory_state_shapes()

    def zero_states(self, rows: int, device: torch.device) -> list[torch.Tensor]:
        return self.model.memory_zero_states(rows, device)

    def stream(self, h: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.model.memory_stream(h, states)


class TKCForCausalLM(TKCModules, RecurrentForCausalLM, IsAttentionFree):
    field = "tkc"
    shape_class = TKCShape

    def build_state_layers(self, prefix: str, vllm_config: VllmConfig, signals: bool) -> None:
        shape = self.tkc
        if shape.backbone == "gru":
            super().build_state_layers(prefix, vllm_config, signals)
            return
        f = shape.fields
        for i, block in enumerate(self.backbone):
            # Same parameter names and shapes as the full-sequence form's Mamba2Form, which build() put here.
            block.mixer = MambaMixer2(
                hidden_size=shape.d_model, ssm_state_size=int(f["mamba_d_state"]),
                conv_kernel_size=int(f["mamba_d_conv"]), intermediate_size=shape.mamba_inner, use_conv_bias=True,
                use_bias=False, n_groups=1, num_heads=shape.mamba_heads, head_dim=int(f["mamba_headdim"]),
                rms_norm_eps=Mamba2Form.EPS, activation="silu", model_config=vllm_config.model_config,
                cache_config=vllm_config.cache_config, prefix=f"{prefix}layers.{i}.mixer")
        self.memory_state = RecurrentStateLayer(MemoryStream(self), prefix=f"{prefix}layers.{shape.n_layers}.memory",
                                                vllm_config=vllm_config)
        # The mixers' projections are vLLM linear layers: without this, vLLM's CPU path would multiply with
        # packed copies and a step of the trainer would change nothing the server computes.
        keep_weights_in_place(self)

    def served_stream(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.tkc.backbone == "gru":
            return super().served_stream(input_ids, positions)
        x = self.embed(input_ids)
        x = x + sinusoid(positions[None], self.tkc.d_model)[0].to(x.dtype)
        for block in self.backbone:
            x = x + block.mixer(block.norm(x))
        stream = torch.empty_like(x)
        self.memory_state(x, stream)
        return stream

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        if self.tkc.backbone == "mamba2":
            for block in self.backbone:
                # MambaMixer2's kernels read `conv_weights`, a view made at build time: after loading
                # moved conv1d.weight into the shared arena it must view the new storage.
                w = block.mixer.conv1d.weight
                block.mixer.conv_weights = w.view(w.size(0), w.size(2))
        return loaded
