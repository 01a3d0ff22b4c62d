"""A Hugging Face model whose parameters are views into vLLM's live weight tensors.

Runs in the trainer process (and in tests). Imports torch and transformers, never vLLM.

    >>> weights = map_shared_weights(manifest)                  # {vLLM name: tensor aliasing vLLM's}
    >>> model = build_hf_view(model_path, weights)              # nothing copied
    >>> model(input_ids).logits                                 # = vLLM's logits for the same weights

vLLM fuses some projections: `qkv_proj` holds q, k, v stacked by rows and `gate_up_proj` holds gate, up
(see `packed_modules_mapping` in vLLM's Llama/Qwen2/Qwen3/Qwen3-Next; at tensor-parallel size 1 these are
contiguous row blocks; Qwen3-Next's q_proj is q and its output gate interleaved per head on both sides).
Qwen3-Next's fused experts are whole tensors under other names (RENAMED). Each HF projection becomes a row slice of the fused tensor, so a gradient step on the HF
`q_proj.weight` writes straight into vLLM's `qkv_proj.weight`. vLLM may pad the vocabulary dimension of
the embedding and lm_head; the HF view takes the first `vocab_size` rows. Tied embeddings stay tied:
vLLM has one tensor and HF's lm_head points at the same Parameter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from plasticity_training import tensor_parallel
from plasticity_training.tensor_parallel import Shard
from vllm_plasticity.contract.architectures import REGISTRY

# HF sub-module -> (vLLM fused sub-module, the HF siblings stacked in it, in row order).
FUSED = {
    "q_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "k_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "v_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "gate_proj": ("gate_up_proj", ("gate_proj", "up_proj")),
    "up_proj": ("gate_up_proj", ("gate_proj", "up_proj")),
    # Qwen 3.5's Gated DeltaNet: checkpoints hold them apart; vLLM stacks them without interleaving
    # (`gqa_interleaved_layout=False`): in_proj_qkvz = q, k, v (in_proj_qkv's rows) then z; in_proj_ba = b, a.
    "in_proj_qkv": ("in_proj_qkvz", ("in_proj_qkv", "in_proj_z")),
    "in_proj_z": ("in_proj_qkvz", ("in_proj_qkv", "in_proj_z")),
    "in_proj_b": ("in_proj_ba", ("in_proj_b", "in_proj_a")),
    "in_proj_a": ("in_proj_ba", ("in_proj_b", "in_proj_a")),
}
# HF parameter -> vLLM parameter of another name, whole (same shape and layout). Qwen3-Next's experts:
# transformers stacks them as gate_up_proj [E, 2I, H] (gate rows, then up) and down_proj [E, H, I]; vLLM's
# fused-MoE loader fills w13 with w1 (gate) then w3 (up) per expert, the same layout, held by the MoE
# runner's `routed_experts` (vllm/model_executor/layers/fused_moe). Its Gated DeltaNet parameters
# (in_proj_qkvz, in_proj_ba: interleaved per key-head group in both; conv1d [dim, 1, width]; A_log;
# dt_bias; the gated norm; out_proj) have the same names and shapes on both sides.
RENAMED = {
    "mlp.experts.gate_up_proj": "mlp.experts.routed_experts.w13_weight",
    "mlp.experts.down_proj": "mlp.experts.routed_experts.w2_weight",
}
# From the architecture table (contract/architectures.py). Stock forms (transformers' own HF class) are viewed
# through the fused tensors above; the project's own architectures (an `hf_form` of their own) are served
# under the same parameter names as their Hugging Face form, unfused, so each HF parameter is the whole
# vLLM tensor of the same name.
SUPPORTED_MODEL_TYPES = tuple(arch.model_type for arch in REGISTRY if not arch.hf_form)
PROJECT_MODEL_TYPES = tuple(arch.model_type for arch in REGISTRY if arch.hf_form)


class ViewError(RuntimeError):
    pass


def vllm_source(hf_name: str, shapes: dict[str, torch.Size]) -> tuple[str, int, int]:
    """(vLLM tensor name, first row, row count) holding HF parameter `hf_name` of the meta model.

    `shapes` gives the HF model's parameter shapes, used to find a fused slice's offset.
    """
    parts = hf_name.split(".")
    if len(parts) >= 2 and parts[-2] in FUSED:
        fused, siblings = FUSED[parts[-2]]
        prefix, leaf = ".".join(parts[:-2]), parts[-1]
        start = 0
        for sibling in siblings:
            rows = shapes[f"{prefix}.{sibling}.{leaf}"][0]
            if sibling == parts[-2]:
                return f"{prefix}.{fused}.{leaf}", start, rows
            start += rows
    rows = shapes[hf_name][0] if len(shapes[hf_name]) else 0
    for hf_suffix, vllm_suffix in RENAMED.items():
        if hf_name.endswith("." + hf_suffix):
            return hf_name.removesuffix(hf_suffix) + vllm_suffix, 0, rows
    return hf_name, 0, rows


def build_hf_view(model_path: str | Path, weights: dict[str, torch.Tensor], attn_implementation: str = "sdpa",
                  shard: Shard | None = None) -> nn.Module:
    """The HF causal LM for `model_path` with every parameter a view of `weights` (vLLM names). With a
    `shard` of a tensor-parallel server, `weights` are that rank's and the model is its part
    (tensor_parallel.py): run it on every rank at once."""
    import transformers

    from vllm_plasticity.architectures import register_with_transformers

    register_with_transformers()
    config = transformers.AutoConfig.from_pretrained(model_path)
    if config.model_type in PROJECT_MODEL_TYPES:
        return _project_view(config, weights)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ViewError(f"model type {config.model_type!r} is not supported "
                        f"(supported: {SUPPORTED_MODEL_TYPES + PROJECT_MODEL_TYPES})")
    some = next(iter(weights.values()))
    config = config.get_text_config()  # an image-text release (Qwen 3.5) is served and trained as its text model
    split = shard is not None and shard.world > 1
    if split:
        config = tensor_parallel.local_config(config, shard.world)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=some.dtype)
    shapes = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}

    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, shape in shapes.items():
        if (tied or split) and name == "lm_head.weight" or split and name == "model.embed_tokens.weight":
            continue  # tied, or one vocabulary block: below
        source, start, rows = vllm_source(name, shapes)
        if source not in weights:
            raise ViewError(f"no vLLM tensor {source!r} for HF parameter {name!r}")
        tensor = weights[source]
        view = tensor[start : start + rows] if len(shape) else tensor
        if view.shape != shape:
            if len(shape) == 2 and view.shape[1:] == shape[1:] and view.shape[0] > shape[0]:
                view = view[: shape[0]]  # vLLM pads the vocabulary dimension
            else:
                raise ViewError(f"{name}: HF shape {tuple(shape)} vs vLLM {source} slice {tuple(view.shape)}")
        module_name, leaf = name.rsplit(".", 1)
        model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(view, requires_grad=True)
    if split:
        _split_vocabulary(model, config, weights, shard, tied)
    elif tied:
        model.lm_head.weight = model.model.embed_tokens.weight

    # Buffers (the rotary inverse frequencies) were made on the meta device: rebuild them for real.
    with torch.device(some.device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise ViewError(f"buffer {name!r} is still on the meta device")
    model.eval()  # no dropout: the trainer's forward must equal vLLM's
    return model


def _split_vocabulary(model: nn.Module, config, weights: dict[str, torch.Tensor], shard: Shard, tied: bool) -> None:
    """Embedding and lm_head as this rank's vocabulary block (whole, padding rows included), and the
    blocks hooked for the all-reduces."""
    rows = tensor_parallel.padded_vocab(config.vocab_size, shard.world) // shard.world
    embed = weights["model.embed_tokens.weight"]
    if embed.shape[0] != rows:
        raise ViewError(f"model.embed_tokens.weight: {embed.shape[0]} rows on rank {shard.rank}, expected {rows} "
                        f"(vocabulary {config.vocab_size} padded to {tensor_parallel.VOCAB_PADDING}, over {shard.world})")
    start = shard.rank * rows
    model.model.embed_tokens = tensor_parallel.VocabShardEmbedding(nn.Parameter(embed, requires_grad=True), start, shard)
    head = (model.model.embed_tokens.weight if tied
            else nn.Parameter(weights["lm_head.weight"], requires_grad=True))
    if head.shape != embed.shape:
        raise ViewError(f"lm_head.weight: {tuple(head.shape)} on rank {shard.rank}, expected {tuple(embed.shape)}")
    model.lm_head = tensor_parallel.VocabShardHead(head, start, config.vocab_size, shard)
    tensor_parallel.split_blocks(model, shard)


def _project_view(config, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A project architecture's HF form on views of `weights` (same names; nothing fused or padded).
    Parameters the architecture never trains (`frozen_parameters`, e.g. a frozen substrate) keep
    requires_grad False; the trainer leaves them out of the optimizer."""
    import transformers

    some = next(iter(weights.values()))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=some.dtype)
    frozen = set(getattr(model, "frozen_parameters", ()))
    for name, param in list(model.named_parameters()):
        if name not in weights:
            raise ViewError(f"no vLLM tensor {name!r} for {config.model_type} parameter {name!r}")
        if weights[name].shape != param.shape:
            raise ViewError(f"{name}: HF shape {tuple(param.shape)} vs vLLM {tuple(weights[name].shape)}")
        module_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(module_name) if module_name else model
        owner._parameters[leaf] = nn.Parameter(weights[name], requires_grad=name not in frozen)
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise ViewError(f"buffer {name!r} is still on the meta device")
    model.eval()
    return model


@torch.no_grad()
def token_logprobs(model: nn.Module, input_ids: list[int]) -> list[float]:
    """log p(token_i | tokens_<i) for i = 1..n-1 under `model` (fp32 maths)."""
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)  # (1, T)
    logits = model(input_ids=ids).logits  # (1, T, V), or this rank's vocabulary block
    return tensor_parallel.token_logprobs(model, logits[0, :-1], ids[0, 1:]).tolist()
