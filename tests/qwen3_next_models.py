"""A tiny random Qwen3-Next (Gated DeltaNet hybrid with MoE), made by transformers, for the tests.

bfloat16 on disk because vLLM's CPU Gated DeltaNet path refuses float32 ("CPU GDN attention requires BF16").
The tokenizer is the built-in model's (any byte-level tokenizer whose vocabulary fits would do).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tiny_qwen3_next_config(vocab_size: int):
    """4 layers: 3 Gated DeltaNet + 1 full attention, every layer MoE (4 experts, 2 per token) with a
    shared expert. Sizes are the smallest vLLM's CPU kernels take: attention head_dim 32 (16 is refused),
    hidden and expert sizes multiples of 32 (the AMX MoE kernel's alignment)."""
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
        linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, decoder_sparse_step=1, norm_topk_prob=True,
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


def build_tiny_qwen3_next(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Save a random-init tiny Qwen3NextForCausalLM (bfloat16) with `tokenizer_dir`'s tokenizer."""
    from transformers import AutoTokenizer, Qwen3NextForCausalLM

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(tiny_qwen3_next_config(vocab)).to(torch.bfloat16)
    with torch.no_grad():  # random router/norm weights, so the test exercises the routing and the gated norm
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "linear_attn.norm.weight", "layernorm.weight", "norm.weight")):
                p.normal_(0.0, 0.2 if "gate" in name else 0.1).add_(1.0 if "linear_attn.norm" in name else 0.0)
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).exists():
            shutil.copy(Path(tokenizer_dir) / name, Path(out_dir) / name)
    return Path(out_dir)
