"""The causal-bank language model's maths, in the project's own words: one set of modules (parameter names
are the decepticons reference's, so its state dicts load as they are) and two entry points both forms use:

    stream(ids, states) -> (hidden, states)   per token: the stream the readout reads, and the new state
    logits(hidden)      -> logits             per token, no state: the readouts and the local/linear mix

The Hugging Face form (causal_bank_hf.py: training, extraction, tests) calls them on whole sequences from
zero state; the vLLM form (causal_bank_vllm.py) calls `stream` per request from the request's saved state
and `logits` on the rows vLLM samples. Torch only: no vLLM, no transformers.

The stream of one token (width CausalBankShape.hidden_size, DESIGN.md "Custom architectures"):
    [substrate modes (+ selective-scan augment) | linear-path embedding | local window, oldest first]
Substrate: h_t = decay * h_{t-1} + emb_t @ linear_in_proj, exactly the reference's T x T kernel
(decay^(t-s)), carried per request, so decode costs the same at any length. Selective scan (state_dim > 0):
s_t = exp(min(A, -1e-6)) * s_{t-1} + B emb_t, augment = out_proj(s_t * C emb_t) + D * emb_t @ linear_in_proj.
The reference computes that scan in chunks of 32 with its cumulative decay clamped at 1e-8, which departs
from the recurrence when a channel decays below 1e-8 within a chunk; this form is the exact recurrence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm_plasticity.architectures.causal_bank_config import CausalBankShape
from vllm_plasticity.architectures.decay_scan import decay_scan


class MLPReadout(nn.Module):
    """GELU MLP: `layers.{i}` then `out` (the reference's MLP names)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], out_dim: int) -> None:
        super().__init__()
        dims = [in_dim, *hidden]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.gelu(layer(x))
        return self.out(x)


class RoutedReadout(nn.Module):
    """A softmax router over squared-ReLU experts; with `tied_to` (the embedding) each expert writes an
    embedding-sized vector that is scored against every token's embedding (the reference's tied readout)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, experts: int, normalize_tied: bool = False) -> None:
        super().__init__()
        self.router = nn.Linear(in_dim, experts)
        self.experts_in = nn.ModuleList(nn.Linear(in_dim, hidden) for _ in range(experts))
        self.experts_out = nn.ModuleList(nn.Linear(hidden, out_dim) for _ in range(experts))
        self.normalize_tied = normalize_tied
        self.__dict__["tied_to"] = None  # the owner's embedding; not a submodule (no second name for it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = torch.softmax(self.router(x), dim=-1)  # (..., E)
        out = 0
        for e, (w_in, w_out) in enumerate(zip(self.experts_in, self.experts_out)):
            out = out + route[..., e:e + 1] * w_out(F.relu(w_in(x)).square())
        if self.tied_to is None:
            return out
        table = self.tied_to.weight
        return out @ (F.normalize(table, dim=-1) if self.normalize_tied else table).T


class TiedRecursiveReadout(nn.Module):
    """One block applied `depth` times with a learned offset per pass (the reference's tied_recursive)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, depth: int) -> None:
        super().__init__()
        self.in_proj, self.block, self.out = nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, out_dim)
        self.depth_deltas = nn.Parameter(torch.zeros(depth, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.in_proj(x)
        for delta in self.depth_deltas:
            h = F.gelu(self.block(h + delta))
        return self.out(h)


def _readout(kind: str, in_dim: int, hidden: tuple[int, ...], vocab: int, embed_dim: int, experts: int,
             depth: int, normalize_tied: bool) -> nn.Module:
    if kind == "mlp" or (kind in ("routed_sqrelu_experts", "tied_embed_readout") and experts < 2):
        return MLPReadout(in_dim, hidden, vocab)
    if kind == "tied_recursive":
        return TiedRecursiveReadout(in_dim, hidden[0], vocab, depth)
    if kind == "tied_embed_readout":
        return RoutedReadout(in_dim, hidden[0], embed_dim, experts, normalize_tied)
    return RoutedReadout(in_dim, hidden[0], vocab, experts)


def _logit_summary(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy, max and variance of each row of logits: the gated mix's inputs."""
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return entropy, logits.max(-1).values, logits.var(-1, unbiased=False)


class CausalBankModules:
    """Mixed into an nn.Module: `build(shape)` adds the modules; `stream` and `logits` run them."""

    causal_bank: CausalBankShape
    # Substrate tensors the reference keeps as buffers unless its substrate_mode learns them: here they are
    # parameters (so they are shared with the trainer and written by checkpoints) that never train.
    frozen_parameters: frozenset[str] = frozenset()

    def build(self, shape: CausalBankShape) -> None:
        f, V, E, M = shape.fields, shape.vocab_size, shape.embedding_dim, shape.linear_modes
        self.causal_bank = shape
        shared = bool(f["share_embedding"]) and bool(M) and bool(shape.local_window)
        self.shared_embedding = nn.Embedding(V, E) if shared else None
        self.linear_embedding = nn.Embedding(V, E) if M and not shared else None
        self.local_embedding = nn.Embedding(V, E) if shape.local_window and not shared else None
        frozen = set()
        if M:
            learns = {"frozen": (), "learnable_decays": ("linear_decays",), "learnable_mixing": ("linear_in_proj",)}
            self.linear_in_proj = nn.Parameter(torch.zeros(E, M))
            self.linear_decays = nn.Parameter(torch.zeros(M))
            frozen = {"linear_in_proj", "linear_decays"} - set(learns[f["substrate_mode"]])
            hidden = tuple(int(h) for h in f["linear_hidden"])
            common = dict(vocab=V, embed_dim=E, experts=int(f["linear_readout_num_experts"]),
                          depth=int(f["linear_readout_depth"]), normalize_tied=bool(f["tied_readout_normalize"]))
            kind = f["linear_readout_kind"]
            self.linear_readout = _readout(kind, M + E, hidden, **common)
            bands = int(f["readout_bands"])
            if bands > 1:
                # The reference builds linear_readout too (unused when banded): kept so its state dicts load.
                band_experts = tuple(f["band_experts"]) or (common["experts"],) * bands
                band_hidden = tuple(h // bands for h in hidden)
                readouts = []
                for i in range(bands):
                    n = band_experts[i] if i < len(band_experts) else common["experts"]
                    readouts.append(nn.Linear(E, V) if n == 0 else
                                    _readout(kind, M // bands + E, band_hidden, **{**common, "experts": n}))
                self._band_readouts = nn.ModuleList(readouts)
                self.static_bands = {i for i in range(bands) if i < len(band_experts) and band_experts[i] == 0}
            if shape.state_heads:
                width = shape.state_heads * shape.state_head_dim
                self._ssm_A = nn.Parameter(torch.zeros(shape.state_heads, shape.state_head_dim))
                self._ssm_B_proj = nn.Linear(E, width, bias=False)
                self._ssm_C_proj = nn.Linear(E, width, bias=False)
                self._ssm_D = nn.Parameter(torch.ones(1))
                self._ssm_out_proj = nn.Linear(width, M, bias=False)
        if shape.local_window:
            self.local_readout = MLPReadout(shape.local_width, tuple(int(h) for h in f["local_hidden"]), V)
        self.gate_proj = nn.Linear(6, 1) if M and shape.local_window and f["mix_mode"] == "gated" else None
        self.frozen_parameters = frozenset(frozen)
        for module in self.modules():
            if isinstance(module, RoutedReadout) and f["linear_readout_kind"] == "tied_embed_readout":
                module.__dict__["tied_to"] = self.shared_embedding or self.linear_embedding

    # ---- per token, with state ------------------------------------------------------------------------
    def zero_states(self, rows: int, device: torch.device) -> list[torch.Tensor]:
        return [torch.zeros(rows, *s, device=device) for s in self.causal_bank.state_shapes()]

    def stream(self, ids: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """ids (R, L) continuing from `states` (fp32, as state_shapes, each (R, ...)) -> the stream
        (R, L, hidden_size) in the weights' dtype and the states after the last token."""
        shape, parts, new, i = self.causal_bank, [], [], 0
        if shape.linear_modes:
            emb = (self.shared_embedding or self.linear_embedding)(ids)  # (R, L, E)
            drive = emb @ self.linear_in_proj  # (R, L, M)
            modes, last = decay_scan(self.linear_decays, drive, states[0])
            new.append(last)
            i = 1
            if shape.state_heads:
                decay = torch.exp(self._ssm_A.clamp(max=-1e-6)).flatten()
                scanned, last = decay_scan(decay, self._ssm_B_proj(emb), states[1])
                new.append(last)
                i = 2
                y = scanned.to(emb.dtype) * self._ssm_C_proj(emb)
                modes = modes + (self._ssm_out_proj(y) + self._ssm_D * drive).float()
            parts += [modes.to(emb.dtype), emb]
        else:
            new.append(states[0])
            i = 1
        if shape.local_window:
            emb = (self.shared_embedding or self.local_embedding)(ids)  # (R, L, E)
            W = shape.local_window
            if W > 1:
                padded = torch.cat([states[i].to(emb.dtype), emb], dim=1)  # (R, W-1+L, E)
                new.append(padded[:, -(W - 1):].float())
                windows = padded.unfold(1, W, 1)  # (R, L, E, W)
                emb = windows.transpose(2, 3)  # (R, L, W, E): oldest first
            parts.append(emb.reshape(*ids.shape, W * shape.embedding_dim))
        return torch.cat(parts, dim=-1), new

    # ---- per token, stateless --------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The stream (..., hidden_size) -> logits (..., vocab)."""
        shape = self.causal_bank
        M, E = shape.linear_modes, shape.embedding_dim
        linear = local = None
        if M:
            modes, emb = hidden[..., :M], hidden[..., M:M + E]
            if hasattr(self, "_band_readouts"):
                size, linear = M // len(self._band_readouts), 0
                for b, readout in enumerate(self._band_readouts):
                    x = emb if b in self.static_bands else torch.cat([modes[..., b * size:(b + 1) * size], emb], -1)
                    linear = linear + readout(x)
            else:
                linear = self.linear_readout(hidden[..., :M + E])
        if shape.local_window:
            local = self.local_readout(hidden[..., shape.linear_width:])
        if linear is None or local is None:
            return linear if local is None else local
        scale = float(shape.fields["local_scale"])
        if self.gate_proj is None:
            return linear + scale * local
        (el, ml, vl), (er, mr, vr) = _logit_summary(linear), _logit_summary(local)
        gate = torch.sigmoid(self.gate_proj(torch.stack([el, er, ml, mr, vl, vr], dim=-1))) * scale
        return linear + gate * local
