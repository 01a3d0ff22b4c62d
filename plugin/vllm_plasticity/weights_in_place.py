"""Weights that stay real tensors after loading, so a write from another process changes what vLLM computes.

Runs in vLLM's worker process, for every architecture that shares its weights: the registered Llama/Qwen
subclasses (models.py) and the project's architectures whose served form holds vLLM linear layers (TKC's
Mamba2 mixers).

Stock vLLM on CPU repacks every linear weight for oneDNN after loading and drops `layer.weight` (shape
[0]); `lm_head` keeps its tensor but multiplies with a packed copy. `keep_weights_in_place` marks every
linear layer with vLLM's own `_cpu_skip_gemm_dispatch` flag (made for MLA's kv_b_proj), so it keeps its
weight and multiplies with `F.linear` on it, and gives the embedding / lm_head a quant method that does the
same for the logits matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.layers.vocab_parallel_embedding import (
    UnquantizedEmbeddingMethod,
    VocabParallelEmbedding,
)
from vllm.platforms import current_platform

from vllm_plasticity.packed_copies import may_pack_a_copy


def keep_weights_in_place(model: torch.nn.Module) -> None:
    """Mark `model`'s layers so no weight is repacked, copied or dropped after loading."""
    for module in model.modules():
        if may_pack_a_copy(module):
            continue  # no CPU kernel reads it in place: served from a copy packed again after a step (packed_copies.py)
        if isinstance(module, LinearBase):
            module._cpu_skip_gemm_dispatch = True
        elif isinstance(module, VocabParallelEmbedding) and type(module.quant_method) is UnquantizedEmbeddingMethod:
            module.quant_method = PlainEmbeddingMethod()


class PlainEmbeddingMethod(UnquantizedEmbeddingMethod):
    """Unquantized embedding / lm_head whose logits matmul reads `layer.weight` itself on CPU."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if current_platform.is_cpu():
            # vLLM's CPU path would build a packed copy here (dispatch_cpu_unquantized_gemm).
            layer.cpu_linear = F.linear
