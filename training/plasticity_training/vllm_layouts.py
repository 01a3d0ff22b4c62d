"""vLLM's weight layouts of a Hugging Face checkpoint, written out from its loaders: the one-shard tensors
(q|k|v and gate|up fused, as `packed_modules_mapping` stacks them), each rank's tensors at tensor-parallel
size N (QKVParallelLinear, MergedColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding), and the
inverse that gathers the ranks' tensors whole again.

The trainer never uses this module (it maps vLLM's live tensors). Tests and benchmarks that run the
trainer without a vLLM server build its inputs with it, and the tensor-parallel tests read the ranks'
tensors back with it: written apart from the trainer's own reading of these layouts (hf_view.py,
tensor_parallel.py), so that a test compares two independent readings.

    >>> whole = vllm_layout(model_dir)                          # one shard, vLLM's names
    >>> rank1 = vllm_shard(whole, config, rank=1, world=2)      # what worker 1 of 2 holds
    >>> vllm_gather([rank0, rank1], config)                     # whole again (vocabulary unpadded)
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def vllm_layout(model_dir: Path, pad_vocab_to: int | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under vLLM's names, fused as vLLM fuses them (q|k|v, gate|up); optionally
    the vocabulary rows padded with junk, as vLLM pads them."""
    hf = load_file(str(Path(model_dir) / "model.safetensors"))
    out = {}
    for name, t in hf.items():
        if ".q_proj." in name:
            k, v = hf[name.replace("q_proj", "k_proj")], hf[name.replace("q_proj", "v_proj")]
            out[name.replace("q_proj", "qkv_proj")] = torch.cat([t, k, v]).clone()
        elif ".gate_proj." in name:
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([t, hf[name.replace("gate_proj", "up_proj")]]).clone()
        elif not any(s in name for s in (".k_proj.", ".v_proj.", ".up_proj.")):
            out[name] = t.clone()
    if pad_vocab_to:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in out:
                t = out[name]
                out[name] = torch.cat([t, torch.randn(pad_vocab_to - t.shape[0], t.shape[1])])
    return out


def vllm_shard(weights: dict[str, torch.Tensor], config, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s tensors of a server at --tensor-parallel-size `world`, from the whole tensors in vLLM's
    names (vllm_layout): q, k, v and gate, up each in `world` row blocks, fused again per rank; o_proj and
    down_proj by input columns; the vocabulary padded to a multiple of 64 with zero rows, in row blocks;
    the rest whole. Written from vLLM's QKVParallelLinear, MergedColumnParallelLinear, RowParallelLinear
    and VocabParallelEmbedding, independently of the trainer's code that reads it."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    inter = config.intermediate_size

    def block(t, dim):
        return t.chunk(world, dim)[rank].clone()

    out = {}
    for name, t in weights.items():
        if ".qkv_proj." in name:
            out[name] = torch.cat([block(part, 0) for part in t.split([q, kv, kv])])
        elif ".gate_up_proj." in name:
            out[name] = torch.cat([block(part, 0) for part in t.split([inter, inter])])
        elif ".o_proj." in name or ".down_proj." in name:
            out[name] = block(t, 1)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            padded = -(-t.shape[0] // 64) * 64
            out[name] = block(torch.cat([t, t.new_zeros(padded - t.shape[0], t.shape[1])]), 0)
        else:
            out[name] = t.clone()
    return out


def vllm_gather(shards: list[dict[str, torch.Tensor]], config) -> dict[str, torch.Tensor]:
    """The whole tensors (vLLM's names at tensor-parallel size 1, vocabulary unpadded) from every rank's
    (rank order): the inverse of vllm_shard. A tensor every rank holds whole must be equal on all."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    world = len(shards)
    q, kv = config.num_attention_heads * head_dim // world, config.num_key_value_heads * head_dim // world
    inter = config.intermediate_size // world
    whole = {}
    for name in shards[0]:
        parts = [shard[name] for shard in shards]
        if ".qkv_proj." in name:
            split = [p.split([q, kv, kv]) for p in parts]
            whole[name] = torch.cat([torch.cat([s[i] for s in split]) for i in range(3)])
        elif ".gate_up_proj." in name:
            split = [p.split([inter, inter]) for p in parts]
            whole[name] = torch.cat([torch.cat([s[i] for s in split]) for i in range(2)])
        elif ".o_proj." in name or ".down_proj." in name:
            whole[name] = torch.cat(parts, 1)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            whole[name] = torch.cat(parts)[: config.vocab_size]
        else:
            assert all(torch.equal(parts[0], p) for p in parts[1:]), f"{name}: a whole tensor differs between ranks"
            whole[name] = parts[0].clone()
    return whole
