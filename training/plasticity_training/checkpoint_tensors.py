"""Which tensors a checkpoint holds: every tensor `save_pretrained` would write, as views of the live weights.

Runs in the trainer process. The model is the HF view (hf_view.build_hf_view: HF names, views of vLLM's
live tensors, the fused `qkv_proj`/`gate_up_proj` already split back, vLLM's vocabulary padding cut off),
so a checkpoint of these tensors is a stock Hugging Face checkpoint.

    >>> sync_checkpoint(hf_tensors(core.model), target, model_dir)
"""

from __future__ import annotations

import torch
from torch import nn


def hf_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF name -> tensor (a view, no copy) for every tensor `save_pretrained` would write.

    `model` is the HF view from build_hf_view (its parameters already carry HF names and are views of
    vLLM's tensors) or any HF causal LM. Persistent buffers are included, tied parameters appear once and
    lm_head.weight is left out when the config ties it to the embeddings (as save_pretrained does).
    A tensor is made contiguous (copied) only when it is not already.
    """
    config = getattr(model, "config", None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if tied and name == "lm_head.weight":
            continue
        if id(t) in seen:  # the same Parameter under a second name (tied weights)
            continue
        seen.add(id(t))
        t = t.detach()
        out[name] = t if t.is_contiguous() else t.contiguous()
    return out
