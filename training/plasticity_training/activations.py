"""Residual-stream activations of the corpus texts, from a Hugging Face model (or, later, the server).

Runs in the extraction process. The hidden state of layer L is the residual stream at the output of
decoder layer L, before the final norm, layers indexed from 0: the same state the server's readout
scores (score = state . unit vector). It is captured with a forward hook on decoder block L, not from
`output_hidden_states`, whose last entry has the final norm applied. All maths is fp32 whatever dtype
the model runs in.

    >>> source = HFSource.load("path/to/model")                      # device and dtype picked sanely
    >>> layers = resolve_layers("0.66", source.num_layers)           # [2] on a 4-layer model
    >>> acts = source.collect(texts, layers, bases=True, heads=True)
    >>> acts.pooled["mean"][2].shape                                 # (n_texts, hidden)

Pooling, per text and layer: "last" (the last token's state), "mean" (mean over tokens, skipping the
first `skip_tokens`: position 0 carries the attention sink's outsized norm in most LLMs) and, for the
subspace method, the full token trajectory reduced to its right singular vectors ("bases"). Mean
pooling is the average of what the decode-time readout would read at each prefix of the story.

`ServerSource` reads the same states through a running server's readout (vectors from exactly the
weights being served, after /train too).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

Pooling = Literal["mean", "last"]
POOLINGS: tuple[Pooling, ...] = ("mean", "last")
DEFAULT_LAYERS = "0.66"  # relative depth: emotion concepts read best around two thirds of the way up
MAX_TOKENS_CAP = 2048  # default truncation: the model's context, at most this


@dataclasses.dataclass(frozen=True)
class LayerParts:
    """What the quality report decomposes one decoder layer's write into (read off the HF module by
    `layer_parts`): its token mixer's heads and its MLP's neurons, and why a decomposition does not apply."""

    mixer: str  # "attention", "gated_deltanet" (one block of out_proj columns per value head) or the class name
    n_heads: int | None  # heads whose concatenated outputs `heads_out` projects; None: not decomposed
    not_decomposed: tuple[str, ...] = ()  # one sentence per diagnostic this layer has no part for


@dataclasses.dataclass
class Activations:
    """What extraction and the report need from one pass over the corpus (all fp32, on the CPU)."""

    layers: list[int]
    hidden_size: int
    pooled: dict[str, dict[int, Tensor]]  # pooling -> layer -> (N, H)
    n_tokens: list[int]  # tokens forwarded per text, after truncation
    bases: dict[int, list[Tensor]] | None = None  # layer -> per text (r_i, H), orthonormal rows
    heads: dict[str, dict[int, Tensor]] | None = None  # pooling -> layer -> (N, n_heads * head_dim): heads_out input
    weights: dict[int, dict[str, Tensor]] | None = None  # layer -> {"down_proj": (H, I), "heads_out": (H, n_heads*hd)}
    parts: dict[int, LayerParts] | None = None  # layer -> what its write decomposes into (HF models only)
    truncated: int = 0  # texts cut at max_tokens

    def only(self, layers: Sequence[int]) -> Activations:
        """The same activations at `layers` only (what `--layers auto` keeps after choosing)."""
        pick = lambda per_layer: {L: per_layer[L] for L in layers}  # noqa: E731
        return dataclasses.replace(
            self, layers=list(layers), pooled={k: pick(v) for k, v in self.pooled.items()},
            bases=pick(self.bases) if self.bases is not None else None,
            heads={k: pick(v) for k, v in self.heads.items()} if self.heads is not None else None,
            weights=pick(self.weights) if self.weights is not None else None,
            parts=pick(self.parts) if self.parts is not None else None)

    def saturated(self, layer: int) -> int:
        """Texts whose token states span the whole space at `layer` (projector = identity, no contrast)."""
        return sum(v.shape[0] >= self.hidden_size for v in (self.bases or {}).get(layer, []))


class ActivationSource(Protocol):
    """Where activations come from: a local HF model (HFSource) or the running server (ServerSource)."""

    model_name: str  # recorded as the bank's "model"
    num_layers: int
    hidden_size: int

    def collect(self, texts: Sequence[str], layers: Sequence[int], *, skip_tokens: int = 1, bases: bool = False,
                subspace_rank: int | None = None, heads: bool = False, progress: bool = True) -> Activations: ...


def resolve_layers(spec: str | Sequence[int | float] | None, num_layers: int) -> list[int]:
    """Layer indices from a spec: "all", indices ("10,12", "-1"), relative depths ("0.66"), or a mix.

    A relative depth f in [0, 1] (written with a decimal point) is layer round(f * (num_layers - 1)).
    """
    spec = DEFAULT_LAYERS if spec is None else spec
    items = [s for s in re.split(r"[,\s]+", spec.strip()) if s] if isinstance(spec, str) else list(spec)
    if items == ["all"]:
        return list(range(num_layers))
    out: list[int] = []
    for item in items:
        text = str(item)
        try:
            if isinstance(item, float) or "." in text:
                f = float(text)
                if not 0.0 <= f <= 1.0:
                    raise ValueError
                idx = round(f * (num_layers - 1))
            else:
                idx = int(text)
                idx = idx + num_layers if idx < 0 else idx
                if not 0 <= idx < num_layers:
                    raise ValueError
        except ValueError:
            raise ValueError(f"Invalid layer {text!r}: expected an index in [-{num_layers}, {num_layers - 1}], "
                             f"a relative depth in [0.0, 1.0], or 'all'") from None
        if idx not in out:
            out.append(idx)
    if not out:
        raise ValueError(f"Invalid layers {spec!r}: no layer given")
    return sorted(out)


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of an HF model: `<base>.layers` for Llama/Qwen, else the ModuleList of
    config.num_hidden_layers modules (GPT-2's `h`, ...)."""
    base = getattr(model, "base_model", model)
    if isinstance(getattr(base, "layers", None), nn.ModuleList):
        return base.layers
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise RuntimeError(f"cannot find the decoder layers of {type(model).__name__}: expected `model.layers` or a "
                       f"ModuleList of num_hidden_layers={n} blocks")


