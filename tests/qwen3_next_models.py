"""Tiny random Gated DeltaNet hybrids made by transformers, for the tests: Qwen3-Next (with MoE), Qwen 3.5
(dense, and with experts) and Qwen 3.5 as released (image-text, its language model under
`model.language_model.`).

bfloat16 on disk because vLLM's CPU Gated DeltaNet path refuses float32 ("CPU GDN attention requires BF16").
The tokenizer is a byte-level BPE trained on a few sentences (the built-in model's recipe), so building
needs nothing from the cache.
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = "\n\n".join(f"The {a} saw the {b} near the {c}, and the story went on." for a, b, c in
                   zip(["cat", "dog", "owl", "boat"] * 20, ["river", "tree", "gate", "sea"] * 20,
                       ["hill", "barn", "lake", "house"] * 20))
VOCAB_SIZE = 512


def tiny_qwen3_next_config(vocab_size: int):
    """4 layers: 3 Gated DeltaNet + 1 full attention, every layer MoE (4 experts, 2 per token) with a
    shared expert. Sizes vLLM's CPU kernels take: GDN head dims 128 (the chunked delta-rule kernel refused
    32: "Unexpected head dim size"), hidden and expert sizes multiples of 32 (the AMX MoE kernel's
    alignment). vLLM makes an attention block's KV at least one layer's GDN state (4 value heads of
    128 x 128, float32): the attention layer's 16 KV heads of 128 make that a 128-token block, so a 200-token
    prompt leaves a cached prefix block with its GDN state (with 1 KV head of 32 it was 2176 tokens, more
    than the tests' max_model_len, and nothing was ever cached)."""
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        num_attention_heads=16, num_key_value_heads=16, head_dim=128,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, decoder_sparse_step=1, norm_topk_prob=True,
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


def build_tiny_qwen3_next(out_dir: Path, seed: int = 0) -> Path:
    """Save a random-init tiny Qwen3NextForCausalLM (bfloat16) and its tokenizer in `out_dir`."""
    from transformers import Qwen3NextForCausalLM

    from plasticity_training.default_model import train_tokenizer

    tokenizer = train_tokenizer(TEXT, VOCAB_SIZE)
    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(tiny_qwen3_next_config(len(tokenizer))).to(torch.bfloat16)
    randomise_router_and_norms(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def randomise_router_and_norms(model) -> None:
    """Random router and norm weights (transformers starts them at zero and one), so the tests exercise the
    routing and the gated norm."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "linear_attn.norm.weight", "layernorm.weight", "norm.weight")):
                p.normal_(0.0, 0.2 if "gate" in name else 0.1).add_(1.0 if "linear_attn.norm" in name else 0.0)


def build_tiny_qwen3_5(out_dir: Path, seed: int = 0) -> Path:
    """Save a random-init tiny Qwen3_5ForCausalLM (dense Qwen 3.5, bfloat16) and its tokenizer in `out_dir`:
    the same 3 GDN + 1 attention layers and sizes as the Qwen3-Next model, with a dense MLP."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    from plasticity_training.default_model import train_tokenizer

    tokenizer = train_tokenizer(TEXT, VOCAB_SIZE)
    torch.manual_seed(seed)
    model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**_qwen3_5_text_fields(len(tokenizer)))).to(torch.bfloat16)
    randomise_router_and_norms(model)  # norms only: a dense MLP has no router
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_qwen3_5_moe(out_dir: Path, seed: int = 0, image_text: bool = False) -> Path:
    """Save a random-init tiny Qwen 3.5 with experts (bfloat16): the Qwen 3.5 model above with the Qwen3-Next
    model's experts and random router. `image_text`: as the MoE releases are published
    (`Qwen3_5MoeForConditionalGeneration`: that language model under `model.language_model.`, plus a
    one-block vision tower under `model.visual.`); else `Qwen3_5MoeForCausalLM`."""
    from transformers import (Qwen3_5MoeConfig, Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration,
                              Qwen3_5MoeTextConfig)

    from plasticity_training.default_model import train_tokenizer

    tokenizer = train_tokenizer(TEXT, VOCAB_SIZE)
    base = tiny_qwen3_next_config(len(tokenizer)).to_dict()
    text = {**_qwen3_5_text_fields(len(tokenizer)), **{k: base[k] for k in (
        "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")}}
    torch.manual_seed(seed)
    if image_text:
        model = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(
            text_config=text, vision_config=_tiny_vision(text["hidden_size"]), tie_word_embeddings=False))
    else:
        model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**text))
    model = model.to(torch.bfloat16)
    randomise_router_and_norms(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_qwen3_5_image_text(out_dir: Path, seed: int = 0) -> Path:
    """Save a random-init tiny `Qwen3_5ForConditionalGeneration` (Qwen 3.5 as it is released: the language
    model above under `model.language_model.`, plus a one-block vision tower under `model.visual.`)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from plasticity_training.default_model import train_tokenizer

    tokenizer = train_tokenizer(TEXT, VOCAB_SIZE)
    text = _qwen3_5_text_fields(len(tokenizer))
    vision = _tiny_vision(text["hidden_size"])
    torch.manual_seed(seed)
    model = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=vision,
                                                          tie_word_embeddings=False)).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def _qwen3_5_text_fields(vocab_size: int) -> dict:
    """The Qwen3-Next model's layer plan and sizes as Qwen 3.5 text config fields (dense MLP, no experts)."""
    base = tiny_qwen3_next_config(vocab_size).to_dict()
    return {k: base[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "layer_types", "num_attention_heads",
        "num_key_value_heads", "head_dim", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
        "linear_value_head_dim", "linear_conv_kernel_dim", "max_position_embeddings", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id")}


def _tiny_vision(out_hidden_size: int) -> dict:
    """A one-block vision tower: present in the release's files, never served or trained here."""
    return dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=out_hidden_size,
                patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
