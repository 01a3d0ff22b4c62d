"""A Mamba2 mixer's full-sequence form that continues from a saved state, with the parameter names and
layouts of vLLM's `MambaMixer2` (one group), so the trainer's views and vLLM's served layer are the same
tensors. Imports torch and transformers, never vLLM.

    >>> mixer = Mamba2Form(hidden=96, inner=192, heads=3, headdim=64, d_state=128, d_conv=4, chunk_size=256)
    >>> y, conv, ssm = mixer.scan(x, conv, ssm)        # x (R, T, hidden); states as tkc_config says

The SSD scan is transformers' reference `mamba2_chunk_scan` (it takes an initial SSM state and returns
the final one); the rest is a projection, a depthwise causal convolution over [saved inputs | new ones],
a gated RMSNorm and an output projection. Why not transformers' `Mamba2Mixer` itself: it keeps its state
in a transformers Cache object and names the decay `A_log`, while vLLM's layer holds `A = -exp(A_log)`;
this form holds `A` itself, so the tensor the trainer steps is the one the server computes with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan


class GatedRMSNorm(nn.Module):
    """RMSNorm of x * silu(gate) over the whole width (one group), fp32 inside: vLLM's Mixer2RMSNormGated."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x = x.float() * F.silu(gate.float())
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


class Mamba2Form(nn.Module):
    """in_proj -> [z | x B C | dt]; causal depthwise conv + silu on x B C; SSD scan; norm(y, z); out_proj."""

    EPS = 1e-5  # vLLM MambaMixer2's default rms_norm_eps

    def __init__(self, hidden: int, inner: int, heads: int, headdim: int, d_state: int, d_conv: int,
                 chunk_size: int) -> None:
        super().__init__()
        self.inner, self.heads, self.headdim, self.d_state, self.chunk_size = inner, heads, headdim, d_state, chunk_size
        self.conv_dim = inner + 2 * d_state
        self.in_proj = nn.Linear(hidden, inner + self.conv_dim + heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=True)
        # Mamba2's initialisation: A = -(1..heads), D = 1, dt_bias = softplus^-1 of a log-uniform dt.
        self.A = nn.Parameter(-torch.arange(1, heads + 1, dtype=torch.float32))
        self.D = nn.Parameter(torch.ones(heads))
        dt = torch.exp(torch.rand(heads) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                       + torch.log(torch.tensor(1e-3))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.norm = GatedRMSNorm(inner, self.EPS)
        self.out_proj = nn.Linear(inner, hidden, bias=False)

    def scan(self, x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (R, T, hidden) after conv_state (R, conv_dim, d_conv - 1) and ssm_state (R, heads, headdim,
        d_state) -> y (R, T, hidden) in x's dtype, and both states after the last token (fp32)."""
        R, T, _ = x.shape
        z, xbc, dt = self.in_proj(x).split([self.inner, self.conv_dim, self.heads], dim=-1)
        window = torch.cat([conv_state.to(xbc.dtype), xbc.transpose(1, 2)], dim=-1)  # (R, conv_dim, k-1+T)
        xbc = F.silu(F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)).transpose(1, 2)
        xs, B, C = xbc.split([self.inner, self.d_state, self.d_state], dim=-1)
        y, final = mamba2_chunk_scan(
            xs.reshape(R, T, self.heads, self.headdim), dt, self.A, B.reshape(R, T, 1, self.d_state),
            C.reshape(R, T, 1, self.d_state), chunk_size=self.chunk_size, D=self.D, dt_bias=self.dt_bias,
            initial_states=ssm_state.float(), dt_softplus=True, return_final_states=True)
        y = self.norm(y.reshape(R, T, self.inner), z)
        new_conv = window[..., window.shape[-1] - conv_state.shape[-1]:]
        return self.out_proj(y.to(x.dtype)), new_conv.float(), final.float()
