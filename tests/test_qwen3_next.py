"""Qwen3-Next (Gated DeltaNet + attention hybrid, MoE) served, trained in place and checked against its
Hugging Face form on the live weights.

The tiny random model is made by transformers (tests/qwen3_next_models.py), in bfloat16: vLLM's CPU GDN
path refuses float32. Tolerance: served and HF log-probs agree within BF16_LOGPROB_TOL. Both compute in
bfloat16 with different kernels (vLLM's chunked delta rule, packed conv1d and AMX MoE vs transformers'
torch reference), and a bfloat16 rounding is 2**-8 relative: about 0.03 on a log-prob near -7.6.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import torch

from conftest import API_KEY, completion, prompt_logprobs
from qwen3_next_models import build_tiny_qwen3_next

BF16_LOGPROB_TOL = 0.1
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def tiny_qwen3_next(tmp_path_factory) -> Path:
    return build_tiny_qwen3_next(tmp_path_factory.mktemp("qwen3-next") / "m")


@pytest.fixture(scope="module")
def tok(tiny_qwen3_next):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen3_next)


def vllm_layout(model_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under vLLM's Qwen3-Next names and layout (fused q|gate,k,v; shared expert
    gate|up; experts stacked into w13 = gate|up and w2; A_log float32), as the served arena holds them."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).state_dict()
    out = {}
    for name, t in hf.items():
        if name.endswith("self_attn.q_proj.weight"):
            out[name.replace("q_proj", "qkv_proj")] = torch.cat(
                [t, hf[name.replace("q_proj", "k_proj")], hf[name.replace("q_proj", "v_proj")]]).clone()
        elif name.endswith("shared_expert.gate_proj.weight"):
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([t, hf[name.replace("gate_proj", "up_proj")]]).clone()
        elif name.endswith("mlp.experts.gate_up_proj"):
            out[name.replace("experts.gate_up_proj", "experts.routed_experts.w13_weight")] = t.clone()
        elif name.endswith("mlp.experts.down_proj"):
            out[name.replace("experts.down_proj", "experts.routed_experts.w2_weight")] = t.clone()
        elif name.endswith("A_log"):
            out[name] = t.float().clone()
        elif not name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "shared_expert.up_proj.weight")):
            out[name] = t.clone()
    return out


def test_hf_view_on_vllm_layout_is_the_hf_model(tiny_qwen3_next, tok):
    """Every HF parameter is a view of a vLLM tensor (GDN, attention, shared and routed experts): the
    view computes what transformers' own model computes, and a write to a view lands in vLLM's tensor."""
    from transformers import AutoModelForCausalLM

    from plasticity_training.hf_view import build_hf_view

    weights = vllm_layout(tiny_qwen3_next)
    view = build_hf_view(tiny_qwen3_next, weights)
    ref = AutoModelForCausalLM.from_pretrained(tiny_qwen3_next, dtype=torch.bfloat16).eval()
    ids = torch.tensor([tok("The story begins at the door of the old house")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(view(input_ids=ids).logits, ref(input_ids=ids).logits)
    ptrs = {t.data_ptr() for t in weights.values()}
    for name, p in view.named_parameters():
        assert p.untyped_storage().data_ptr() in ptrs or any(
            t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() for t in weights.values()), name
    layer0 = view.model.layers[0]
    with torch.no_grad():
        layer0.mlp.experts.gate_up_proj[1, 0, 0] = 3.0
        layer0.linear_attn.A_log[1] = 0.5
        view.model.layers[3].self_attn.k_proj.weight[0, 0] = 2.0
    assert weights["model.layers.0.mlp.experts.routed_experts.w13_weight"][1, 0, 0] == 3.0
    assert weights["model.layers.0.linear_attn.A_log"][1] == 0.5
    q_rows = view.model.layers[3].self_attn.q_proj.weight.shape[0]
    assert weights["model.layers.3.self_attn.qkv_proj.weight"][q_rows, 0] == 2.0


def test_param_kinds_select_gdn_parts():
    from vllm_plasticity.contract.settings import param_kind, select_params

    names = ["model.layers.0.linear_attn.in_proj_qkvz.weight", "model.layers.0.linear_attn.in_proj_ba.weight",
             "model.layers.0.linear_attn.conv1d.weight", "model.layers.0.linear_attn.out_proj.weight",
             "model.layers.0.linear_attn.A_log", "model.layers.0.linear_attn.dt_bias",
             "model.layers.0.linear_attn.norm.weight", "model.layers.0.mlp.experts.gate_up_proj",
             "model.layers.0.mlp.gate.weight", "model.layers.3.self_attn.q_proj.weight"]
    assert [param_kind(n) for n in names] == ["linear_attention"] * 4 + ["decay"] * 2 + ["norms", "mlp", "mlp", "attention"]
    only_decay = select_params(names, {"attention": False, "mlp": False, "embeddings": False, "norms": False,
                                       "linear_attention": False})
    assert only_decay == names[4:6]


# ---- one served model: training on, bfloat16 (the full tier) --------------------------------------------

@pytest.fixture(scope="module")
def server(servers_restart, tiny_qwen3_next, tmp_path_factory):
    from vllm_plasticity.launcher import ServerProcess

    state_dir = tmp_path_factory.mktemp("qwen3-next-state")
    args = ["--dtype", "bfloat16", "--max-model-len", "256", "--max-num-seqs", "4", "--training",
            "--api-key", API_KEY, "--state-dir", str(state_dir)]
    return servers_restart.start("qwen3-next", lambda log_path: ServerProcess.plasticity(tiny_qwen3_next, extra_args=args, log_path=log_path))


def live_view(server):
    from plasticity_training.hf_view import build_hf_view
    from vllm_plasticity.contract.weights import WeightManifest, map_shared_weights

    info = requests.get(server.url + "/plasticity/info", headers=HEADERS, timeout=10).json()
    manifest = WeightManifest.from_dict(json.load(open(info["weight_manifest"])))
    return build_hf_view(info["model"], map_shared_weights(manifest))


def hf_logprobs(server, ids: list[int]) -> list[float]:
    from plasticity_training.hf_view import token_logprobs

    return token_logprobs(live_view(server), ids)


def gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def next_token_logprob(server, model: str, ids: list[int]) -> tuple[int, float]:
    """The served greedy next token after `ids` and its log-prob (a generated token: it reads the GDN state
    and KV the prompt left, cached prefixes included)."""
    out = completion(server.url, model, ids, API_KEY, max_tokens=1, logprobs=1, return_token_ids=True)
    choice = out["choices"][0]
    return choice["token_ids"][0], choice["logprobs"]["token_logprobs"][0]


def hf_next_token_logprob(server, ids: list[int], token: int) -> float:
    view = live_view(server)
    with torch.no_grad():
        logits = view(input_ids=torch.tensor([ids])).logits[0, -1].float()
    return torch.log_softmax(logits, -1)[token].item()


@pytest.mark.slow
def test_serves_the_plasticity_subclass_with_shared_weights(server, tiny_qwen3_next, tok):
    info = requests.get(server.url + "/plasticity/info", headers=HEADERS, timeout=10).json()
    assert info["architecture"] == "PlasticityQwen3NextForCausalLM" and info["weights_shareable"]
    assert info["repacked_after_step"] is True  # conv1d / experts: packed copies, packed again per step
    ids = tok("The story begins at the door of the old house")["input_ids"]
    served = prompt_logprobs(server.url, str(tiny_qwen3_next), ids, API_KEY)
    print("served vs HF on the live weights, before training:", gap(served, hf_logprobs(server, ids)))
    assert gap(served, hf_logprobs(server, ids)) <= BF16_LOGPROB_TOL


@pytest.mark.slow
def test_learns_a_fact_and_serves_the_trainers_weights(server, tiny_qwen3_next, tok):
    model = str(tiny_qwen3_next)
    context = tok("In the story, the name of the cat was")["input_ids"]
    target = tok(" Marigold Quince")["input_ids"]
    r = requests.post(server.url + "/train", headers=HEADERS, timeout=600,
                      json={"context_ids": context, "continuation_ids": target, "steps": 20, "optimizer": {"lr": 1e-2}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "succeeded", body
    print("losses:", body["losses"][0], "->", body["losses"][-1])
    assert body["losses"][-1] < 0.5 * body["losses"][0]
    ids = context + target
    served = prompt_logprobs(server.url, model, ids, API_KEY)
    view = hf_logprobs(server, ids)
    print("served vs HF on the live weights, after 20 steps:", gap(served, view))
    assert gap(served, view) <= BF16_LOGPROB_TOL
    # the fact itself: served log-probs of the target tokens are high now, as the trainer's view says
    assert sum(served[-len(target):]) > -len(target) * 1.0


@pytest.mark.slow
def test_no_stale_state_after_a_publish(server, tiny_qwen3_next, tok):
    """A prompt served before a step is computed with the new weights after it: the step (GDN layers
    only) makes the prompt predict another token, and the served log-prob equals the HF form's on the
    live weights. At this tiny shape vLLM's hybrid block is 2176 tokens (> max_model_len), so no prefix
    block is ever cached: what a cached GDN state would do is not exercised here (kv_generations salts
    every request's cache key with the weights' generation, for every layer type alike)."""
    model = str(tiny_qwen3_next)
    ids = tok("The owl saw the gate near the lake, and the story went on. The boat saw the")["input_ids"]
    token, before = next_token_logprob(server, model, ids)
    assert abs(before - hf_next_token_logprob(server, ids, token)) <= BF16_LOGPROB_TOL
    target = (token + 1) % len(tok)
    r = requests.post(server.url + "/train", headers=HEADERS, timeout=600,
                      json={"context_ids": ids, "continuation_ids": [target], "steps": 10, "force": True,
                            "optimizer": {"lr": 1e-2}, "params": {"attention": False, "mlp": False,
                                                                 "embeddings": False, "norms": False}})
    assert r.status_code == 200, r.text
    token_after, after = next_token_logprob(server, model, ids)
    after_ref = hf_next_token_logprob(server, ids, token_after)
    print("next token before", token, before, "after", token_after, after, "HF", after_ref)
    assert token_after == target  # the step changed what this prompt computes
    assert abs(after - after_ref) <= BF16_LOGPROB_TOL
