"""A CPU training server multiplies with vLLM's oneDNN handles (packed copies of the weights) and packs
the layers a step wrote again when the step is published. What a user relies on: the packed kernel
computes what the weight says, a write to the shared weight is not served half-way (the handle keeps its
copy), and after `repack` the same handle object (the one the compiled forward holds) computes with the
new weight. The server path is covered by the training tests (served log-probs equal Hugging Face on the
live weights after each step)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vllm_plasticity.cpu_repack import RepackableGemm, RepackableSglGemm, repack, repackable_gemm, repackable_kernels_serve

pytestmark = pytest.mark.skipif(not repackable_kernels_serve(), reason="vLLM would not use oneDNN on this CPU")
AMX = torch.cpu._is_amx_tile_supported()


def test_a_handle_keeps_its_copy_until_packed_again():
    torch.manual_seed(0)
    weight = torch.randn(48, 32)
    x = torch.randn(5, 32)
    gemm = RepackableGemm(weight)
    handler = gemm.handler
    assert torch.allclose(gemm(x, weight, None), x @ weight.T, atol=1e-5)
    weight.mul_(-2.0)  # the trainer's in-place write
    assert torch.allclose(gemm(x, weight, None), x @ (weight / -2.0).T, atol=1e-5)
    gemm.repack()
    assert gemm.handler is handler  # what a compiled forward captured still works
    assert torch.allclose(gemm(x, weight, None), x @ weight.T, atol=1e-5)
    bias = torch.randn(48)
    assert torch.allclose(gemm(x, weight, bias), x @ weight.T + bias, atol=1e-5)


@pytest.mark.skipif(not AMX, reason="vLLM's sgl kernel needs AMX")
def test_a_small_bfloat16_layer_gets_vllms_sgl_kernel_packed_again_in_place():
    """What vLLM gives a small bfloat16 weight on an AMX CPU (its sgl kernel over a VNNI-packed copy) is
    repackable too: the copy computes what the weight said when packed, and after `repack` the same packed
    tensor (the one a compiled forward holds) computes with the new weight. Float32 and large layers keep
    oneDNN, as in vLLM."""
    torch.manual_seed(0)
    weight = torch.randn(64, 32).to(torch.bfloat16)
    x = torch.randn(5, 32).to(torch.bfloat16)
    gemm = repackable_gemm(weight)
    assert isinstance(gemm, RepackableSglGemm)
    assert isinstance(repackable_gemm(torch.randn(64, 32)), RepackableGemm)  # float32: oneDNN
    assert isinstance(repackable_gemm(torch.randn(1024, 1024).to(torch.bfloat16)), RepackableGemm)  # 2 MiB
    packed = gemm.packed
    want = (x.float() @ weight.float().T)
    assert torch.allclose(gemm(x, weight, None).float(), want, rtol=2e-2, atol=2e-2)
    weight.mul_(-2.0)  # the trainer's in-place write
    assert torch.allclose(gemm(x, weight, None).float(), want, rtol=2e-2, atol=2e-2)
    gemm.repack()
    assert gemm.packed is packed
    assert torch.allclose(gemm(x, weight, None).float(), -2.0 * want, rtol=2e-2, atol=4e-2)
    bias = torch.randn(64).to(torch.bfloat16)
    assert torch.allclose(gemm(x, weight, bias).float(), -2.0 * want + bias.float(), rtol=2e-2, atol=4e-2)


class Layer(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.cpu_linear = RepackableGemm(self.weight.data)


def test_repack_finds_the_layers_a_steps_parameter_names_live_in():
    torch.manual_seed(0)
    model = nn.Module()
    model.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    model.model = nn.Module()
    model.model.embed_tokens = nn.Module()
    model.model.embed_tokens.weight = nn.Parameter(torch.randn(16, 8), requires_grad=False)
    model.lm_head = Layer(model.model.embed_tokens.weight.data)  # tied: the same tensor
    model.model.layers = nn.ModuleList([nn.Module() for _ in range(2)])
    for layer in model.model.layers:
        layer.self_attn = nn.Module()
        layer.self_attn.qkv_proj = Layer(torch.randn(24, 8))
        layer.self_attn.o_proj = Layer(torch.randn(8, 8))
    assert repack(model, ["model.layers.1.self_attn.k_proj.weight"])["layers"] == 1
    assert repack(model, ["model.layers.0.self_attn.o_proj.weight", "model.norm.weight"])["layers"] == 1
    assert repack(model, ["model.embed_tokens.weight"])["layers"] == 1  # the tied lm_head
    assert repack(model, [])["layers"] == 0
    assert repack(model)["layers"] == 5
    x = torch.randn(3, 8)
    qkv = model.model.layers[1].self_attn.qkv_proj
    qkv.weight.data.add_(1.0)
    repack(model, ["model.layers.1.self_attn.v_proj.weight"])
    assert torch.allclose(qkv.cpu_linear(x, qkv.weight, None), x @ qkv.weight.T, atol=1e-5)
