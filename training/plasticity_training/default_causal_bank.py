"""The built-in causal-bank model: a byte-level decepticons-style causal bank trained here, on the project's
own text, with the project's form of the architecture (no download, no reference package needed).

Runs in the CLI process (`plasticity default-model --arch causal-bank`) and in tests.

    >>> path = default_causal_bank_path()                         # built once (~1 min on 2 cores), cached
    >>> raw = build_causal_bank(CausalBankSpec(train_steps=0), "/tmp/cb")   # random init, for parity tests

The substrate is built the way the reference builds its default one: modes with half-lives spaced
log-uniformly from 1.5 to 512 tokens (decay = 0.5 ** (1 / half_life)) and a Gaussian input projection
scaled by 1/sqrt(embedding_dim), both frozen; the readouts and embeddings train. Same spec, same text,
same machine: same bytes (fixed seeds and thread count, deterministic algorithms).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

from plasticity_training.default_model import default_cache_dir, deterministic_build, read_project_text, train_next_token


@dataclasses.dataclass(frozen=True)
class CausalBankSpec:
    """Everything that determines the built model; saved beside it as `plasticity_spec.json`."""

    embedding_dim: int = 32
    linear_modes: int = 256
    linear_hidden: tuple[int, ...] = (256,)
    local_window: int = 8
    local_hidden: tuple[int, ...] = (128,)
    max_seq_len: int = 512
    half_life_min: float = 1.5
    half_life_max: float = 512.0
    train_steps: int = 300  # 0 = random init (fast, for parity tests)
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0

    def fields(self) -> dict:
        """The `causal_bank` fields of config.json (the reference's names; the rest take its defaults)."""
        return {"embedding_dim": self.embedding_dim, "linear_modes": self.linear_modes,
                "linear_hidden": list(self.linear_hidden), "local_window": self.local_window,
                "local_hidden": list(self.local_hidden), "max_seq_len": self.max_seq_len,
                "linear_half_life_min": self.half_life_min, "linear_half_life_max": self.half_life_max,
                "substrate_mode": "frozen", "linear_readout_kind": "mlp", "mix_mode": "additive",
                "local_scale": 0.25}

    def key(self, text_digest: str) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + text_digest
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_causal_bank_path(spec: CausalBankSpec = CausalBankSpec(), build: bool = True, log=print) -> Path:
    """Path of the cached build of `spec` on the project's text; builds it first if absent."""
    text = read_project_text()
    digest = hashlib.sha256(text.encode()).hexdigest()
    path = default_cache_dir() / "models" / f"default-causal-bank-{spec.key(digest)}"
    if build and not (path / "config.json").exists():
        build_causal_bank(spec, path, text=text, log=log)
    return path


def build_causal_bank(spec: CausalBankSpec, out_dir: str | os.PathLike, text: str | None = None, log=print) -> Path:
    import torch

    from plasticity_training.causal_bank_export import BYTE_VOCAB, byte_tokenizer, write_model_dir
    from vllm_plasticity.architectures.causal_bank_hf import ARCHITECTURE, CausalBankConfig, CausalBankForCausalLM

    text = read_project_text() if text is None else text
    t0 = time.monotonic()
    with deterministic_build():
        torch.manual_seed(spec.seed)
        model = CausalBankForCausalLM(CausalBankConfig(vocab_size=BYTE_VOCAB, causal_bank=spec.fields()))
        _init_substrate(model, spec)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"[default-model] causal-bank: {n_params / 1e6:.2f}M parameters, byte vocabulary, "
            f"{len(text) / 1e3:.0f}k characters of project text")
        final_loss = train_next_byte(model, text.encode("utf-8"), spec, log) if spec.train_steps else None
        record = dict(dataclasses.asdict(spec), arch="causal-bank", parameters=n_params, final_loss=final_loss,
                      text_characters=len(text), build_seconds=round(time.monotonic() - t0, 1))
        out = write_model_dir(CausalBankConfig, ARCHITECTURE, spec.fields(), BYTE_VOCAB, model.state_dict(),
                              byte_tokenizer(spec.max_seq_len), out_dir,
                              extra={"plasticity_spec.json": json.dumps(record, indent=1) + "\n"},
                              force=True)  # a rebuild of the cache's own entry (one from before manifests has none)
    log(f"[default-model] built {out} in {time.monotonic() - t0:.0f}s"
        + (f", final loss {final_loss:.3f}" if final_loss is not None else ""))
    return out


def _init_substrate(model, spec: CausalBankSpec) -> None:
    import torch

    g = torch.Generator().manual_seed(spec.seed)
    half_lives = torch.logspace(math.log10(spec.half_life_min), math.log10(spec.half_life_max), spec.linear_modes)
    with torch.no_grad():
        model.linear_decays.copy_(0.5 ** (1.0 / half_lives))
        model.linear_in_proj.copy_(torch.randn(spec.embedding_dim, spec.linear_modes, generator=g)
                                   / math.sqrt(spec.embedding_dim))


def train_next_byte(model, data: bytes, spec, log) -> float:
    """Next-byte training of a project architecture's HF form on random windows of `data` (the built-in
    models' one training loop, default_model.train_next_token); the last smoothed loss."""
    import torch

    return train_next_token(model, torch.tensor(list(data), dtype=torch.long), spec, log)
