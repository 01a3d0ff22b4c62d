"""`plasticity extract --server`: activations read through the running server's readout, exactly the
served weights; the bank it writes loads into that server and scores tokens."""

from __future__ import annotations

import pytest
import requests
import torch

from plasticity_training.activations import HFSource, ServerSource
from vllm_plasticity.contract.bank import load_bank, save_bank
from plasticity_training.extract import main
from test_extract_corpus import write_corpus
from test_readout import AUTH, complete, hf_forward, live_hf, sequence
from tests.conftest import API_KEY

TOL = 1e-4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("server_corpus") / "corpus")


def test_server_activations_equal_hugging_face_on_the_served_weights(plasticity_server, default_model, corpus):
    from transformers import AutoTokenizer

    texts = ["The door of the old house was open.", "She read the letter twice and smiled.",
             "He waited in the rain for an hour, and nobody came to the station."]
    server = ServerSource(plasticity_server.url, api_key=API_KEY)
    # Raw states use no readout capacity: a bank filling all that other tests left free stays loaded.
    capacity = requests.get(plasticity_server.url + "/plasticity/info", headers=AUTH, timeout=10).json()["readout"]["capacity"]
    banks = requests.get(plasticity_server.url + "/readout", headers=AUTH, timeout=10).json()["banks"]
    free = capacity - max((b["columns"][1] for b in banks if "columns" in b), default=0)
    assert free > 0
    save_bank(plasticity_server.vectors_dir / "full", [f"k{i}" for i in range(free)],
              {1: torch.randn(free, 128)}, model="t", method="t")
    r = requests.post(plasticity_server.url + "/readout/load", json={"name": "full", "path": "full"}, headers=AUTH,
                      timeout=60)
    assert r.status_code == 200, r.text
    try:
        assert server.capture_layers >= 2  # the built-in model's 4 layers fit the default capture budget
        one_pass = server.collect(texts, [1, 3], bases=True, progress=False)
        server.capture_layers = 1  # one layer at a time: the multi-pass path
        acts = server.collect(texts, [1, 3], bases=True, progress=False)
    finally:
        requests.delete(plasticity_server.url + "/readout/full", headers=AUTH, timeout=10)
    for L in (1, 3):
        assert (one_pass.pooled["mean"][L] - acts.pooled["mean"][L]).abs().max().item() <= TOL
    hf = HFSource(live_hf(plasticity_server), AutoTokenizer.from_pretrained(default_model), "live")
    ref = hf.collect(texts, [1, 3], bases=True, progress=False)
    assert acts.n_tokens == ref.n_tokens
    for pooling in ("mean", "last"):
        for L in (1, 3):
            assert (acts.pooled[pooling][L] - ref.pooled[pooling][L]).abs().max().item() <= TOL
    for a, b in zip(acts.bases[3], ref.bases[3]):  # same subspace: projectors agree
        assert (a.T @ a - b.T @ b).abs().max().item() <= 1e-3
    banks = requests.get(plasticity_server.url + "/readout", headers=AUTH, timeout=10).json()["banks"]
    assert not [b for b in banks if b["name"].startswith("capture-")]  # its basis banks are unloaded


def test_extracted_bank_loads_into_the_server_and_gives_readouts(plasticity_server, default_model, corpus):
    out = plasticity_server.vectors_dir / "from_server"
    main(["--corpus", str(corpus), "--server", plasticity_server.url, "--api-key", API_KEY,
          "--out", str(out), "--layers", "1,3", "--no-progress"])  # exits non-zero (SystemExit) on failure
    bank = load_bank(out)
    assert bank.model == str(default_model) and bank.layers == [1, 3]
    r = requests.post(plasticity_server.url + "/readout/load", json={"name": "emotions", "path": "from_server"},
                      headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    try:
        result = complete(plasticity_server, str(default_model), "The letter said she had won.", max_tokens=4,
                          vllm_xargs={"readout": "emotions"})
        readout = result["choices"][0]["readout"]
        assert readout["concepts"] == bank.concepts and readout["calibrated"] is True  # extract calibrates
        states, _ = hf_forward(live_hf(plasticity_server), sequence(result))
        cal = bank.calibration
        for j, L in enumerate(readout["layers"]):  # (h - c) . v / s, compared at the raw dot product's precision
            expected = (states[L][: len(readout["positions"])] - cal.centre[L]) @ bank.vectors[L].T / cal.scale[L]
            got = torch.tensor([row[j] for row in readout["scores"]])
            assert ((got - expected) * cal.scale[L]).abs().max().item() <= 1e-4, L
    finally:
        requests.delete(plasticity_server.url + "/readout/emotions", headers=AUTH, timeout=10)

    # The steering range was measured through the server's own steering; the same measurement in process, on
    # the served weights with a hook adding the natural steering (strength * steer row) after the layer,
    # gives the same curve.
    from transformers import AutoTokenizer

    from plasticity_training.corpus import load_corpus
    from plasticity_training.steering_range import measure_bank

    recorded = bank.calibration.info["steering_range"]
    assert sorted(recorded) == ["1", "3"]
    hf = HFSource(live_hf(plasticity_server), AutoTokenizer.from_pretrained(default_model), "live")
    assert bank.calibration.steer is not None  # extraction writes steer rows
    in_process = measure_bank(hf, out, bank.concepts, bank.vectors, bank.calibration, load_corpus(corpus), print)
    for L, found in in_process.items():
        served = recorded[str(L)]["perplexity_ratio"]
        assert served == pytest.approx({k: round(v, 4) for k, v in found.record()["perplexity_ratio"].items()},
                                       rel=1e-3, abs=1e-3), L
        assert (recorded[str(L)]["low"], recorded[str(L)]["high"]) == (found.low, found.high)
    assert max(recorded["3"]["perplexity_ratio"].values()) > 1.0  # steering moved the text at all
