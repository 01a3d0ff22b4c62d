"""The built-in Transformer Killer Core model: a byte-level TKC (GRU or Mamba2 backbone + DualTierMiras
memory) trained here on the project's own text. `plasticity default-model --arch tkc [--backbone mamba2]`.

    >>> path = default_tkc_path()                              # built once (about a minute on 2 cores), cached
    >>> raw = build_tkc(TKCSpec(train_steps=0), "/tmp/tkc")    # random init, for parity tests

Same spec, same text, same machine: same bytes (fixed seeds and thread count, deterministic algorithms).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

from plasticity_training.default_causal_bank import train_next_byte
from plasticity_training.default_model import default_cache_dir, deterministic_build, read_project_text


@dataclasses.dataclass(frozen=True)
class TKCSpec:
    """Everything that determines the built model; saved beside it as `plasticity_spec.json`."""

    d_model: int = 96
    n_layers: int = 2
    backbone: str = "gru"  # or "mamba2" (served by vLLM's MambaMixer2)
    mamba_d_state: int = 32  # Mamba2 settings, used only with backbone "mamba2"
    mamba_headdim: int = 32
    mem_slots: int = 32
    max_seq_len: int = 512
    surprise_threshold: float = 0.5
    train_steps: int = 150  # 0 = random init (fast, for parity tests)
    seq_len: int = 96
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0

    def fields(self) -> dict:
        fields = {"d_model": self.d_model, "n_layers": self.n_layers, "mem_slots": self.mem_slots,
                  "max_seq_len": self.max_seq_len, "surprise_threshold": self.surprise_threshold,
                  "backbone": self.backbone}
        if self.backbone == "mamba2":
            fields |= {"mamba_d_state": self.mamba_d_state, "mamba_headdim": self.mamba_headdim}
        return fields

    def key(self, text_digest: str) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + text_digest
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_tkc_path(spec: TKCSpec = TKCSpec(), build: bool = True, log=print) -> Path:
    text = read_project_text()
    path = default_cache_dir() / "models" / f"default-tkc-{spec.key(hashlib.sha256(text.encode()).hexdigest())}"
    if build and not (path / "config.json").exists():
        build_tkc(spec, path, text=text, log=log)
    return path


def build_tkc(spec: TKCSpec, out_dir: str | os.PathLike, text: str | None = None, log=print) -> Path:
    import torch

    from plasticity_training.causal_bank_export import BYTE_VOCAB, byte_tokenizer, write_model_dir
    from vllm_plasticity.architectures.tkc_hf import ARCHITECTURE, TKCConfig, TKCForCausalLM

    text = read_project_text() if text is None else text
    t0 = time.monotonic()
    with deterministic_build():
        torch.manual_seed(spec.seed)
        model = TKCForCausalLM(TKCConfig(vocab_size=BYTE_VOCAB, tkc=spec.fields()))
        n_params = sum(p.numel() for p in model.parameters())
        log(f"[default-model] tkc ({spec.backbone} backbone): {n_params / 1e6:.2f}M parameters, byte vocabulary, "
            f"{spec.mem_slots} memory slots "
            f"per tier, {len(text) / 1e3:.0f}k characters of project text")
        final_loss = train_next_byte(model, text.encode("utf-8"), spec, log) if spec.train_steps else None
        record = dict(dataclasses.asdict(spec), arch="tkc", parameters=n_params, final_loss=final_loss,
                      text_characters=len(text), build_seconds=round(time.monotonic() - t0, 1))
        out = write_model_dir(TKCConfig, ARCHITECTURE, spec.fields(), BYTE_VOCAB, model.state_dict(),
                              byte_tokenizer(spec.max_seq_len), out_dir,
                              extra={"plasticity_spec.json": json.dumps(record, indent=1) + "\n"},
                              force=True)  # a rebuild of the cache's own entry (one from before manifests has none)
    log(f"[default-model] built {out} in {time.monotonic() - t0:.0f}s"
        + (f", final loss {final_loss:.3f}" if final_loss is not None else ""))
    return out
