"""Weights vLLM's CPU kernels read only as a packed copy: packed again from the shared tensor after a step.

Runs in vLLM's worker process. Two CPU kernels in vLLM 0.32 have no path that reads the loaded layout, so
keeping their weight in place (as `weights_in_place.keep_weights_in_place` does for linear layers) would compute
garbage or is not offered at all:
  - Gated DeltaNet's causal conv1d on AVX512-BF16 / Arm-bf16 CPUs: `dispatch_cpu_unquantized_gemm` packs
    `conv1d.weight` ([dim, 1, width] -> a packed [dim, width]) and the GDN op always passes
    `is_weight_packed=True` on those CPUs (layers/mamba/ops/cpu/gdn_attention.py);
  - fused MoE experts: `CPUUnquantizedExperts.process_weights_after_loading` replaces `w13_weight` /
    `w2_weight` by `cpu_prepack_moe_weight` copies (same shape, another element order), after padding the
    intermediate size to the kernel's alignment.
The arena (contract/weights.py) is filled in `load_weights`, before those run, so the shared tensors keep
the loaded layout: they are what the trainer maps and writes. After a published step the worker packs
them again *into the served copy's own storage* (`refresh`), so the compiled forward, which holds that
storage, computes with the new weights; like cpu_repack.py, a forward never sees half a pack.

    >>> copies = PackedCopies(model, model.plasticity_shared_views)   # after process_weights_after_loading
    >>> copies.refresh(["model.layers.0.mlp.experts.gate_up_proj"])   # the trainer's (HF) names; None: all
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from vllm import _custom_ops as ops
from vllm.model_executor.layers.linear import LinearBase

# The fused-MoE module's own name under the HF name of the experts (vLLM's MoERunner holds the weights in
# `routed_experts`; the trainer's HF view calls the same tensors `<layer>.mlp.experts.gate_up_proj` etc.).
ROUTED = ".routed_experts"


def may_pack_a_copy(module: torch.nn.Module) -> bool:
    """Whether vLLM's CPU path may serve `module` from a packed copy of its weight (see the module doc);
    asked as loaded, before vLLM's process_weights_after_loading (which packs a conv1d into 2-D)."""
    if isinstance(module, LinearBase):
        return module.weight.ndim == 3  # a causal conv1d's [dim, 1, width]; 2-D weights are linear layers
    return isinstance(getattr(module, "w13_weight", None), torch.Tensor)


class PackedCopies:
    """The modules of `model` whose served weight is a packed copy of the shared tensor in `shared`
    ({vLLM parameter name: the arena view it had after loading})."""

    def __init__(self, model: torch.nn.Module, shared: dict[str, torch.Tensor]) -> None:
        self.convs: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}
        self.experts: dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor, str]] = {}
        for name, module in model.named_modules():
            if isinstance(module, LinearBase):
                source = shared.get(f"{name}.weight")
                if source is None or source.ndim != 3:  # judged on the loaded shape: a packed conv1d is 2-D
                    continue
                if module.weight.data_ptr() != source.data_ptr():
                    plain = source.view(source.shape[0], source.shape[-1])  # [dim, width]
                    module._cpu_unpacked_conv_weight = plain  # vLLM's spec-decode fallback reads it: keep it live
                    self.convs[name] = (module, plain)
            elif may_pack_a_copy(module) and module.w13_weight.data_ptr() != shared[f"{name}.w13_weight"].data_ptr():
                kernel = getattr(getattr(module.quant_method, "moe_kernel", None), "fused_experts", None)
                isa = getattr(kernel, "isa", None)
                if isa is None:  # a CPU MoE kernel this module does not know how to pack (e.g. zentorch)
                    raise RuntimeError(f"{name}: vLLM serves these experts from a copy plasticity cannot "
                                       f"pack again ({type(kernel).__name__}); train with PLASTICITY_TRAINING=0")
                self.experts[name] = (module, shared[f"{name}.w13_weight"], shared[f"{name}.w2_weight"], isa)

    def __len__(self) -> int:
        return len(self.convs) + len(self.experts)

    def refresh(self, trained: Iterable[str] | None = None) -> dict:
        """Pack again the copies of the modules holding `trained` (HF or vLLM names; None: every copy).
        Returns {"layers": packed, "seconds": time taken}."""
        t0 = time.perf_counter()
        owners = None if trained is None else {n.rpartition(".")[0] for n in trained}
        count = 0
        for name, (module, plain) in self.convs.items():
            if owners is None or name in owners:
                module.weight.data.copy_(ops.causal_conv1d_weight_pack(plain.contiguous()))
                count += 1
        for name, (module, w13, w2, isa) in self.experts.items():
            if owners is None or name in owners or name.removesuffix(ROUTED) in owners:
                module.w13_weight.data.copy_(ops.cpu_prepack_moe_weight(_padded_w13(w13, module.w13_weight.shape), isa))
                module.w2_weight.data.copy_(ops.cpu_prepack_moe_weight(_padded_w2(w2, module.w2_weight.shape), isa))
                count += 1
        return {"layers": count, "seconds": time.perf_counter() - t0}


def _padded_w13(w13: torch.Tensor, served: torch.Size) -> torch.Tensor:
    """[E, 2I, H] gate|up -> [E, 2P, H] with each half zero-padded to P rows, as vLLM's CPU MoE pads it."""
    inter, padded = w13.shape[1] // 2, served[1] // 2
    if padded == inter:
        return w13
    out = w13.new_zeros(served)
    out[:, :inter] = w13[:, :inter]
    out[:, padded : padded + inter] = w13[:, inter:]
    return out


def _padded_w2(w2: torch.Tensor, served: torch.Size) -> torch.Tensor:
    """[E, H, I] -> [E, H, P], zero columns after I."""
    if served[2] == w2.shape[2]:
        return w2
    out = w2.new_zeros(served)
    out[:, :, : w2.shape[2]] = w2
    return out
