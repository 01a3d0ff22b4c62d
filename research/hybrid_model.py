"""A random Qwen 3.5 (Gated DeltaNet hybrid, dense MLP) at a larger shape, for benchmarks on 2 CPU cores.

The original system trained Qwen 3.5 27B: 64 layers, three Gated DeltaNet layers to one attention layer,
hidden 5120. This keeps its layer plan and head sizes (128) at a width 2 cores run in minutes: hidden 1024,
8 layers (GDN, GDN, GDN, attention, twice), GDN 4 key / 8 value heads, attention 8 query / 2 KV heads,
MLP 3072, vocabulary 32768 (the tokenizer is the built-in model's small BPE; the unused rows still cost
what a real vocabulary costs): 175M parameters, bfloat16 (vLLM's CPU GDN path refuses float32).
`QWEN3_5_27B_LAYERS` is Qwen 3.5 27B's own layer shapes, four layers of them (for a GPU: gpu_check.py).

    python research/hybrid_model.py OUT_DIR        # prints OUT_DIR; then bench_real.py --model OUT_DIR --dtype bfloat16
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

SHAPE = dict(vocab_size=32768, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
             layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
             num_attention_heads=8, num_key_value_heads=2, head_dim=128, linear_num_key_heads=4,
             linear_num_value_heads=8, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
             max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
# Qwen 3.5 27B's published layer shapes (hidden 5120, MLP 17408; attention 24 query / 4 KV heads of 256;
# Gated DeltaNet 16 key / 48 value heads of 128), four layers in its 3:1 plan: 1.85B parameters.
QWEN3_5_27B_LAYERS = dict(SHAPE, hidden_size=5120, intermediate_size=17408, num_hidden_layers=4,
                          layer_types=["linear_attention"] * 3 + ["full_attention"], num_attention_heads=24,
                          num_key_value_heads=4, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=48)
TOKENIZER_TEXT = "\n\n".join(f"The {a} saw the {b}, and the story went on." for a in ("cat", "owl", "boat", "door")
                             for b in ("river", "gate", "lamp", "letter"))


def build(out_dir: Path, seed: int = 0, shape: dict | None = None) -> Path:
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    from plasticity_training.default_model import train_tokenizer

    torch.manual_seed(seed)
    model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**(shape or SHAPE))).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    train_tokenizer(TOKENIZER_TEXT, 512).save_pretrained(out_dir)
    return Path(out_dir)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.strip().splitlines()[-1].strip())
    print(build(Path(sys.argv[1])))
