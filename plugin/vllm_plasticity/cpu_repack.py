"""Packed CPU kernels for a training server: vLLM's oneDNN GEMM handles, packed again after each step.

Runs in vLLM's worker process. vLLM on CPU multiplies every linear layer (and the lm_head) with a oneDNN
handle that holds its own reordered copy of the weight, made once after loading. A trainer writing the
shared weight tensor changes nothing such a handle reads, so until this module existed training servers
kept every layer in place and multiplied with `F.linear` (0.67 of stock throughput at a 105M shape on 2
cores, against 1.01 with this module: research/serving_results.md). Here each layer keeps its weight tensor (the trainer's view) and a handle of its own; after a step
the API server asks the worker to pack again the layers that step wrote (`repack`), between two engine
steps, so a forward never sees half a pack; whether it can see parts of two steps is the job's `pause`
(training_service.TrainingService._publish).

    >>> use_repacked_kernels(model)             # before vLLM's process_weights_after_loading
    >>> repack(model, ["model.layers.0.mlp.gate_proj.weight"])   # names as the trainer's HF view has them

Why the handle is swapped in place: the forward is compiled (torch.compile) with the handle object as a
constant; the pointer lives in a tensor (`handler_tensor`, vLLM made it a tensor so it is not inlined), so
writing the new pointer into that same tensor is what the compiled graph reads next step. The old native
handle is released when the object holding it is dropped (vLLM's `CPUDNNLGEMMHandler.__del__`).

Each layer gets the kernel vLLM itself would give it (its `dispatch_cpu_unquantized_gemm` order): on CPUs
with AMX, bfloat16/float16 weights of at most 1 MiB go to vLLM's `sgl` kernel, which multiplies with a
VNNI-packed copy (`RepackableSglGemm`: packed again into that same tensor), the rest to oneDNN
(`RepackableGemm`). A 175M Qwen 3.5 shape in bfloat16 has both (its GDN `in_proj_ba` is small): before the
sgl copy was repackable, such a model fell back to `F.linear` on every layer: 0.75 and 0.87 of stock serving in two runs
(research/results/bench_hybrid_serving.md). Where vLLM would use zentorch or oneDNN is missing,
`use_repacked_kernels` returns False and the caller keeps weights in place.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from vllm import _custom_ops as ops
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.utils import check_cpu_sgl_kernel
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod
from vllm.platforms import current_platform

PRIMITIVE_CACHE_SIZE = 32  # what vLLM's own dispatch asks of oneDNN per handle


class RepackableGemm:
    """`layer.cpu_linear` for one layer: a oneDNN handle over `weight`, packed again by `repack()`."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight  # the shared tensor the trainer writes ([N, K])
        self.handler = ops.create_onednn_mm(weight.t(), PRIMITIVE_CACHE_SIZE)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return ops.onednn_mm(self.handler, x, bias)

    def repack(self) -> None:
        fresh = ops.create_onednn_mm(self.weight.t(), PRIMITIVE_CACHE_SIZE)
        old = self.handler.handler_tensor.item()
        self.handler.handler_tensor.fill_(fresh.handler_tensor.item())
        fresh.handler_tensor.fill_(old)  # `fresh` now owns the old handle and releases it when dropped


class RepackableSglGemm:
    """`layer.cpu_linear` for a small bfloat16/float16 layer on an AMX CPU: vLLM's `sgl` kernel over a
    VNNI-packed copy of `weight`, packed again into the same tensor by `repack()` (the compiled forward
    holds that tensor). The kernel takes a float32 bias (vLLM converts it once; the bias here stays the
    shared parameter, converted per call)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight  # the shared tensor the trainer writes ([N, K])
        self.packed = torch.ops._C.convert_weight_packed(weight)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return ops.weight_packed_linear_cpu(x, self.packed, self.weight.shape[0],
                                            None if bias is None else bias.float())

    def repack(self) -> None:
        self.packed.copy_(torch.ops._C.convert_weight_packed(self.weight))


REPACKABLE = (RepackableGemm, RepackableSglGemm)


def repackable_gemm(weight: torch.Tensor) -> RepackableGemm | RepackableSglGemm:
    """The kernel vLLM would multiply `weight` ([N, K]) with, as a repackable one: sgl where vLLM's own size
    test says so, oneDNN otherwise."""
    if check_cpu_sgl_kernel(*weight.shape, weight.dtype):
        return RepackableSglGemm(weight)
    return RepackableGemm(weight)


class RepackedLinearMethod(UnquantizedLinearMethod):
    """vLLM's unquantized linear method, but the layer keeps its weight and a repackable kernel."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if layer.weight.ndim != 2:  # not a GEMM (a GDN conv1d): vLLM's own handling (packed_copies.py)
            return super().process_weights_after_loading(layer)
        layer.cpu_linear = repackable_gemm(layer.weight.data)


class RepackedLMHeadMethod(UnquantizedEmbeddingMethod):
    """The same for the lm_head's logits matmul (the embedding lookup reads the weight itself)."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer.cpu_linear = repackable_gemm(layer.weight.data)


def repackable_kernels_serve() -> bool:
    """Whether vLLM would multiply linear layers on this CPU with kernels this module repacks (oneDNN
    handles, sgl packed copies), not zentorch."""
    if not (current_platform.is_cpu() and ops._supports_onednn):
        return False
    # vLLM's own test, in dispatch_cpu_unquantized_gemm's order: zentorch comes first
    return not (current_platform.is_zen_cpu() and hasattr(torch.ops.zentorch, "zentorch_linear_unary"))


def use_repacked_kernels(model: torch.nn.Module) -> bool:
    """Give every unquantized linear layer and the lm_head a repackable kernel after loading; False
    (nothing changed) where vLLM's CPU path would use a kernel this module does not repack."""
    if not repackable_kernels_serve():
        return False
    for module in model.modules():
        if isinstance(module, LinearBase) and type(module.quant_method) is UnquantizedLinearMethod:
            module.quant_method = RepackedLinearMethod()
        elif isinstance(module, ParallelLMHead) and type(module.quant_method) is UnquantizedEmbeddingMethod:
            module.quant_method = RepackedLMHeadMethod()
    return True


def repack(model: torch.nn.Module, trained: Iterable[str] | None = None) -> dict:
    """Pack again the layers holding `trained` (the trainer's parameter names; fused projections map
    to vLLM's fused layer through the model's `packed_modules_mapping`), or every layer when None.
    Returns {"layers": packed, "seconds": time taken}."""
    t0 = time.perf_counter()
    modules = dict(model.named_modules())
    gemms = {name: m.cpu_linear for name, m in modules.items() if isinstance(getattr(m, "cpu_linear", None), REPACKABLE)}
    fused = {part: whole for whole, parts in getattr(model, "packed_modules_mapping", {}).items() for part in parts}
    by_storage = {g.weight.data_ptr(): m for m, g in gemms.items()}  # tied embeddings: the lm_head's is the embedding's
    chosen: set[str] = set(gemms) if trained is None else set()
    for name in trained or ():
        module, _, _ = name.rpartition(".")  # drop ".weight" / ".bias"
        parent, _, leaf = module.rpartition(".")
        chosen |= {m for m in (module, f"{parent}.{fused.get(leaf, leaf)}".lstrip(".")) if m in gemms}
        weight = getattr(modules.get(module), "weight", None)
        if weight is not None and weight.data_ptr() in by_storage:
            chosen.add(by_storage[weight.data_ptr()])
    for name in sorted(chosen):
        gemms[name].repack()
    return {"layers": len(chosen), "seconds": time.perf_counter() - t0}
