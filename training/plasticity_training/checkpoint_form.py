"""How the trainer's tensors are named and completed in a checkpoint of the served model.

Runs in the trainer process (trainer_core.TrainerCore keeps one per served model). The trainer's HF view is
a text model. Most checkpoints are one too: the checkpoint then holds the view's tensors (hf_tensors) under
their own names. Qwen 3.5 is released as an image-text model (`Qwen3_5ForConditionalGeneration`): its
language model's tensors are named `model.language_model.*` where the view (`Qwen3_5ForCausalLM`, served
text only) has `model.*`, and the vision tower (`model.visual.*`, and a multi-token-prediction head where
the release has one) is neither served nor trained. Such a checkpoint keeps the release's names and carries
the tensors the view lacks over from the model's own files, unchanged, so it loads as the whole model again.
Mixture-of-experts releases (Qwen3-Next, Qwen 3.5 MoE) store each expert's projections apart
(`mlp.experts.<e>.gate_proj.weight`, `up_proj`, `down_proj`) where the view holds them stacked
(`mlp.experts.gate_up_proj` [experts, 2 x inner, hidden], gate rows first; `mlp.experts.down_proj`); a
checkpoint of such a model writes them apart again, as views of the stacked tensors (no copy).

    >>> form = CheckpointForm(model_dir)
    >>> sync_checkpoint(form.tensors(view), target, model_dir, changes=...)   # names as the release has them
    >>> changes.stepped(form.names(stepped_view_names))
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from plasticity_training.checkpoint import CheckpointError, resolve_checkpoint
from plasticity_training.checkpoint_tensors import hf_tensors

LANGUAGE_MODEL_PREFIX = "model.language_model."  # where image-text releases keep the language model's tensors
PER_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")  # a release's expert tensor
STACKED_EXPERTS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")  # the view's


class CheckpointForm:
    """The checkpoint names of the view's tensors, and the tensors a checkpoint carries over unchanged."""

    def __init__(self, model_dir: str | Path) -> None:
        try:
            self.source = resolve_checkpoint(model_dir)  # serving a checkpoint: its current generation's files
        except CheckpointError:
            self.source = Path(model_dir)
        self.files = {name: path for path in sorted(self.source.glob("*.safetensors")) for name in _names(path)}
        self.image_text = any(name.startswith(LANGUAGE_MODEL_PREFIX) for name in self.files)
        self.per_expert = any(PER_EXPERT.search(name) for name in self.files)
        self._carried: dict[str, torch.Tensor] | None = None

    def name(self, view_name: str) -> str:
        """The checkpoint's name for the view's tensor `view_name`."""
        if self.image_text and view_name.startswith("model."):
            return LANGUAGE_MODEL_PREFIX + view_name.removeprefix("model.")
        return view_name

    def names(self, view_names: Iterable[str], view: nn.Module | None = None) -> list[str]:
        """The checkpoint's names for the view's tensors `view_names` (a stacked expert tensor has one per
        expert and projection where the release keeps experts apart: `view` gives the expert count)."""
        out = []
        for n in view_names:
            if self.per_expert and n.endswith(STACKED_EXPERTS) and view is not None:
                out += [self.name(name) for name in _split_experts(n, view.get_parameter(n))]
            else:
                out.append(self.name(n))
        return out

    def tensors(self, view: nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor the checkpoint holds: the view's (live, under checkpoint names) and, for an image-text
        release, the ones it carries over (read from the model's files once, then kept)."""
        out = {}
        for n, t in hf_tensors(view).items():
            parts = _split_experts(n, t) if self.per_expert and n.endswith(STACKED_EXPERTS) else {n: t}
            out.update((self.name(name), part) for name, part in parts.items())
        if self.image_text:
            if self._carried is None:
                from safetensors import safe_open

                self._carried = {}
                for name, path in self.files.items():
                    if name not in out:
                        with safe_open(str(path), "pt") as f:
                            self._carried[name] = f.get_tensor(name)
            out.update(self._carried)
        return out


def _split_experts(name: str, stacked: torch.Tensor) -> dict[str, torch.Tensor]:
    """A stacked expert tensor as the release names its experts' projections: views, one per expert (a
    gate_up_proj row block is contiguous in a contiguous stack)."""
    module = name[: -len(name.rsplit(".", 1)[1])]  # "...mlp.experts."
    if name.endswith("gate_up_proj"):
        inner = stacked.shape[1] // 2
        return {f"{module}{e}.{proj}.weight": rows for e in range(stacked.shape[0])
                for proj, rows in (("gate_proj", stacked[e, :inner]), ("up_proj", stacked[e, inner:]))}
    return {f"{module}{e}.down_proj.weight": stacked[e] for e in range(stacked.shape[0])}


def _names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())