def check_collect_args(layers: Sequence[int], num_layers: int, skip_tokens: int, subspace_rank: int | None) -> list[int]:
    """The sorted distinct `layers`, after checking the arguments every source's `collect` takes."""
    layers = sorted(set(layers))
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"Invalid layers {layers}: the model has {num_layers} (0..{num_layers - 1})")
    if skip_tokens < 0:
        raise ValueError(f"Invalid skip_tokens: {skip_tokens} (must be >= 0)")
    if subspace_rank is not None and subspace_rank < 1:
        raise ValueError(f"Invalid subspace_rank: {subspace_rank} (must be >= 1, or None for full rank)")
    return layers


def pool_text(states: Tensor, skip_tokens: int, bases: bool, rank: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """One text's (T, H) states at one layer -> (last token, mean over tokens after the first
    `skip_tokens`, row basis of those tokens or None): the pooling both sources share."""
    s = min(skip_tokens, len(states) - 1)  # a one-token text keeps its token
    return states[-1], states[s:].mean(0), row_basis(states[s:], rank) if bases else None


def row_basis(states: Tensor, rank: int | None) -> Tensor:
    """Orthonormal basis (r, H) of the row space of a (T, H) token-state matrix: its right singular vectors,
    numerically non-zero ones only, at most `rank` of them (None = full rank, min(T, H))."""
    _, S, Vh = torch.linalg.svd(states, full_matrices=False)  # Vh: (min(T, H), H)
    tol = S[0] * max(states.shape) * torch.finfo(states.dtype).eps if S.numel() else 0.0
    r = int((S > tol).sum())
    return Vh[: min(r, rank) if rank else r]


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar on stderr (rate and ETA); silent when disabled."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


class HFSource:
    """Activations from a Hugging Face causal LM held in this process."""

    def __init__(self, model: nn.Module, tokenizer, model_name: str, batch_size: int = 8,
                 max_tokens: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size} (must be >= 1)")
        self.model, self.tokenizer, self.model_name = model.eval(), tokenizer, model_name
        self.blocks = find_decoder_layers(model)
        config = model.config
        self.num_layers, self.hidden_size = len(self.blocks), int(config.hidden_size)
        self.batch_size = batch_size
        context = getattr(config, "max_position_embeddings", None) or MAX_TOKENS_CAP
        self.max_tokens = max_tokens or min(int(context), MAX_TOKENS_CAP)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def load(cls, model_dir: str | Path, device: str | None = None, dtype: str = "auto", **kwargs) -> HFSource:
        """Load MODEL_DIR (a local directory or a hub name already in the cache).

        `dtype="auto"` runs float32 on the CPU and the checkpoint's own dtype on a GPU.
        """
        import transformers

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype_arg = torch.float32 if device == "cpu" else "auto"
        elif dtype in ("float32", "bfloat16", "float16"):
            dtype_arg = getattr(torch, dtype)
        else:
            raise ValueError(f"Invalid dtype: {dtype!r} (expected auto, float32, bfloat16 or float16)")
        from vllm_plasticity.architectures import register_with_transformers

        register_with_transformers()  # the project's own architectures load like any HF causal LM
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype_arg).to(device)
        name = str(Path(model_dir).resolve()) if Path(model_dir).exists() else str(model_dir)
        return cls(model, tokenizer, name, **kwargs)

    @torch.no_grad()
    def collect(self, texts: Sequence[str], layers: Sequence[int], *, skip_tokens: int = 1, bases: bool = False,
                subspace_rank: int | None = None, heads: bool = False, progress: bool = True) -> Activations:
        """Forward every text once (batched, longest first) and pool each requested layer's states."""
        layers = check_collect_args(layers, self.num_layers, skip_tokens, subspace_rank)
        device = next(self.model.parameters()).device
        full = [self.tokenizer(t)["input_ids"] for t in texts]
        enc, truncated = [ids[: self.max_tokens] for ids in full], sum(len(ids) > self.max_tokens for ids in full)
        order = sorted(range(len(texts)), key=lambda i: (-len(enc[i]), i))  # longest first: fail fast on memory
        N, H = len(texts), self.hidden_size
        pooled = {p: {L: torch.zeros(N, H) for L in layers} for p in POOLINGS}
        basis_rows: dict[int, list[Tensor | None]] = {L: [None] * N for L in layers}
        head_acts: dict[str, dict[int, Tensor]] = {p: {} for p in POOLINGS}

        captured: dict[str, Tensor] = {}
        hooks = [self.blocks[L].register_forward_hook(_capture(captured, f"res{L}", stop=L == layers[-1]))
                 for L in layers]
        parts = {L: layer_parts(self.blocks[L], self.model.config) for L in layers}
        if heads:
            for L in layers:
                heads_out = parts[L][1]
                if heads_out is not None:
                    hooks.append(heads_out.register_forward_pre_hook(_capture_input(captured, f"head{L}")))
        batches = [order[i : i + self.batch_size] for i in range(0, N, self.batch_size)]
        bar = progress_bar(len(batches), progress, desc="forward")
        try:
            for batch in batches:
                T = len(enc[batch[0]])
                ids = torch.full((len(batch), T), self.tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(batch), T), dtype=torch.long)
                for b, i in enumerate(batch):
                    ids[b, : len(enc[i])], mask[b, : len(enc[i])] = torch.tensor(enc[i]), 1
                captured.clear()
                try:
                    self.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device))
                except _StopForward:  # the deepest requested layer is done: skip the rest of the model
                    pass
                for b, i in enumerate(batch):
                    n = len(enc[i])
                    for L in layers:
                        states = captured[f"res{L}"][b, :n]  # (T_i, H) fp32
                        last, mean, basis = pool_text(states, skip_tokens, bases, subspace_rank)
                        pooled["last"][L][i], pooled["mean"][L][i] = last.cpu(), mean.cpu()
                        if bases:
                            basis_rows[L][i] = basis.cpu()
                        if f"head{L}" in captured:
                            h = captured[f"head{L}"][b, :n]  # (T_i, n_heads * head_dim)
                            last, mean, _ = pool_text(h, skip_tokens, False, None)
                            for p, v in (("last", last), ("mean", mean)):
                                head_acts[p].setdefault(L, torch.zeros(N, h.shape[-1]))[i] = v.cpu()
                bar.update(1)
        finally:
            for hook in hooks:
                hook.remove()
            bar.close()

        weights = {}
        for L in layers:
            _, heads_out, down = parts[L]
            w = {}
            if down is not None:
                w["down_proj"] = down.weight.detach().float().cpu()  # (H, I): column j = neuron j's write
            if heads_out is not None:
                w["heads_out"] = heads_out.weight.detach().float().cpu()  # (H, n_heads * head_dim)
            weights[L] = w
        return Activations(
            layers=layers, hidden_size=H, pooled=pooled, n_tokens=[len(e) for e in enc],
            bases={L: list(basis_rows[L]) for L in layers} if bases else None,
            heads={p: d for p, d in head_acts.items() if d} or None if heads else None,
            weights=weights, parts={L: p for L, (p, _, _) in parts.items()}, truncated=truncated,
        )


