"""SYNTHE served by vLLM: `SyntheForCausalLM`, registered by `vllm_plasticity.register`. A vLLM hybrid model:
recurrent state slots and paged attention.

Runs in vLLM's worker process. The maths is synthe_modules.py (what the Hugging Face form runs). Per step:

    x = embed(ids, positions)
    for each block i:   x, IOR, confidence, surprise = RecurrentStateLayer "layers.{2i}.recurrent"(x)
                                   (Jordan, Hopfield, Wiener, FFN from the request's state slot)
                        x += gate * W_out(Attention "layers.{2i+1}.probe"(q, k, v))
                                   (a sliding window of probe_window tokens over vLLM's paged KV cache)
                        x *= router budget (from block min_depth on)
    x += RecurrentStateLayer "layers.{2n}.hub"([x | position])     (the memory hub's state slot; not
                                                                      called when memory_hub is false)

The probe's keys and values are written to the KV cache for every token (a later token may fire its gate
and attend to them), so its window is vLLM's: decode cost per token is bounded by the window. vLLM binds
each layer to its state or cache by the one integer in its name, so the kinds alternate their indices.
The readout tap, weight loading and sharing are recurrent_vllm.py's.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.interfaces import IsHybrid

from vllm_plasticity.architectures.recurrent_layer import RecurrentStateLayer
from vllm_plasticity.architectures.recurrent_vllm import RecurrentForCausalLM
from vllm_plasticity.architectures.synthe_config import SyntheShape
from vllm_plasticity.architectures.synthe_modules import SyntheModules

BLOCK_EXTRAS = 3  # columns after a block layer's x: IOR, running confidence, Hopfield surprise


class BlockStream:
    """Block i's part with state, as a RecurrentStateLayer's architecture: x in, [x | extras] out."""

    def __init__(self, model: "SyntheForCausalLM", i: int) -> None:
        self.model, self.i = model, i

    def recurrent_state_shapes(self) -> list[tuple[int, ...]]:
        return self.model.synthe.block_state_shapes()

    def zero_states(self, rows: int, device: torch.device) -> list[torch.Tensor]:
        return self.model.block_zero_states(rows, device)

    def stream(self, x: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, ior, confidence, surprise, new = self.model.block_recurrence(self.i, x, states)
        return torch.cat([x.float(), torch.stack([ior, confidence, surprise], dim=-1).float()], dim=-1), new


class HubStream:
    """The memory hub, as a RecurrentStateLayer's architecture: [x | position] in, the hub's output out."""

    def __init__(self, model: "SyntheForCausalLM") -> None:
        self.model = model

    def recurrent_state_shapes(self) -> list[tuple[int, ...]]:
        return self.model.synthe.hub_state_shapes()

    def zero_states(self, rows: int, device: torch.device) -> list[torch.Tensor]:
        return self.model.hub_zero_states(rows, device)

    def stream(self, inputs: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, first = inputs[..., :-1], inputs[:, 0, -1]  # the chunk's first position = tokens before it
        dtype = self.model.embedding.weight.dtype
        out, tiers, ring = self.model.memory_hub.scan(x.to(dtype), *states, first)
        return out, [tiers, ring]


class SyntheForCausalLM(SyntheModules, RecurrentForCausalLM, IsHybrid):
    field = "synthe"
    shape_class = SyntheShape

    def build_state_layers(self, prefix: str, vllm_config: VllmConfig, signals: bool) -> None:
        shape = self.synthe
        n, heads, head_dim = shape.n_blocks, shape.n_heads, shape.head_dim
        self.block_states = nn.ModuleList(
            RecurrentStateLayer(BlockStream(self, i), prefix=f"{prefix}layers.{2 * i}.recurrent", vllm_config=vllm_config)
            for i in range(n))
        self.probes = nn.ModuleList(
            Attention(heads, head_dim, head_dim ** -0.5, num_kv_heads=heads, cache_config=vllm_config.cache_config,
                      per_layer_sliding_window=shape.window, prefix=f"{prefix}layers.{2 * i + 1}.probe")
            for i in range(n))
        self.hub_state = RecurrentStateLayer(HubStream(self), prefix=f"{prefix}layers.{2 * n}.hub",
                                             vllm_config=vllm_config)

    def served_stream(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        f, d = self.synthe.fields, self.synthe.d_model
        x = self.embed(input_ids, positions)
        reported = []
        for i, block in enumerate(self.blocks):
            budget = self.router(x) if i >= int(f["min_depth"]) else None
            # fp32 out: the gate compares the confidence with its threshold as the full-sequence form does
            # (x round-trips exactly from the weights' dtype).
            out = torch.empty(x.shape[0], d + BLOCK_EXTRAS, dtype=torch.float32, device=x.device)
            self.block_states[i](x, out)
            x, ior, confidence, surprise = out[:, :d].to(x.dtype), out[:, d], out[:, d + 1], out[:, d + 2]
            gate = self.probe_gate(confidence)
            if gate is not None:
                q, k, v = block.probe.W_qkv(block.probe.norm(x)).chunk(3, dim=-1)
                attended = self.probes[i](q.contiguous(), k.contiguous(), v.contiguous())
                x = x + gate[:, None].to(x.dtype) * block.probe.W_out(attended)
            if budget is not None:
                x = x * budget
            if self.signal_count:
                reported += self.block_signals(ior, confidence, gate, budget, surprise)
        if f["memory_hub"]:  # off: the hub's state slot is allocated and never written
            hub = torch.empty_like(x)
            # fp32 in: a position in bf16 is exact only up to 256.
            self.hub_state(torch.cat([x.float(), positions[:, None].float()], dim=-1), hub)
            x = x + hub
        if self.signal_count:
            x = torch.cat([x, torch.stack(reported, dim=-1).to(x.dtype)], dim=-1)
        return x

    # ---- what vLLM asks a hybrid model before building it --------------------------------------------
    @classmethod
    def _shape(cls, vllm_config: VllmConfig) -> SyntheShape:
        hf = vllm_config.model_config.hf_config
        return SyntheShape.from_fields(getattr(hf, cls.field), hf.vocab_size)

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...], ...]:
        """The larger of the two state layouts (a block's, the hub's): vLLM sizes one state page for both."""
        shape = cls._shape(vllm_config)
        layouts = [shape.block_state_shapes(), shape.hub_state_shapes()]
        return tuple(max(layouts, key=lambda shapes: sum(torch.Size(s).numel() for s in shapes)))

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        return (torch.float32,) * len(cls.get_mamba_state_shape_from_config(vllm_config))
