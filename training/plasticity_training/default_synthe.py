"""The built-in SYNTHE model: a byte-level SYNTHE (two blocks, the probe gated causally) trained here on the
project's own text. `plasticity default-model --arch synthe`.

    >>> path = default_synthe_path()                                # built once (a few minutes on 2 cores), cached
    >>> raw = build_synthe(SyntheSpec(train_steps=0), "/tmp/synthe")  # random init, for parity tests

Smaller than the reference's `tiny()` (d_model 256, 4 blocks): its per-token recurrences run as Python loops
on CPU. Same spec, same text, same machine: same bytes (fixed seeds and thread count, deterministic algorithms).
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
class SyntheSpec:
    """Everything that determines the built model; saved beside it as `plasticity_spec.json`."""

    d_model: int = 64
    n_blocks: int = 2
    n_heads: int = 2  # head size 32: the probe's attention runs on vLLM's kernels (CPU: 32 and up)
    wiener_state_dim: int = 16
    tier_dims: tuple[int, int, int] = (64, 32, 16)
    probe_window: int = 32
    probe_gate: str = "causal"
    probe_threshold: float = 0.35
    max_seq_len: int = 512
    reference_init: bool = True  # the reference's N(0, 0.02) weights; False: PyTorch's defaults (larger, so
    #                               parity tests see every part's effect well above their tolerance)
    train_steps: int = 120  # 0 = random init (fast, for parity tests)
    seq_len: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0

    def fields(self) -> dict:
        t1, t2, t3 = self.tier_dims
        return {"d_model": self.d_model, "n_blocks": self.n_blocks, "n_heads": self.n_heads,
                "wiener_state_dim": self.wiener_state_dim, "tier1_dim": t1, "tier2_dim": t2, "tier3_dim": t3,
                "probe_window": self.probe_window, "probe_gate": self.probe_gate,
                "probe_threshold": self.probe_threshold, "max_seq_len": self.max_seq_len,
                "router_hidden": 16, "min_depth": min(2, self.n_blocks - 1)}

    def key(self, text_digest: str) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + text_digest
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_synthe_path(spec: SyntheSpec = SyntheSpec(), build: bool = True, log=print) -> Path:
    text = read_project_text()
    path = default_cache_dir() / "models" / f"default-synthe-{spec.key(hashlib.sha256(text.encode()).hexdigest())}"
    if build and not (path / "config.json").exists():
        build_synthe(spec, path, text=text, log=log)
    return path


def build_synthe(spec: SyntheSpec, out_dir: str | os.PathLike, text: str | None = None, log=print) -> Path:
    import torch

    from plasticity_training.causal_bank_export import BYTE_VOCAB, byte_tokenizer, write_model_dir
    from vllm_plasticity.architectures.synthe_hf import ARCHITECTURE, SyntheConfig, SyntheForCausalLM

    text = read_project_text() if text is None else text
    t0 = time.monotonic()
    with deterministic_build():
        torch.manual_seed(spec.seed)
        model = SyntheForCausalLM(SyntheConfig(vocab_size=BYTE_VOCAB, synthe=spec.fields()))
        if spec.reference_init:
            model.reference_init()
        n_params = sum(p.numel() for p in model.parameters())
        log(f"[default-model] synthe: {n_params / 1e6:.2f}M parameters, byte vocabulary, {spec.n_blocks} blocks, "
            f"probe {spec.probe_gate} over {spec.probe_window} tokens, {len(text) / 1e3:.0f}k characters of project text")
        final_loss = train_next_byte(model, text.encode("utf-8"), spec, log) if spec.train_steps else None
        record = dict(dataclasses.asdict(spec), arch="synthe", parameters=n_params, final_loss=final_loss,
                      text_characters=len(text), build_seconds=round(time.monotonic() - t0, 1))
        out = write_model_dir(SyntheConfig, ARCHITECTURE, spec.fields(), BYTE_VOCAB, model.state_dict(),
                              byte_tokenizer(spec.max_seq_len), out_dir,
                              extra={"plasticity_spec.json": json.dumps(record, indent=1) + "\n"},
                              force=True)  # a rebuild of the cache's own entry (one from before manifests has none)
    log(f"[default-model] built {out} in {time.monotonic() - t0:.0f}s"
        + (f", final loss {final_loss:.3f}" if final_loss is not None else ""))
    return out