class ServerUnavailableError(RuntimeError):
    pass


class ServerSource:
    """Activations read through a running `plasticity serve`: exactly the weights being served (after
    online training they differ from any checkpoint on disk).

    It reads the residual stream with the server's own readout: it loads a "basis" bank over the whole
    hidden state at the requested layers (each score is one coordinate, copied raw from the tap, whatever
    the hidden size), sends the texts as prompts with `readout` set (`batch_size` texts per completion
    request, `concurrency` requests in flight, scores as base64 float32), pools each text as its states
    arrive, and unloads the bank. One pass over the corpus, unless more layers are asked for than the
    server captures at once (its `capture_layers`, PLASTICITY_CAPTURE_LAYERS): then one pass per group.
    Texts are tokenized by the server (`/tokenize`, in the same threads), as it would for a prompt.

        >>> source = ServerSource("http://127.0.0.1:8000", api_key="...")
        >>> acts = source.collect(texts, [2], bases=True)

    Needs a server started with --vectors-dir (readout on). Weight-based report metrics (single-neuron
    alignment, per-head decomposition) need the weights themselves and are left out on this path.
    """

    def __init__(self, url: str, api_key: str | None = None, max_tokens: int | None = None,
                 concurrency: int = 4, timeout: float = 600.0, batch_size: int = 8) -> None:
        import requests

        self.url, self.timeout, self.concurrency = url.rstrip("/"), timeout, max(1, concurrency)
        self.batch_size = max(1, batch_size)  # texts per completion request
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        info = self.call("get", "/plasticity/info")
        limits = info.get("readout")
        if not limits:
            raise ServerUnavailableError(f"--server {url}: readout is off on that server; start it with "
                                         "`plasticity serve MODEL --vectors-dir DIR`")
        self.num_layers, self.hidden_size = limits["num_layers"], limits["hidden_size"]
        self.capture_layers = limits["capture_layers"]
        self.model_name = str(info.get("model"))
        served = self.call("get", "/v1/models")["data"][0]
        self.served_name = served["id"]
        context = int(served.get("max_model_len") or MAX_TOKENS_CAP)
        self.max_tokens = min(max_tokens or MAX_TOKENS_CAP, context - 1)  # room for the one generated token

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        """One request to the server; its errors as ServerUnavailableError with the status and reason."""
        import requests

        try:
            r = self.session.request(method, self.url + path, json=body, timeout=self.timeout)
        except requests.ConnectionError as exc:
            raise ServerUnavailableError(f"--server {self.url}: cannot connect ({exc.__class__.__name__})") from None
        if r.status_code == 401:
            raise ServerUnavailableError(f"--server {self.url}: 401, the server wants an API key (--api-key)")
        if r.status_code >= 400:
            raise ServerUnavailableError(f"--server {self.url}{path}: {r.status_code} {r.text[:500]}")
        return r.json()

    def _layer_groups(self, layers: list[int]) -> list[list[int]]:
        """`layers` in groups the server can capture in one pass: a layer some loaded basis bank already
        reads shares its slot, any other needs a free one."""
        held = {L for b in self.call("get", "/readout")["banks"] if b.get("kind") == "basis" for L in b["layers"]}
        free = self.capture_layers - len(held)
        shared, new = [L for L in layers if L in held], [L for L in layers if L not in held]
        if new and free < 1:
            raise ServerUnavailableError(f"--server {self.url}: every capture slot is in use by basis banks at "
                                         f"layers {sorted(held)} (unload one, or raise PLASTICITY_CAPTURE_LAYERS)")
        groups = [new[i: i + free] for i in range(0, len(new), free)] if new else [[]]
        groups[0] = sorted(shared + groups[0])
        return groups

    def _states(self, batch: list[list[int]], bank: str) -> list[Tensor]:
        """Each prompt's (T, layers, width) scores, from one completion request carrying the whole batch
        (one HTTP round trip and one score fetch for many texts)."""
        import base64

        import numpy as np

        out = self.call("post", "/v1/completions", {"model": self.served_name, "prompt": batch, "max_tokens": 1,
                                                     "temperature": 0, "vllm_xargs": {"readout": bank,
                                                                                      "readout_encoding": "base64"}})
        choices = sorted(out["choices"], key=lambda c: c["index"])
        states = []
        for ids, choice in zip(batch, choices, strict=True):
            readout = choice["readout"]
            if "error" in readout or readout["positions"] != list(range(len(ids))):
                raise ServerUnavailableError(f"--server {self.url}: readout did not cover the prompt: "
                                             f"{readout.get('error', readout['positions'][:8])}")
            raw = np.frombuffer(base64.b64decode(readout["scores"]), dtype="<f4").reshape(readout["scores_shape"])
            states.append(torch.from_numpy(raw.copy()))  # (T, layers, width)
        return states

    def collect(self, texts: Sequence[str], layers: Sequence[int], *, skip_tokens: int = 1, bases: bool = False,
                subspace_rank: int | None = None, heads: bool = False, progress: bool = True) -> Activations:
        from concurrent.futures import ThreadPoolExecutor

        layers = check_collect_args(layers, self.num_layers, skip_tokens, subspace_rank)
        N, H = len(texts), self.hidden_size
        groups = self._layer_groups(layers)
        batches = [list(range(i, min(i + self.batch_size, N))) for i in range(0, N, self.batch_size)]
        enc: list[list[int] | None] = [None] * N
        pooled = {p: {L: torch.zeros(N, H) for L in layers} for p in POOLINGS}
        basis_rows: dict[int, list[Tensor | None]] = {L: [None] * N for L in layers}

        def forward(rows: list[int], bank: str) -> list[Tensor]:
            for i in rows:
                if enc[i] is None:
                    enc[i] = self.call("post", "/tokenize", {"model": self.served_name, "prompt": texts[i]})["tokens"]
            return self._states([enc[i][: self.max_tokens] for i in rows], bank)

        bar = progress_bar(N * len(groups), progress, desc="server forward")
        try:
            for k, group in enumerate(groups):
                name = f"capture-{os.getpid()}-{k}"
                self.call("post", "/readout/load", {"name": name, "basis": [0, H], "layers": group})
                try:
                    with ThreadPoolExecutor(self.concurrency) as pool:
                        for rows, blocks in zip(batches, pool.map(lambda rows: forward(rows, name), batches)):
                            for i, block in zip(rows, blocks):  # block: (T, group layers, H)
                                for j, L in enumerate(group):
                                    last, mean, basis = pool_text(block[:, j], skip_tokens, bases, subspace_rank)
                                    pooled["last"][L][i], pooled["mean"][L][i], basis_rows[L][i] = last, mean, basis
                            bar.update(len(rows))
                finally:
                    self.call("delete", f"/readout/{name}")
        finally:
            bar.close()
        truncated = sum(len(ids) > self.max_tokens for ids in enc)
        return Activations(layers=layers, hidden_size=H, pooled=pooled,
                           n_tokens=[min(len(ids), self.max_tokens) for ids in enc],
                           bases=basis_rows if bases else None, heads=None, weights=None, parts=None,
                           truncated=truncated)


