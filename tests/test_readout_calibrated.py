"""Calibrated banks in the running server (the session's plasticity server), against Hugging Face on views of
the served weights: calibrated scores are (h - c) . v / s; steering in natural units adds strength * the
concept's steer row (its texts' mean offset), or, for a bank written before steer rows, is raw steering with
coef = strength * s; a bank without calibration loads, reads and steers raw, exactly as before."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import requests
import torch

from vllm_plasticity.contract.bank import Calibration, save_bank
from tests.test_readout import AUTH, PROMPTS, TOL, assert_scores_match, complete, hf_forward, live_hf, load, post

pytestmark = pytest.mark.server

LAYERS = [1, 3]
CONCEPTS = ["c0", "c1", "c2"]


@pytest.fixture(scope="module")
def banks(plasticity_server):
    """The same unit vectors three times: "cal" with a centre and scales (the format before steer rows),
    "offsets" with steer rows too (as extraction writes banks now), "old" without calibration."""
    g = torch.Generator().manual_seed(11)
    vectors = {L: torch.nn.functional.normalize(torch.randn(3, 128, generator=g), dim=1) for L in LAYERS}
    calibration = Calibration({L: torch.randn(128, generator=g) for L in LAYERS},
                              {L: 0.5 + 2 * torch.rand(3, generator=g) for L in LAYERS}, {"centre": "corpus"})
    offsets = dataclasses.replace(calibration, info={"centre": "corpus", "steer": "concept_mean_offset"},
                                  steer={L: 3 * torch.randn(3, 128, generator=g) for L in LAYERS})
    root = Path(plasticity_server.vectors_dir)
    save_bank(root / "cal", CONCEPTS, vectors, model="test", method="random", calibration=calibration)
    save_bank(root / "offsets", CONCEPTS, vectors, model="test", method="random", calibration=offsets)
    save_bank(root / "old", CONCEPTS, vectors, model="test", method="random")
    infos = {name: load(plasticity_server, name) for name in ("cal", "offsets", "old")}
    infos["offsets-calibration"] = offsets
    infos["cal-raw"] = load(plasticity_server, "cal-raw", "cal", calibrated=False)
    yield vectors, calibration, infos
    for name in ("cal", "offsets", "old", "cal-raw"):
        requests.delete(f"{plasticity_server.url}/readout/{name}", headers=AUTH, timeout=10)


def test_calibrated_scores_equal_hugging_face(plasticity_server, default_model, banks):
    vectors, calibration, infos = banks
    assert infos["cal"]["calibrated"] is True and infos["cal"]["calibration"] == {"centre": "corpus"}
    out = complete(plasticity_server, str(default_model), PROMPTS, max_tokens=5, vllm_xargs={"readout": "cal"})
    hf = live_hf(plasticity_server)
    for choice in out["choices"]:
        readout = choice["readout"]
        assert readout["calibrated"] is True and readout["layers"] == LAYERS
        states, _ = hf_forward(hf, choice["prompt_token_ids"] + choice["token_ids"])
        for j, L in enumerate(LAYERS):
            h = states[L][: len(readout["positions"])].double()  # (tokens, hidden)
            expected = (h - calibration.centre[L].double()) @ vectors[L].double().T / calibration.scale[L].double()
            got = torch.tensor([row[j] for row in readout["scores"]], dtype=torch.float64)
            # the raw dot product's float32 rounding, divided by the scale
            assert ((got - expected) * calibration.scale[L]).abs().max().item() <= TOL, L


def test_natural_units_steer_exactly_like_raw_units_times_the_scale(plasticity_server, default_model, banks):
    vectors, calibration, _ = banks
    model, L = str(default_model), 1
    strength = round(15.0 / float(calibration.scale[L][1]), 3)  # a raw norm of about 15: changes the text
    coef = strength * float(calibration.scale[L][1])
    natural = complete(plasticity_server, model, PROMPTS[0], max_tokens=8, logprobs=0,
                       vllm_xargs={"readout": "cal", "steer": ["cal/c1", strength], "steer_layers": [L],
                                   "steer_units": "natural"})
    default = complete(plasticity_server, model, PROMPTS[0], max_tokens=8, logprobs=0,
                       vllm_xargs={"readout": "cal", "steer": ["cal/c1", strength], "steer_layers": [L]})
    raw = complete(plasticity_server, model, PROMPTS[0], max_tokens=8, logprobs=0,
                   vllm_xargs={"readout": "cal", "steer": ["cal/c1", coef], "steer_layers": [L], "steer_units": "raw"})
    plain = complete(plasticity_server, model, PROMPTS[0], max_tokens=8, logprobs=0)
    # It steers at all: the text, or else the log-probs of the same tokens, differ from the plain request's.
    assert (natural["choices"][0]["token_ids"] != plain["choices"][0]["token_ids"] or
            max(abs(a - b) for a, b in zip(natural["choices"][0]["logprobs"]["token_logprobs"],
                                           plain["choices"][0]["logprobs"]["token_logprobs"])) > 1e-3)
    for other in (default, raw):  # a calibrated bank's default units are natural
        assert other["choices"][0]["token_ids"] == natural["choices"][0]["token_ids"]
        for a, b in zip(other["choices"][0]["logprobs"]["token_logprobs"],
                        natural["choices"][0]["logprobs"]["token_logprobs"]):
            assert abs(a - b) <= TOL
        diff = (torch.tensor(other["choices"][0]["readout"]["scores"]) -
                torch.tensor(natural["choices"][0]["readout"]["scores"])).abs().max().item()
        assert diff <= TOL
    # ... and both are Hugging Face's model with strength * s * v added at layer L.
    choice = natural["choices"][0]
    ids = choice["prompt_token_ids"] + choice["token_ids"]
    _, logits = hf_forward(live_hf(plasticity_server), ids, steer={L: coef * vectors[L][1]})
    logprobs = torch.log_softmax(logits, dim=-1)
    n_prompt = len(choice["prompt_token_ids"])
    for i, token in enumerate(choice["token_ids"]):
        assert int(logprobs[n_prompt - 1 + i].argmax()) == token
        assert abs(choice["logprobs"]["token_logprobs"][i] - logprobs[n_prompt - 1 + i, token].item()) <= TOL


def test_natural_units_with_steer_rows_add_strength_times_the_concepts_row(plasticity_server, default_model, banks):
    vectors, _, infos = banks
    offsets = infos["offsets-calibration"]
    model, L, strength = str(default_model), 3, 4.0
    natural = complete(plasticity_server, model, PROMPTS[1], max_tokens=8, logprobs=0,
                       vllm_xargs={"readout": "offsets", "steer": ["offsets/c2", strength], "steer_layers": [L]})
    plain = complete(plasticity_server, model, PROMPTS[1], max_tokens=8, logprobs=0)
    assert natural["choices"][0]["token_ids"] != plain["choices"][0]["token_ids"]  # it steers
    choice = natural["choices"][0]
    ids = choice["prompt_token_ids"] + choice["token_ids"]
    states, logits = hf_forward(live_hf(plasticity_server), ids, steer={L: strength * offsets.steer[L][2]})
    logprobs = torch.log_softmax(logits, dim=-1)
    n_prompt = len(choice["prompt_token_ids"])
    for i, token in enumerate(choice["token_ids"]):
        assert int(logprobs[n_prompt - 1 + i].argmax()) == token
        assert abs(choice["logprobs"]["token_logprobs"][i] - logprobs[n_prompt - 1 + i, token].item()) <= TOL
    # the scores are read from the stream so steered, calibrated as before
    readout = choice["readout"]
    for j, layer in enumerate(LAYERS):
        h = states[layer][: len(readout["positions"])].double()
        expected = (h - offsets.centre[layer].double()) @ vectors[layer].double().T / offsets.scale[layer].double()
        got = torch.tensor([row[j] for row in readout["scores"]], dtype=torch.float64)
        assert ((got - expected) * offsets.scale[layer]).abs().max().item() <= TOL, layer


def test_a_bank_without_calibration_loads_reads_and_steers_raw_as_before(plasticity_server, default_model, banks):
    vectors, _, infos = banks
    model = str(default_model)
    for name in ("old", "cal-raw"):  # an old-format bank, and a calibrated one loaded with calibrated: false
        assert infos[name]["calibrated"] is False and "calibration" not in infos[name]
        out = complete(plasticity_server, model, PROMPTS[1], max_tokens=8, logprobs=0,
                       vllm_xargs={"readout": name, "steer": [f"{name}/c2", 6.0], "steer_layers": [1]})
        readout = out["choices"][0]["readout"]
        assert readout["calibrated"] is False
        ids = out["choices"][0]["prompt_token_ids"] + out["choices"][0]["token_ids"]
        states, logits = hf_forward(live_hf(plasticity_server), ids, steer={1: 6.0 * vectors[1][2]})
        assert_scores_match(readout, states, vectors)  # raw dot products of the steered stream
        n_prompt = len(out["choices"][0]["prompt_token_ids"])
        logprobs = torch.log_softmax(logits, dim=-1)
        for i, token in enumerate(out["choices"][0]["token_ids"]):
            assert int(logprobs[n_prompt - 1 + i].argmax()) == token
    r = post(plasticity_server, "/v1/completions", {"model": model, "prompt": PROMPTS[0], "max_tokens": 2,
                                                    "steer": ["old/c0", 1.0], "steer_units": "natural"})
    assert r.status_code == 400 and "no calibration" in r.text
    r = post(plasticity_server, "/v1/completions", {"model": model, "prompt": PROMPTS[0], "max_tokens": 2,
                                                    "steer": ["cal/c0", 1.0], "steer_units": "sigmas"})
    assert r.status_code == 400 and "steer_units" in r.text
    r = post(plasticity_server, "/v1/completions", {"model": model, "prompt": PROMPTS[0], "max_tokens": 2,
                                                    "steer_units": "raw"})
    assert r.status_code == 400 and "steer_units without steer" in r.text
    listed = {b["path"]: b["calibrated"] for b in
              requests.get(plasticity_server.url + "/readout/available", headers=AUTH, timeout=10).json()["banks"]}
    assert listed["cal"] is True and listed["old"] is False
