"""Extraction on a tiny real model: hooks, pooling, the CLI end to end (plasticity_training.extract)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from plasticity_training.activations import HFSource, LayerParts, resolve_layers
from vllm_plasticity.contract.bank import load_bank
from plasticity_training.corpus import load_corpus
from plasticity_training.extract import ExtractOptions, build_parser, main, run
from plasticity_training.methods import METHODS
from test_extract_corpus import EMOTIONS, SCENARIOS, write_corpus

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, train_steps=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(model dir, corpus dir): a random-init 2-layer Llama whose tokenizer is trained on the fixture text."""
    from plasticity_training.default_model import ModelSpec, build_model

    root = tmp_path_factory.mktemp("extract")
    corpus = write_corpus(root / "corpus")
    text = "\n\n".join([s for _, _, s in EMOTIONS.values()] +
                       [t for b, f in SCENARIOS.values() for t in (b, *f.values())]) * 3
    model = build_model(ModelSpec(**TINY), root / "model", text=text, log=lambda _: None)
    return model, corpus


@pytest.fixture(scope="module")
def source(tiny) -> HFSource:
    return HFSource.load(tiny[0], device="cpu", batch_size=4)


def test_resolve_layers():
    assert resolve_layers("0.66", 4) == [2] and resolve_layers(None, 64) == [42]
    assert resolve_layers("all", 3) == [0, 1, 2]
    assert resolve_layers("-1, 0.0,1", 4) == [0, 1, 3]
    for bad in ("4", "-5", "1.5", "x", ""):
        with pytest.raises(ValueError, match="Invalid layer"):
            resolve_layers(bad, 4)


def test_hooks_read_the_residual_stream_before_the_final_norm(tiny, source):
    texts = [t.text for t in load_corpus(tiny[1]).texts[:3]]
    acts = source.collect(texts, [0, 1], skip_tokens=2, progress=False)
    base = source.model.base_model
    for i, text in enumerate(texts):
        ids = source.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hs = base(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings, layer 0, (normed) 1
        assert torch.allclose(acts.pooled["last"][0][i], hs[1][0, -1], atol=1e-5)
        assert torch.allclose(acts.pooled["mean"][0][i], hs[1][0, 2:].mean(0), atol=1e-5)
        # The last entry of hidden_states has the final norm applied; the bank's layer 1 does not.
        assert torch.allclose(base.norm(acts.pooled["last"][1][i]), hs[2][0, -1], atol=1e-5)
        assert acts.n_tokens[i] == ids.shape[1]


def test_batching_and_early_stop_do_not_change_states(tiny, source):
    texts = [t.text for t in load_corpus(tiny[1]).texts]
    together = source.collect(texts, [0, 1], progress=False)
    one = HFSource(source.model, source.tokenizer, "m", batch_size=1).collect(texts, [0], progress=False)
    for p in ("mean", "last"):
        assert torch.allclose(together.pooled[p][0], one.pooled[p][0], atol=1e-5)


def test_bases_heads_and_weights(tiny, source):
    texts = [t.text for t in load_corpus(tiny[1]).texts[:4]]
    acts = source.collect(texts, [1], bases=True, subspace_rank=8, heads=True, progress=False)
    for i, V in enumerate(acts.bases[1]):
        assert V.shape == (min(8, acts.n_tokens[i] - 1), 64)
        assert torch.allclose(V @ V.T, torch.eye(V.shape[0]), atol=1e-4)  # orthonormal rows
    assert acts.heads["mean"][1].shape == (4, 2 * 32) and acts.parts[1] == LayerParts("attention", 2)
    assert acts.weights[1]["down_proj"].shape == (64, 128) and acts.weights[1]["heads_out"].shape == (64, 64)


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split()).lower()
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in out
        assert action.help, action.option_strings
    for words in ("readout.safetensors", "readout.json", "quality.json", "served weights", "0.66"):
        assert words in flat


