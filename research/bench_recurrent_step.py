"""Microbenchmark: one served decode step of each RecurrentStateLayer, in process (no server), at the
built-in models' shapes (random init, fp32): the layer's own `run` with the metadata its builder makes,
`--requests` decoding requests, min and median over `--repeats` steps, one thread by default. For before/after comparisons on a busy
machine: run it with PYTHONPATH pointing at each tree, alternately, and compare medians.

    python research/bench_recurrent_step.py [--requests 8] [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from vllm.config import VllmConfig
from vllm.forward_context import set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata

import vllm_plasticity
from vllm_plasticity.architectures.recurrent_layer import RecurrentStateLayer


class WholeModel:
    """A one-layer architecture as recurrent_vllm presents it."""

    def __init__(self, model) -> None:
        self.model = model

    def recurrent_state_shapes(self):
        return [tuple(z.shape[1:]) for z in self.model.zero_states(1, torch.device("cpu"))]

    def zero_states(self, rows, device):
        return self.model.zero_states(rows, device)

    def stream(self, ids, states):
        return self.model.stream(ids, states)


def layers() -> dict[str, tuple[object, callable]]:
    """name -> (architecture, inputs for n decoding requests)."""
    from plasticity_training.default_causal_bank import CausalBankSpec
    from plasticity_training.default_synthe import SyntheSpec
    from plasticity_training.default_tkc import TKCSpec
    from vllm_plasticity.architectures.causal_bank_hf import CausalBankConfig, CausalBankForCausalLM
    from vllm_plasticity.architectures.synthe_hf import SyntheConfig, SyntheForCausalLM
    from vllm_plasticity.architectures.synthe_vllm import BlockStream, HubStream
    from vllm_plasticity.architectures.tkc_hf import TKCConfig, TKCForCausalLM

    ids = lambda n: torch.randint(0, 256, (n,))  # noqa: E731
    bank = CausalBankForCausalLM(CausalBankConfig(vocab_size=256, causal_bank=CausalBankSpec().fields())).eval()
    tkc = TKCForCausalLM(TKCConfig(vocab_size=256, tkc=TKCSpec().fields())).eval()
    synthe = SyntheForCausalLM(SyntheConfig(vocab_size=256, synthe=SyntheSpec().fields())).eval()
    d = synthe.synthe.d_model
    return {"causal_bank": (WholeModel(bank), ids), "tkc_gru": (WholeModel(tkc), ids),
            "synthe_block": (BlockStream(synthe, 0), lambda n: torch.randn(n, d)),
            "synthe_hub": (HubStream(synthe), lambda n: torch.cat([torch.randn(n, d), torch.full((n, 1), 100.0)], -1))}


def decode_batch(n: int) -> CommonAttentionMetadata:
    query = torch.arange(n + 1, dtype=torch.int32)
    seq_lens = torch.full((n,), 100, dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=query, query_start_loc_cpu=query.clone(), seq_lens=seq_lens, num_reqs=n,
        num_actual_tokens=n, max_query_len=1, max_seq_len=100,
        block_table_tensor=torch.arange(1, n + 1, dtype=torch.int32)[:, None],
        slot_mapping=torch.zeros(n, dtype=torch.long), is_prefilling=torch.zeros(n, dtype=torch.bool),
        seq_lens_cpu_upper_bound=seq_lens.clone())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="1: a busy machine's spin-waits stay out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"tree: {vllm_plasticity.__file__}  threads: {torch.get_num_threads()}  requests: {args.requests}")
    for name, (arch, draw) in layers().items():
        config = VllmConfig()
        config.cache_config.mamba_block_size = 4096
        config.cache_config.mamba_cache_mode = "none"
        layer = RecurrentStateLayer(arch, f"layers.0.{name}", config)
        layer.kv_cache = tuple(torch.zeros(args.requests + 1, *s) for s in layer.get_state_shape())
        builder = layer.get_attn_backend().get_builder_cls()(layer.get_kv_cache_spec(config), [layer.prefix],
                                                             config, torch.device("cpu"))
        inputs = draw(args.requests)
        width = arch.stream(inputs[None, :1], arch.zero_states(1, inputs.device))[0].shape[-1]
        output = torch.empty(args.requests, width)
        step_ms, build_ms = [], []
        with torch.no_grad():
            for i in range(args.repeats + 10):
                t0 = time.perf_counter()
                metadata = builder.build(0, decode_batch(args.requests))
                t1 = time.perf_counter()
                with set_forward_context({layer.prefix: metadata}, config):
                    layer.run(inputs, output)
                t2 = time.perf_counter()
                if i >= 10:
                    build_ms.append((t1 - t0) * 1e3)
                    step_ms.append((t2 - t1) * 1e3)
        print(f"{name:13s} step min {min(step_ms):7.3f} median {statistics.median(step_ms):7.3f} ms   "
              f"metadata build min {min(build_ms):6.3f} ms")


if __name__ == "__main__":
    main()
