"""The foundation against real `vllm serve` processes: stock behaviour untouched, routes, the OpenAI API,
parity with stock vLLM, and weights changed in place by another process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import openai
import pytest
import requests

from conftest import API_KEY, PROBE_PROMPTS, completion, prompt_logprobs

pytestmark = pytest.mark.server


@pytest.mark.slow  # a stock engine start of its own; the quick tier checks parity against HF on live weights
def test_stock_server_unchanged_with_plugin_installed(stock_reference):
    # The plugin is installed (its entry points exist) but not enabled: vLLM serves as usual and
    # exposes none of the plugin's routes.
    assert stock_reference["completion"].strip()
    assert stock_reference["info_status"] == 404
    assert stock_reference["train_status"] == 404
    assert stock_reference["models"]["data"][0]["id"]


def test_routes_present_and_info(plasticity_server, auth):
    paths = requests.get(plasticity_server.url + "/openapi.json", timeout=10).json()["paths"]
    assert "/plasticity/info" in paths
    info = requests.get(plasticity_server.url + "/plasticity/info", headers=auth, timeout=10).json()
    assert info["architecture"] == "PlasticityLlamaForCausalLM"
    assert info["plasticity_architecture"] is True
    assert info["dtype"] == "float32"
    assert info["device"] == "cpu"
    assert info["weights_shareable"] is True and info["weights_in_place"] is True
    assert info["version"]
    assert set(info["features"]) >= {"training", "checkpoints", "weight_sharing", "readout", "steering"}


def test_plugin_routes_honour_api_key(plasticity_server):
    url = plasticity_server.url + "/plasticity/info"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401


def test_openai_client_completion_and_chat(plasticity_server, default_model):
    client = openai.OpenAI(base_url=plasticity_server.url + "/v1", api_key=API_KEY)
    model = client.models.list().data[0].id
    text = client.completions.create(model=model, prompt="The morning", max_tokens=16, temperature=0).choices[0].text
    assert text.strip()
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me a story."}],
                                          max_tokens=16, temperature=0)
    assert chat.choices[0].message.content.strip()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=plasticity_server.url + "/v1", api_key="wrong").models.list()


def test_default_model_output_is_word_like(plasticity_server, default_model):
    # Briefly trained on the project's text: most generated words are words of that text.
    from plasticity_training.default_model import read_project_text

    vocabulary = set(read_project_text().lower().split())
    text = completion(plasticity_server.url, str(default_model), "The", API_KEY, max_tokens=64)["choices"][0]["text"]
    words = text.lower().split()
    assert len(words) >= 8, text
    known = sum(w in vocabulary for w in words) / len(words)
    assert known >= 0.6, f"only {known:.0%} known words in {text!r}"


@pytest.mark.slow
def test_prompt_logprobs_match_stock_vllm(stock_reference, plasticity_server, default_model, probe_token_ids):
    for ids, expected in zip(probe_token_ids, stock_reference["prompt_logprobs"]):
        got = prompt_logprobs(plasticity_server.url, str(default_model), ids, API_KEY)
        assert len(got) == len(expected) == len(ids) - 1
        diff = max(abs(a - b) for a, b in zip(got, expected))
        assert diff <= 1e-5, f"max |Δ logprob| = {diff:.2e}"


MUTATE = textwrap.dedent("""
    import json, sys, torch
    from vllm_plasticity.contract.weights import WeightManifest, map_shared_weights
    manifest = WeightManifest.from_dict(json.load(open(sys.argv[1])))
    weights = map_shared_weights(manifest)
    w = weights["model.norm.weight"]  # read in place by every forward (linear layers of a CPU training
                                       # server are packed again when a step is published: test_training)
    if sys.argv[2] == "save":
        torch.save(w.clone(), sys.argv[3]); w.mul_(-1.0)
    else:
        w.copy_(torch.load(sys.argv[3]))
""")


def test_weight_changed_in_place_by_another_process(plasticity_server, default_model, auth, tmp_path, probe_token_ids):
    info = requests.get(plasticity_server.url + "/plasticity/info", headers=auth, timeout=10).json()
    manifest_path = info["weight_manifest"]
    assert json.load(open(manifest_path))["kind"] == "cpu_shm"
    model, prompt = str(default_model), PROBE_PROMPTS[1]
    before = completion(plasticity_server.url, model, prompt, API_KEY, max_tokens=16)["choices"][0]["text"]
    lp_before = prompt_logprobs(plasticity_server.url, model, probe_token_ids[1], API_KEY)
    saved = tmp_path / "norm.pt"

    def mutate(mode: str) -> None:
        subprocess.run([sys.executable, "-c", MUTATE, manifest_path, mode, str(saved)], check=True)

    mutate("save")  # negate the final norm in the server's memory, from a separate process
    try:
        changed = completion(plasticity_server.url, model, prompt, API_KEY, max_tokens=16)["choices"][0]["text"]
        assert changed != before
    finally:
        mutate("restore")
    after = completion(plasticity_server.url, model, prompt, API_KEY, max_tokens=16)["choices"][0]["text"]
    assert after == before
    assert prompt_logprobs(plasticity_server.url, model, probe_token_ids[1], API_KEY) == lp_before