def test_cli_end_to_end_with_report(tiny, tmp_path, capsys):
    model, corpus = tiny
    out = tmp_path / "bank"
    main(["--corpus", str(corpus), "--model", str(model), "--out", str(out), "--layers", "all", "--report",
          "--no-progress", "--device", "cpu"])
    assert capsys.readouterr().out.strip() == str(out)
    bank = load_bank(out)
    assert bank.concepts == sorted(EMOTIONS) and bank.layers == [0, 1] and bank.method == "lda"
    manifest = json.loads((out / "readout.json").read_text())
    assert set(manifest) == {"concepts", "layers", "hidden_size", "dtype", "model", "method", "created", "calibration"}
    assert manifest["calibration"]["centre"] == "corpus" and bank.calibration is not None  # calibrated by default
    for L in (0, 1):
        assert bank.vectors[L].shape == (5, 64)
        assert torch.allclose(bank.vectors[L].norm(dim=1), torch.ones(5), atol=1e-5)
    assert bank.extraction["pooling"] == "mean" and bank.extraction["n_texts"] == 13
    for name in ("quality.json", "summary.txt", "cosine_L0.png", "cosine_L1.png", "spectrum_L0.png", "spectrum_L1.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "cosine_L0.png").read_bytes()[:4] == b"\x89PNG"
    q = json.loads((out / "quality.json").read_text())
    m = q["concepts"]["joyful"]["layers"]["1"]
    for key in ("first_pc_variance_ratio", "agreement", "alignment", "outliers", "nearest", "ridge", "neuron",
                "heads", "loso", "triage"):
        assert key in m, key
    assert len(m["alignment"]) == 3 and m["heads"]["top"][0][0] in (0, 1)
    assert q["layers"]["1"]["loso"]["evaluated"] == 11 and len(q["layers"]["1"]["valence_arousal"]) == 3
    assert "leave-one-story-out" in (out / "summary.txt").read_text()


@pytest.mark.parametrize("method", [m for m in METHODS if m != "pooled"])
def test_every_method_writes_a_bank(tiny, tmp_path, method):
    model, corpus = tiny
    out = run(ExtractOptions(out=str(tmp_path / method), corpus=str(corpus), model=str(model), method=method,
                             layers="1", subspace_rank=8, device="cpu", progress=False), log=lambda _: None)
    bank = load_bank(out)
    assert bank.method == method and bank.vectors[1].shape == (5, 64)


def test_subspace_report_has_spectra(tiny, tmp_path):
    model, corpus = tiny
    out = run(ExtractOptions(out=str(tmp_path / "s"), corpus=str(corpus), model=str(model), method="subspace",
                             layers="1", subspace_rank=8, report=True, loso=False, device="cpu", progress=False),
              log=lambda _: None)
    q = json.loads((out / "quality.json").read_text())
    ev = q["concepts"]["calm"]["layers"]["1"]["eigenvalues"]
    assert len(ev) == 20 and ev == sorted(ev, reverse=True) and ev[0] > 0


def test_deterministic(tiny, tmp_path):
    model, corpus = tiny
    banks = [load_bank(run(ExtractOptions(out=str(tmp_path / str(i)), corpus=str(corpus), model=str(model),
                                          method="pca", layers="all", device="cpu", progress=False),
                           log=lambda _: None)) for i in range(2)]
    for L in (0, 1):
        assert torch.equal(banks[0].vectors[L], banks[1].vectors[L])


def test_server_path_without_a_server_says_so(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--corpus", str(tiny[1]), "--server", "http://127.0.0.1:9", "--out", str(tmp_path / "b")])
    assert e.value.code == 2
    assert "cannot connect" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    with pytest.raises(SystemExit):
        main(["--model", "m", "--server", "http://x", "--out", "b"])  # mutually exclusive


def test_preflight_runs_before_the_model_loads(tiny, tmp_path, capsys):
    (tiny[1].parent / "bad" / "stories").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:  # the model path does not exist either: the corpus is checked first
        main(["--corpus", str(tiny[1].parent / "bad"), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "b")])
    assert e.value.code == 2 and "at least two" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--corpus", str(tiny[1]), "--model", str(tiny[0]), "--out", str(tmp_path / "b"), "--layers", "7"])
    assert e.value.code == 2 and "Invalid layer '7'" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lda", "subspace"])
def test_the_default_layers_are_chosen_by_measurement_and_the_bank_says_why(tiny, tmp_path, method):
    model, corpus = tiny
    logs = []
    out = run(ExtractOptions(out=str(tmp_path / method), corpus=str(corpus), model=str(model), method=method,
                             subspace_rank=8, device="cpu", progress=False), log=logs.append)
    bank = load_bank(out)
    choice = bank.extraction["layer_choice"]
    assert choice["chosen"] == bank.layers and 1 <= len(bank.layers) <= 2
    assert set(choice["per_layer"]) == {"0", "1"} and choice["scored_by"] == "lda"
    assert any(line.startswith("[extract] --layers auto: layer ") for line in logs)