def _capture(store: dict[str, Tensor], key: str, stop: bool):
    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        store[key] = out.detach().float()  # (B, T, H): the residual stream after this block
        if stop:
            raise _StopForward

    return hook


def _capture_input(store: dict[str, Tensor], key: str):
    def hook(module, args):
        store[key] = args[0].detach().float()  # (B, T, n_heads * head_dim): per-head attention outputs

    return hook


class _StopForward(Exception):
    pass


def layer_parts(block: nn.Module, config) -> tuple[LayerParts, nn.Linear | None, nn.Linear | None]:
    """The parts of HF decoder layer `block` the report decomposes, with the projection that writes its
    mixer's heads into the stream (`heads_out`) and its MLP's down projection (None where absent).

    Attention: `self_attn.o_proj`, num_attention_heads blocks of columns. Gated DeltaNet (Qwen3-Next,
    Qwen 3.5): `linear_attn.out_proj`, whose input is the gated-normed value heads concatenated head by
    head, so head h writes out_proj[:, block h] exactly as an attention head does (linear_num_value_heads
    blocks). Other mixers (Mamba, the project's recurrent layers) and a mixture-of-experts MLP (a down
    projection per expert, none for the layer) are named in `not_decomposed`.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    notes = []
    attn, linear = getattr(block, "self_attn", None), getattr(block, "linear_attn", None)
    if isinstance(getattr(attn, "o_proj", None), nn.Linear) and getattr(text, "num_attention_heads", None):
        mixer, n_heads, heads_out = "attention", int(text.num_attention_heads), attn.o_proj
    elif isinstance(getattr(linear, "out_proj", None), nn.Linear) and getattr(text, "linear_num_value_heads", None):
        mixer, n_heads, heads_out = "gated_deltanet", int(text.linear_num_value_heads), linear.out_proj
    else:
        mixer = type(attn or linear or getattr(block, "mixer", None) or block).__name__
        n_heads = heads_out = None
        notes.append(f"per-head decomposition: the token mixer ({mixer}) has no per-head output projection")
    mlp = getattr(block, "mlp", None)
    down = getattr(mlp, "down_proj", None)
    if not isinstance(down, nn.Linear):
        down = None
        why = "a mixture of experts, one down projection per expert" if hasattr(mlp, "experts") else "no down_proj"
        notes.append(f"single-neuron alignment: the MLP ({type(mlp).__name__}) has {why}")
    return LayerParts(mixer, n_heads, tuple(notes)), heads_out, down
