"""The per-step metadata of RecurrentStateLayer: vLLM's Mamba metadata, plus each prefill's token range read
from the host copies vLLM already holds, so the layer never reads a device tensor on the host.

Runs in vLLM's worker process. The builder is vLLM's own Mamba one (`Mamba1AttentionMetadataBuilder`, whose
`build` fills `BaseMambaAttentionMetadata`), so the layer gets what vLLM's Mamba layers get:
  * decodes first, their slots in `state_indices_tensor_d` (num_decodes, 1): when full CUDA graphs are on,
    a view of a persistent buffer padded with vLLM's null block, which is what lets a decode-only step be
    captured and replayed (`_cudagraph_support` UNIFORM_BATCH, `build_for_cudagraph_capture`);
  * the prefills' slots in `state_indices_tensor_p` (num_prefills,);
  * a one-token chunk that continues a request (its slot holds its state) counted as a decode.
What this module adds is host data for the prefill loop: `prefills`, one (start, end, continues) per prefill
in the batch's token order, from `query_start_loc_cpu` and `seq_lens_cpu_upper_bound` (exact for prefill
rows, vLLM's builder says). `continues` is False for a request with no earlier tokens: its slot may hold a
finished request's state and must not be read.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from vllm.v1.attention.backend import AttentionBackend, CommonAttentionMetadata
from vllm.v1.attention.backends.mamba1_attn import Mamba1AttentionMetadataBuilder
from vllm.v1.attention.backends.mamba_attn import BaseMambaAttentionMetadata


class RecurrentStateBackend(AttentionBackend):
    """What RecurrentStateLayer.get_attn_backend names: vLLM groups its layers by this class."""

    @staticmethod
    def get_name() -> str:
        return "PLASTICITY_RECURRENT"

    @staticmethod
    def get_builder_cls() -> type["RecurrentStateMetadataBuilder"]:
        return RecurrentStateMetadataBuilder

    @classmethod
    def is_ssm(cls) -> bool:
        return True


@dataclass
class RecurrentStateMetadata(BaseMambaAttentionMetadata):
    # (start, end, continues) per prefill, in token offsets of the step's batch: host integers.
    prefills: tuple[tuple[int, int, bool], ...] = ()


class RecurrentStateMetadataBuilder(Mamba1AttentionMetadataBuilder):
    metadata_cls = RecurrentStateMetadata  # vLLM's builder fills this class
    needs_causal_conv1d_metadata = False  # no convolution kernel reads it

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False, **kwargs: Any) -> RecurrentStateMetadata:
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build, **kwargs)
        if not metadata.num_prefills:
            return metadata
        return replace(metadata, prefills=prefill_ranges(common_attn_metadata, metadata.num_prefills))


def prefill_ranges(common: CommonAttentionMetadata, num_prefills: int) -> tuple[tuple[int, int, bool], ...]:
    """The last `num_prefills` rows of the batch (vLLM orders decodes first) as (start, end, continues),
    from the host tensors only."""
    rows = common.num_reqs
    starts = common.query_start_loc_cpu[rows - num_prefills: rows + 1].tolist()  # host tensor
    seq_lens = common.seq_lens_cpu_upper_bound[rows - num_prefills: rows].tolist()  # host tensor
    return tuple((start, end, seq_len > end - start)
                 for start, end, seq_len in zip(starts[:-1], starts[1:], seq_lens))
