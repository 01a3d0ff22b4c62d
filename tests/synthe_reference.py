"""Golden figures for SYNTHE from its MIT reference code, and the rule that makes the same weights without it.

The reference (github kaelvalen/synthe, commit REFERENCE_COMMIT) is not on PyPI (the PyPI package named
`synthe` is an unrelated project: never install it), so its figures are stored: FIGURES holds, for the
token ids INPUTS, the reference's full-forward logits (fp32, eval mode) with the probe off (`never`: every
block's probe threshold 0, so it never fires) and on (`always`: `probe.always_on = True`), for the
configuration FIELDS and the weights `seeded_weights` makes from each parameter's name and shape. A test
builds the project's model with the same rule and compares (tests/test_synthe_forms.py).

Made once, on CPU, with torch 2.13, from a checkout of the reference (it needs einops and pyyaml):

    $ git clone https://github.com/kaelvalen/synthe /tmp/synthe && git -C /tmp/synthe checkout b7f4305
    $ .venv/bin/python -m tests.synthe_reference /tmp/synthe
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import torch

REFERENCE_COMMIT = "b7f4305"
FIGURES = Path(__file__).parent / "figures" / "synthe_reference.safetensors"
VOCAB = 50
# Small enough to store, large enough that every part acts within 40 tokens: 3 blocks (the router scales
# the third), a 6-token probe window, hub tiers updated every 4 and 8 tokens, positions wrapping at 32.
FIELDS = {"d_model": 32, "n_blocks": 3, "n_heads": 4, "state_dim": 8, "wiener_state_dim": 8, "ffn_expand": 2.67,
          "tier1_dim": 16, "tier2_dim": 8, "tier3_dim": 4, "tier2_interval": 4, "tier3_interval": 8,
          "router_hidden": 8, "min_depth": 2, "probe_window": 6, "max_seq_len": 32, "tie_embeddings": True}


def seeded_weights(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """One tensor per parameter name, from a generator seeded by the name: LayerNorm weights 1 + N(0, 0.1^2),
    matrices N(0, 1/fan_in), other vectors (biases) N(0, 0.1^2). Order-free, so both models get the same."""
    out = {}
    for name, shape in shapes.items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        noise = torch.randn(shape, generator=g)
        if "norm" in name.rsplit(".", 2)[-2] and name.endswith(".weight"):
            out[name] = 1.0 + 0.1 * noise
        elif len(shape) == 2:
            out[name] = noise / shape[1] ** 0.5
        else:
            out[name] = 0.1 * noise
    return out


def inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))


def make(reference_dir: str) -> None:
    from safetensors.torch import save_file

    sys.path.insert(0, reference_dir)
    from src.model.synthe import Synthe, SyntheConfig  # the reference's own modules

    torch.manual_seed(0)
    model = Synthe(SyntheConfig(vocab_size=VOCAB, **FIELDS)).eval()
    params = dict(model.named_parameters())  # the tied lm_head appears once, as embedding.weight
    weights = seeded_weights({n: tuple(p.shape) for n, p in params.items()})
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
        ids = inputs()
        for block in model.blocks:
            block.probe.confidence_threshold = 0.0
        never = model(ids)["logits"]
        for block in model.blocks:
            block.probe.always_on = True
        always = model(ids)["logits"]
    FIGURES.parent.mkdir(exist_ok=True)
    save_file({"input_ids": ids, "never": never.contiguous(), "always": always.contiguous()}, FIGURES,
              metadata={"reference": f"github.com/kaelvalen/synthe@{REFERENCE_COMMIT}", "fields": json.dumps(FIELDS),
                        "vocab_size": str(VOCAB), "torch": torch.__version__})
    print(f"wrote {FIGURES}: never vs always differ by {(never - always).abs().max().item():.3f}")


if __name__ == "__main__":
    make(sys.argv[1])
