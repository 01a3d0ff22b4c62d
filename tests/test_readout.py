"""Readout and steering in the running server (the session's plasticity server: compiled, not eager).

Every number is compared with a Hugging Face forward on views of the exact weights being served, with
hooks on the decoder layers: the stream after layer L (+ coef * unit vector when steering), fp32.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import requests
import torch
from openai import OpenAI

from vllm_plasticity.contract.bank import save_bank
from tests.conftest import API_KEY, live_view

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = ["The story begins at the door of the old house", "She read the paper twice and"]
TOL = 1e-4


# ---- helpers ------------------------------------------------------------------------------------------

def post(server, path, body, headers=AUTH):
    return requests.post(server.url + path, json=body, headers=headers, timeout=120)


def complete(server, model, prompt, **body):
    r = post(server, "/v1/completions", {"model": model, "prompt": prompt, "temperature": 0,
                                          "return_token_ids": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def write_bank(server, name, layers, n_concepts=3, seed=0, hidden=128, concepts=None):
    g = torch.Generator().manual_seed(seed)
    vectors = {L: torch.randn(n_concepts, hidden, generator=g) for L in layers}
    concepts = concepts or [f"c{i}" for i in range(n_concepts)]
    save_bank(Path(server.vectors_dir) / name, concepts, vectors, model="test", method="random")
    return {L: v / v.norm(dim=1, keepdim=True) for L, v in vectors.items()}


def load(server, name, path=None, **extra):
    r = post(server, "/readout/load", {"name": name, "path": path or name, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def live_hf(server):
    """A Hugging Face model on views of the served weights (whatever training did to them)."""
    return live_view(server, API_KEY)


def hf_forward(model, ids, steer: dict[int, torch.Tensor] | None = None):
    """(stream after each decoder layer {L: (T, hidden)}, logits (T, vocab)), steering added at layer outputs."""
    states, hooks = {}, []
    for L, layer in enumerate(model.model.layers):
        def hook(module, args, output, L=L):
            hidden = output[0] if isinstance(output, tuple) else output
            if steer and L in steer:
                hidden = hidden + steer[L].to(hidden.dtype)
            states[L] = hidden[0].detach().float()
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        hooks.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
    finally:
        for h in hooks:
            h.remove()
    return states, logits


def sequence(out, choice=0):
    c = out["choices"][choice]
    return c["prompt_token_ids"] + c["token_ids"]


def positions_of(out, choice=0):
    return out["choices"][choice]["readout"]["positions"]


def assert_scores_match(readout, states, vectors):
    assert readout["positions"] == list(range(len(readout["positions"])))
    for j, L in enumerate(readout["layers"]):
        expected = states[L][: len(readout["positions"])] @ vectors[L].T
        got = torch.tensor([row[j] for row in readout["scores"]])
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= TOL, (L, (got - expected).abs().max().item())


@pytest.fixture(scope="module")
def bank(plasticity_server):
    vectors = write_bank(plasticity_server, "rand", [0, 2, 3])
    load(plasticity_server, "rand")
    yield vectors
    requests.delete(plasticity_server.url + "/steering/default", headers=AUTH, timeout=10)


# ---- readout --------------------------------------------------------------------------------------------

def test_readout_matches_hugging_face_for_prompt_and_generated_tokens(plasticity_server, default_model, bank):
    model = str(default_model)
    out = complete(plasticity_server, model, PROMPTS, max_tokens=6, n=2, temperature=0.8, seed=1,
                   vllm_xargs={"readout": "rand"})
    hf = live_hf(plasticity_server)
    assert len(out["choices"]) == 4
    for choice in out["choices"]:
        readout = choice["readout"]
        assert readout["bank"] == "rand" and readout["layers"] == [0, 2, 3] and readout["concepts"] == ["c0", "c1", "c2"]
        ids = choice["prompt_token_ids"] + choice["token_ids"]
        # Every token that was fed to the model: the prompt, and each generated token but the last.
        assert len(readout["positions"]) == len(ids) - 1
        states, _ = hf_forward(hf, ids)
        assert_scores_match(readout, states, bank)
    # Choices are matched to their own prompt (prompt 0 for choices 0-1, prompt 1 for 2-3).
    assert out["choices"][1]["prompt_token_ids"] == out["choices"][0]["prompt_token_ids"]
    assert out["choices"][2]["prompt_token_ids"] != out["choices"][0]["prompt_token_ids"]


def test_chat_readout_and_top_level_fields(plasticity_server, default_model, bank):
    r = post(plasticity_server, "/v1/chat/completions", {
        "model": str(default_model), "messages": [{"role": "user", "content": "Tell me about the door."}],
        "max_tokens": 4, "temperature": 0, "readout": "rand", "return_token_ids": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = r.json()["prompt_token_ids"] + choice["token_ids"]  # the chat template's tokens, then the reply
    readout = choice["readout"]
    assert readout["bank"] == "rand" and len(readout["positions"]) == len(ids) - 1
    states, _ = hf_forward(live_hf(plasticity_server), ids)
    assert_scores_match(readout, states, bank)


def test_streaming_readout_equals_the_non_streaming_one(plasticity_server, default_model, bank):
    model = str(default_model)
    full = complete(plasticity_server, model, PROMPTS[0], max_tokens=8, vllm_xargs={"readout": "rand"})
    client = OpenAI(base_url=plasticity_server.url + "/v1", api_key=API_KEY)
    positions, scores, texts, chunks_with_scores = [], [], [], 0
    for chunk in client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True,
                                           extra_body={"vllm_xargs": {"readout": "rand"}}):
        for choice in chunk.choices:
            texts.append(choice.text)
            readout = (choice.model_extra or {}).get("readout")
            if readout:
                chunks_with_scores += 1
                positions += readout["positions"]
                scores += readout["scores"]
    packed = complete(plasticity_server, model, PROMPTS[0], max_tokens=8,
                      vllm_xargs={"readout": "rand", "readout_encoding": "base64"})["choices"][0]["readout"]
    import base64
    import numpy as np
    raw = np.frombuffer(base64.b64decode(packed["scores"]), dtype="<f4").reshape(packed["scores_shape"])
    assert raw.tolist() == full["choices"][0]["readout"]["scores"] and packed["positions"] == positions_of(full)
    assert "".join(texts) == full["choices"][0]["text"]
    assert positions == full["choices"][0]["readout"]["positions"]
    assert chunks_with_scores >= 4  # as tokens arrive, not all at the end (vLLM may coalesce two tokens in a chunk)
    diff = (torch.tensor(scores) - torch.tensor(full["choices"][0]["readout"]["scores"])).abs().max().item()
    assert diff <= TOL


# ---- steering -------------------------------------------------------------------------------------------

def test_steering_matches_hugging_face_with_the_vector_added(plasticity_server, default_model, bank):
    model = str(default_model)
    plain = complete(plasticity_server, model, PROMPTS[0], max_tokens=8)
    steered = complete(plasticity_server, model, PROMPTS[0], max_tokens=8, logprobs=0,
                       vllm_xargs={"readout": "rand", "steer": ["rand/c1", 12.0], "steer_layers": [2]})
    assert steered["choices"][0]["token_ids"] != plain["choices"][0]["token_ids"]
    ids = sequence(steered)
    states, logits = hf_forward(live_hf(plasticity_server), ids, steer={2: 12.0 * bank[2][1]})
    assert_scores_match(steered["choices"][0]["readout"], states, bank)
    # Greedy tokens and their log-probs are the steered Hugging Face model's.
    n_prompt = len(steered["choices"][0]["prompt_token_ids"])
    logprobs = torch.log_softmax(logits, dim=-1)
    for i, token in enumerate(steered["choices"][0]["token_ids"]):
        assert int(logprobs[n_prompt - 1 + i].argmax()) == token
        served = steered["choices"][0]["logprobs"]["token_logprobs"][i]
        assert abs(served - logprobs[n_prompt - 1 + i, token].item()) <= TOL


def test_steered_and_plain_requests_in_one_batch_do_not_affect_each_other(plasticity_server, default_model, bank):
    model = str(default_model)
    settings = [None, {"steer": ["rand/c0", 10.0]}, None, {"steer": ["rand/c2", -10.0, "rand/c1", 6.0]}]
    solo = [complete(plasticity_server, model, PROMPTS[0], max_tokens=12, logprobs=0,
                     **({"vllm_xargs": s} if s else {}))["choices"][0] for s in settings]
    assert len({tuple(c["token_ids"]) for c in solo}) >= 3  # the settings really differ
    results: dict[int, dict] = {}

    def run(i):
        s = settings[i % len(settings)]
        results[i] = complete(plasticity_server, model, PROMPTS[0], max_tokens=12, logprobs=0,
                              **({"vllm_xargs": s} if s else {}))["choices"][0]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, got in results.items():
        want = solo[i % len(settings)]
        assert got["token_ids"] == want["token_ids"], i
        diff = max(abs(a - b) for a, b in zip(got["logprobs"]["token_logprobs"], want["logprobs"]["token_logprobs"]))
        assert diff <= TOL, (i, diff)


def test_prefix_cache_never_mixes_steered_and_plain_kv(plasticity_server, default_model, bank):
    model = str(default_model)
    prompt = " ".join(["The old house stood at the end of the road, and every night the door was open."] * 12)

    def logprobs(**xargs):
        out = complete(plasticity_server, model, prompt, max_tokens=4, logprobs=0, **({"vllm_xargs": xargs} if xargs else {}))
        return out["choices"][0], sequence(out)
    plain_first, ids = logprobs()
    assert len(plain_first["prompt_token_ids"]) > 200  # many KV blocks to reuse
    steered, steered_ids = logprobs(steer=["rand/c1", 8.0], steer_layers=[0])   # prompt now cached unsteered
    plain_again, _ = logprobs()                                             # and cached steered too
    hf = live_hf(plasticity_server)
    for choice, seq, steer in ((steered, steered_ids, {0: 8.0 * bank[0][1]}), (plain_again, ids, None)):
        _, logits = hf_forward(hf, seq, steer=steer)
        lp = torch.log_softmax(logits, dim=-1)
        n = len(choice["prompt_token_ids"])
        for i, token in enumerate(choice["token_ids"]):
            assert abs(choice["logprobs"]["token_logprobs"][i] - lp[n - 1 + i, token].item()) <= TOL
    assert plain_again["token_ids"] == plain_first["token_ids"]
    # The reverse order: a prompt first cached steered, then asked for plain.
    other = prompt.replace("night", "morning")
    steered_first = complete(plasticity_server, model, other, max_tokens=4, logprobs=0,
                             vllm_xargs={"steer": ["rand/c1", 8.0], "steer_layers": [0]})
    plain_after = complete(plasticity_server, model, other, max_tokens=4, logprobs=0)
    _, logits = hf_forward(hf, sequence(plain_after))
    lp = torch.log_softmax(logits, dim=-1)
    choice = plain_after["choices"][0]
    n = len(choice["prompt_token_ids"])
    for i, token in enumerate(choice["token_ids"]):
        assert abs(choice["logprobs"]["token_logprobs"][i] - lp[n - 1 + i, token].item()) <= TOL
    # Steering took effect on the first request (else the order above would show nothing): its log-probs
    # differ (greedy tokens may agree on a model where this random direction barely matters).
    steered_lp = steered_first["choices"][0]["logprobs"]["token_logprobs"]
    plain_lp = choice["logprobs"]["token_logprobs"]
    assert (steered_first["choices"][0]["token_ids"] != choice["token_ids"]
            or max(abs(a - b) for a, b in zip(steered_lp, plain_lp)) > 1e-3)


def test_default_steering_applies_to_requests_that_set_none(plasticity_server, default_model, bank):
    model = str(default_model)
    plain = complete(plasticity_server, model, PROMPTS[1], max_tokens=8)["choices"][0]["token_ids"]
    explicit = complete(plasticity_server, model, PROMPTS[1], max_tokens=8,
                        vllm_xargs={"steer": ["rand/c0", 10.0]})["choices"][0]["token_ids"]
    assert explicit != plain
    r = post(plasticity_server, "/steering/default", {"steer": {"rand/c0": 10.0}})
    assert r.status_code == 200, r.text
    try:
        assert complete(plasticity_server, model, PROMPTS[1], max_tokens=8)["choices"][0]["token_ids"] == explicit
        opted_out = complete(plasticity_server, model, PROMPTS[1], max_tokens=8, vllm_xargs={"steer": []})
        assert opted_out["choices"][0]["token_ids"] == plain
    finally:
        assert requests.delete(plasticity_server.url + "/steering/default", headers=AUTH, timeout=10).status_code == 200
    assert complete(plasticity_server, model, PROMPTS[1], max_tokens=8)["choices"][0]["token_ids"] == plain


# ---- hot swap -------------------------------------------------------------------------------------------

def test_hot_swap_while_serving(plasticity_server, default_model, bank):
    model = str(default_model)
    first = write_bank(plasticity_server, "swap_a", [1], n_concepts=2, seed=11, concepts=["x", "y"])
    second = write_bank(plasticity_server, "swap_b", [1, 3], n_concepts=4, seed=12)
    load(plasticity_server, "swap", path="swap_a")
    stop = threading.Event()
    served = []

    def background():  # plain requests keep flowing through loads and unloads
        while not stop.is_set():
            served.append(complete(plasticity_server, model, PROMPTS[0], max_tokens=4)["choices"][0]["token_ids"])
    worker = threading.Thread(target=background)
    worker.start()
    try:
        out = complete(plasticity_server, model, PROMPTS[0], max_tokens=3, vllm_xargs={"readout": "swap"})
        states, _ = hf_forward(live_hf(plasticity_server), sequence(out))
        assert_scores_match(out["choices"][0]["readout"], states, first)
        steered_a = complete(plasticity_server, model, PROMPTS[0], max_tokens=6, vllm_xargs={"steer": ["swap/x", 15.0]})

        load(plasticity_server, "swap", path="swap_b")  # same name, other vectors, layers and concepts
        listing = requests.get(plasticity_server.url + "/readout", headers=AUTH, timeout=10).json()
        assert {b["name"]: b["layers"] for b in listing["banks"]}["swap"] == [1, 3]
        out = complete(plasticity_server, model, PROMPTS[0], max_tokens=3, vllm_xargs={"readout": "swap"})
        assert out["choices"][0]["readout"]["concepts"] == ["c0", "c1", "c2", "c3"]
        states, _ = hf_forward(live_hf(plasticity_server), sequence(out))
        assert_scores_match(out["choices"][0]["readout"], states, second)
        steered_b = complete(plasticity_server, model, PROMPTS[0], max_tokens=6, vllm_xargs={"steer": ["swap/c0", 15.0]})
        ids = sequence(steered_b)
        _, logits = hf_forward(live_hf(plasticity_server), ids, steer={1: 15.0 * second[1][0], 3: 15.0 * second[3][0]})
        n = len(steered_b["choices"][0]["prompt_token_ids"])
        assert logits[n - 1:-1].argmax(-1).tolist() == steered_b["choices"][0]["token_ids"]
        assert steered_a["choices"][0]["token_ids"] != steered_b["choices"][0]["token_ids"]

        assert requests.delete(plasticity_server.url + "/readout/swap", headers=AUTH, timeout=10).status_code == 200
        r = post(plasticity_server, "/v1/completions", {"model": model, "prompt": "x", "readout": "swap"})
        assert r.status_code == 400 and "swap" in r.json()["error"]["message"]
    finally:
        stop.set()
        worker.join()
    assert served and all(s == served[0] for s in served)  # plain output never changed


# ---- bad input ------------------------------------------------------------------------------------------

def test_bad_banks_and_settings_get_a_4xx_with_a_reason_and_change_nothing(plasticity_server, default_model, bank):
    server, model = plasticity_server, str(default_model)
    vdir = Path(server.vectors_dir)
    before = requests.get(server.url + "/readout", headers=AUTH, timeout=10).json()
    reference = complete(server, model, PROMPTS[0], max_tokens=4, vllm_xargs={"readout": "rand"})["choices"][0]

    write_bank(server, "wide", [1], hidden=64)
    write_bank(server, "deep", [9])
    nan_dir = vdir / "nan"
    write_bank(server, "nan", [1])
    from safetensors.torch import load_file, save_file
    tensors = load_file(nan_dir / "readout.safetensors")
    tensors["layer_1.vectors"][0, 0] = float("nan")
    save_file(tensors, nan_dir / "readout.safetensors")
    (vdir / "escape").symlink_to(Path(server.state_dir))
    outside = Path(server.state_dir) / "outside_bank"
    save_bank(outside, ["a"], {1: torch.ones(1, 128)}, model="t", method="t")
    big = vdir / "big"
    save_bank(big, [f"k{i}" for i in range(300)], {1: torch.randn(300, 128)}, model="t", method="t")

    bad_loads = {
        "wide": ({"name": "w", "path": "wide"}, "hidden size"),
        "deep": ({"name": "d", "path": "deep"}, "outside"),
        "nan": ({"name": "n", "path": "nan"}, "norm"),
        "dotdot": ({"name": "o", "path": "../outside_bank"}, "outside the vectors directory"),
        "absolute": ({"name": "o", "path": str(outside)}, "outside the vectors directory"),
        "symlink": ({"name": "o", "path": "escape/outside_bank"}, "outside the vectors directory"),
        "missing": ({"name": "m", "path": "no_such_bank"}, "no such bank"),
        "capacity": ({"name": "b", "path": "big"}, "capacity"),
        "bad name": ({"name": "../x", "path": "wide"}, "should match pattern"),
        "layer not in bank": ({"name": "l", "path": "rand", "layers": [1]}, "not in the bank"),
    }
    for label, (body, reason) in bad_loads.items():
        r = post(server, "/readout/load", body)
        assert 400 <= r.status_code < 500, (label, r.status_code, r.text)
        assert reason in r.text, (label, r.text)
    assert post(server, "/readout/load", {"name": "x", "path": "wide"}, headers={}).status_code == 401

    bad_requests = {
        "unknown bank": ({"readout": "nope"}, "nope"),
        "unknown concept": ({"steer": ["rand/zz", 1.0]}, "zz"),
        "unknown steer bank": ({"steer": ["nope/c0", 1.0]}, "nope"),
        "odd list": ({"steer": ["rand/c0"]}, "pairs"),
        "not a number": ({"steer": ["rand/c0", "big"]}, "finite"),
        "layer outside bank": ({"steer": ["rand/c0", 1.0], "steer_layers": [1]}, "steer_layers"),
        "reserved key": ({"plasticity_key": "x"}, "reserved"),
        "bad encoding": ({"readout": "rand", "readout_encoding": "xml"}, "readout_encoding"),
    }
    for label, (xargs, reason) in bad_requests.items():
        r = post(server, "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 2, "vllm_xargs": xargs})
        assert r.status_code == 400, (label, r.status_code, r.text)
        assert reason in r.json()["error"]["message"], (label, r.text)
    for value in ("NaN", "Infinity", "1e400"):  # what JSON parsers accept beyond the standard
        r = requests.post(server.url + "/v1/completions", headers={**AUTH, "Content-Type": "application/json"}, timeout=30,
                          data='{"model": "%s", "prompt": "x", "steer": ["rand/c0", %s]}' % (model, value))
        assert r.status_code == 400 and "finite" in r.text, (value, r.text)

    assert requests.get(server.url + "/readout", headers=AUTH, timeout=10).json() == before
    again = complete(server, model, PROMPTS[0], max_tokens=4, vllm_xargs={"readout": "rand"})["choices"][0]
    assert again["token_ids"] == reference["token_ids"]
    assert math.isclose(again["readout"]["scores"][-1][-1][-1], reference["readout"]["scores"][-1][-1][-1], abs_tol=TOL)
