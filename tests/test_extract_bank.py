"""The bank format (vllm_plasticity.contract.bank): round trip, the readout definition, validation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from vllm_plasticity.contract.bank import BankError, load_bank, save_bank

CONCEPTS = ["afraid", "calm", "joyful"]


def vectors(H: int = 16, layers=(3, 7)) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {L: torch.randn(len(CONCEPTS), H, generator=g) for L in layers}


def test_round_trip(tmp_path):
    v = vectors()
    save_bank(tmp_path / "bank", CONCEPTS, v, model="/models/tiny", method="pca",
              extraction={"pooling": "mean", "layers": [3, 7]}, created="2026-01-01T00:00:00+00:00")
    manifest = json.loads((tmp_path / "bank" / "readout.json").read_text())
    assert manifest == {"concepts": CONCEPTS, "layers": [3, 7], "hidden_size": 16, "dtype": "float32",
                        "model": "/models/tiny", "method": "pca", "created": "2026-01-01T00:00:00+00:00"}
    bank = load_bank(tmp_path / "bank")
    assert bank.concepts == CONCEPTS and bank.layers == [3, 7] and bank.hidden_size == 16
    assert bank.extraction == {"pooling": "mean", "layers": [3, 7]}
    for L in (3, 7):
        assert bank.vectors[L].dtype == torch.float32 and bank.vectors[L].shape == (3, 16)
        assert torch.allclose(bank.vectors[L], torch.nn.functional.normalize(v[L], dim=1))
    assert not list((tmp_path / "bank").glob("*.tmp"))  # atomic writes leave nothing behind


def test_created_defaults_to_now(tmp_path):
    save_bank(tmp_path, CONCEPTS, vectors(), model="m", method="pooled")
    assert load_bank(tmp_path).created.startswith("20")


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        save_bank(tmp_path, CONCEPTS, {0: torch.randn(2, 16)}, model="m", method="pooled")
    with pytest.raises(ValueError, match="duplicate"):
        save_bank(tmp_path, ["a", "a", "b"], vectors(), model="m", method="pooled")
    with pytest.raises(ValueError, match="zero or not finite"):
        save_bank(tmp_path, CONCEPTS, {0: torch.zeros(3, 16)}, model="m", method="pooled")
    with pytest.raises(ValueError, match="shape"):
        save_bank(tmp_path, CONCEPTS, {0: torch.randn(3, 16), 1: torch.randn(3, 8)}, model="m", method="pooled")


def test_load_rejects_broken_banks(tmp_path):
    with pytest.raises(BankError, match="readout.safetensors: missing"):
        load_bank(tmp_path)
    save_bank(tmp_path, CONCEPTS, vectors(), model="m", method="pooled")
    manifest = json.loads((tmp_path / "readout.json").read_text())
    (tmp_path / "readout.json").write_text(json.dumps(dict(manifest, layers=[3, 7, 9])))
    with pytest.raises(BankError, match="no tensor 'layer_9.vectors'"):
        load_bank(tmp_path)
    (tmp_path / "readout.json").write_text(json.dumps(dict(manifest, hidden_size=8)))
    with pytest.raises(BankError, match=r"shape \(3, 16\), expected \(3, 8\)"):
        load_bank(tmp_path)
    (tmp_path / "readout.json").write_text(json.dumps(manifest))
    save_file({"layer_3.vectors": torch.ones(3, 16), "layer_7.vectors": torch.ones(3, 16)},
              str(tmp_path / "readout.safetensors"))
    with pytest.raises(BankError, match="expected unit vectors"):
        load_bank(tmp_path)
    (tmp_path / "readout.json").write_text(json.dumps({"concepts": CONCEPTS}))
    with pytest.raises(BankError, match="missing keys"):
        load_bank(tmp_path)
