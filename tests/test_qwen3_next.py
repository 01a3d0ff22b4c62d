"""Qwen3-Next (Gated DeltaNet + attention hybrid, MoE) served, trained in place, read and steered at GDN and
attention layers, and checkpointed, each checked against its Hugging Face form on the live weights.

The tiny random model is made by transformers (tests/qwen3_next_models.py), in bfloat16: vLLM's CPU GDN
path refuses float32. Tolerance: served and HF log-probs agree within BF16_LOGPROB_TOL (within
BF16_TRAINED_LOGPROB_TOL once training has sharpened the model). Both compute in bfloat16 with different
kernels (vLLM's chunked delta rule, packed conv1d and AMX MoE vs transformers' torch reference), and a
bfloat16 rounding is 2**-8 relative: about 0.03 on a log-prob near -7.6.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import requests
import torch

from conftest import API_KEY, completion, prompt_logprobs
from qwen3_next_models import build_tiny_qwen3_next

BF16_LOGPROB_TOL = 0.1
# After 20 steps at lr 1e-2 the model is sharp and bfloat16 rounding grows with it: served vs HF on the live
# weights measured 0.046 at this shape, and 0.19 at an earlier one (2 attention heads of 32), where HF in
# bfloat16 was itself 0.055 from HF in float32 and the server without the readout tap 0.06 (the tap is an
# opaque op at every layer's output, so inductor fuses and rounds around it differently). Stale or
# half-published weights are off by nats.
BF16_TRAINED_LOGPROB_TOL = 0.25
# A readout score is a dot product with the bfloat16 stream: a few roundings of 2**-8, relative to the score,
# or, in a model training has sharpened, 4x the HF form's own distance from float32 on the same weights.
BF16_SCORE_REL_TOL = 2**-6
STEER = 8.0  # about three times the stream's norm here
# Prefills longer than 128 tokens (one prefix block) are chunked: the invariance tests cross chunk boundaries.
# No API key: tests/recurrent_parity.py's checks post without one (the key is tested on the built-in model).
SERVER_ARGS = ["--dtype", "bfloat16", "--max-model-len", "256", "--max-num-seqs", "4", "--enable-prefix-caching",
               "--max-num-batched-tokens", "128"]
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


def test_quality_report_decomposes_gdn_value_heads_and_says_what_it_skips(tiny_qwen3_next, tmp_path):
    """Extraction and its report on the hybrid: a Gated DeltaNet layer's write is split over its value heads
    (out_proj's input is those heads concatenated), the attention layer's over its heads, and what has no
    part to decompose (the MoE MLP: no single down projection) is said per layer, not skipped silently."""
    from plasticity_training.extract import ExtractOptions, run
    from test_extract_corpus import write_corpus

    out = run(ExtractOptions(out=str(tmp_path / "bank"), corpus=str(write_corpus(tmp_path / "corpus")),
                             model=str(tiny_qwen3_next), layers="0,3", report=True, steering_range=False,
                             device="cpu", progress=False), log=lambda _: None)
    q = json.loads((out / "quality.json").read_text())
    for layer, mixer, heads in (("0", "gated_deltanet", 4), ("3", "attention", 16)):
        assert q["layers"][layer]["mixer"] == mixer
        assert q["layers"][layer]["not_decomposed"] == [
            "single-neuron alignment: the MLP (Qwen3NextSparseMoeBlock) has a mixture of experts, one down "
            "projection per expert"]
        for concept in q["concepts"].values():
            m = concept["layers"][layer]
            assert m["heads"]["mixer"] == mixer and "neuron" not in m
            top = [h for h, *_ in m["heads"]["top"]]  # the report lists the 5 largest contributions
            assert len(top) == min(heads, 5) and set(top) <= set(range(heads))
    summary = (out / "summary.txt").read_text()
    assert "== layer 0 == (gated_deltanet)" in summary and "not decomposed: single-neuron alignment" in summary


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

    state_dir, vectors_dir = tmp_path_factory.mktemp("qwen3-next-state"), tmp_path_factory.mktemp("qwen3-next-vectors")
    args = [*SERVER_ARGS, "--training", "--state-dir", str(state_dir), "--vectors-dir", str(vectors_dir)]
    server = servers_restart.start("qwen3-next", lambda log_path: ServerProcess.plasticity(
        tiny_qwen3_next, extra_args=args, log_path=log_path))
    server.state_dir, server.vectors_dir = state_dir, vectors_dir
    return server


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
def test_decode_prefill_batch_chunking_causality_and_isolation(server, tiny_qwen3_next):
    serving_invariances(server, str(tiny_qwen3_next))


def serving_invariances(server, model: str) -> None:
    """What any served architecture must keep (tests/recurrent_parity.py), in bfloat16: generated tokens'
    log-probs = the same text prefilled; a batch of prompts (chunked: 128 tokens per step) = each alone;
    later tokens never change earlier log-probs; concurrent generations = each alone."""
    from tests import recurrent_parity as parity

    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    rng = torch.Generator().manual_seed(0)
    prompt = lambda n: torch.randint(1, vocab, (n,), generator=rng).tolist()  # noqa: E731
    parity.decode_equals_prefill(server, model, prompt(30), 40, BF16_LOGPROB_TOL)
    parity.batch_invariant(server, model, [prompt(n) for n in (3, 17, 64, 127, 129, 200, 255)], BF16_LOGPROB_TOL)
    for t in (0, 31, 150):
        parity.causal(server, model, prompt(200), t, vocab, BF16_LOGPROB_TOL)
    parity.isolated(server, model, [prompt(n) for n in (7, 50, 90, 140)], 12, BF16_LOGPROB_TOL)


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
    assert gap(served, view) <= BF16_TRAINED_LOGPROB_TOL
    # the fact itself: served log-probs of the target tokens are high now, as the trainer's view says
    assert sum(served[-len(target):]) > -len(target) * 1.0


def prefix_cache_hits(server) -> float:
    """vLLM's count of prompt tokens served from the prefix cache (its Prometheus counter)."""
    text = requests.get(server.url + "/metrics", headers=HEADERS, timeout=10).text
    return sum(float(v) for v in re.findall(r"^vllm:prefix_cache_hits_total\{[^}]*\} (\S+)$", text, re.M))


@pytest.mark.slow
def test_no_stale_state_after_a_publish(server, tiny_qwen3_next, tok):
    """A 200-token prompt leaves a cached 128-token prefix block, GDN state included (the second request
    is served from it). After a GDN-only step that makes the prompt predict another token, the same prompt
    is not served from the block computed with the old weights (kv_generations salts every cache key with
    the weights' generation) and equals the HF form on the live weights; the next request is cached again."""
    model = str(tiny_qwen3_next)
    text = " ".join(["The owl saw the gate near the lake, and the story went on. The boat saw the"] * 12)
    ids = tok(text)["input_ids"][:200]
    assert len(ids) == 200
    token, before = next_token_logprob(server, model, ids)
    hits = prefix_cache_hits(server)
    assert next_token_logprob(server, model, ids) == (token, before)
    assert prefix_cache_hits(server) - hits == 128  # a block (and its GDN state) really cached
    assert abs(before - hf_next_token_logprob(server, ids, token)) <= BF16_TRAINED_LOGPROB_TOL
    target = (token + 1) % len(tok)
    r = requests.post(server.url + "/train", headers=HEADERS, timeout=600,
                      json={"context_ids": ids, "continuation_ids": [target], "steps": 10, "force": True,
                            "optimizer": {"lr": 1e-2}, "params": {"attention": False, "mlp": False,
                                                                 "embeddings": False, "norms": False}})
    assert r.status_code == 200, r.text
    hits = prefix_cache_hits(server)
    token_after, after = next_token_logprob(server, model, ids)
    assert prefix_cache_hits(server) == hits  # nothing computed with the old weights was reused
    after_ref = hf_next_token_logprob(server, ids, token_after)
    print("next token before", token, before, "after", token_after, after, "HF", after_ref)
    assert token_after == target  # the step changed what this prompt computes
    assert abs(after - after_ref) <= BF16_TRAINED_LOGPROB_TOL
    assert next_token_logprob(server, model, ids) == (token_after, after)
    assert prefix_cache_hits(server) - hits == 128  # the new weights' block is cached and reused


@pytest.mark.slow
@pytest.mark.parametrize("layer", [0, 3], ids=["gated_deltanet_layer", "attention_layer"])
def test_readout_and_steering_equal_the_hf_form(server, tiny_qwen3_next, tok, layer):
    readout_and_steering_equal_the_hf_form(server, str(tiny_qwen3_next), tok, layer)


def readout_and_steering_equal_the_hf_form(server, model: str, tok, layer: int) -> None:
    """A two-concept bank at `layer` (a GDN layer, or the attention layer): the served scores and the
    generated tokens' log-probs while steering by STEER x concept a equal the HF form on the live weights
    with the same vector added to that layer's output (concept a's score carries the STEER it was pushed
    by: an unsteered stream would miss it by that much). Needs a server with --vectors-dir (`vectors_dir`)."""
    from vllm_plasticity.contract.bank import save_bank

    vectors = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))
    save_bank(server.vectors_dir / f"L{layer}", ["a", "b"], {layer: vectors}, model="test", method="random")
    r = requests.post(server.url + "/readout/load", headers=HEADERS, timeout=60, json={"name": f"L{layer}", "path": f"L{layer}"})
    assert r.status_code == 200, r.text
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    ids = tok("The owl saw the gate near the lake, and the story went on.")["input_ids"]
    out = completion(server.url, model, ids, API_KEY, max_tokens=4, return_token_ids=True, logprobs=0,
                     vllm_xargs={"readout": f"L{layer}", "steer": [f"L{layer}/a", STEER]})["choices"][0]
    seq, view = ids + out["token_ids"], live_view(server)

    def steered_forward(model) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, scores) of `model` on `seq` with STEER x concept a added to `layer`'s output."""
        stream = {}

        def steer(module, args, output):
            stream["h"] = output + STEER * unit[0].to(output.dtype)
            return stream["h"]
        handle = model.model.layers[layer].register_forward_hook(steer)
        try:
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].float(), -1)
        finally:
            handle.remove()
        return logp, stream["h"][0, : len(seq) - 1].float() @ unit.T

    logp, want = steered_forward(view)
    _, want_fp32 = steered_forward(copy.deepcopy(view).float())  # the reference's own bfloat16 error
    scores = torch.tensor(out["readout"]["scores"])[:, 0, :]  # (tokens, concepts) at the bank's one layer
    tol = max(BF16_SCORE_REL_TOL * want.abs().max().item(), 4 * (want - want_fp32).abs().max().item())
    print(f"layer {layer}: score gap", (scores - want).abs().max().item(), "of", want.abs().max().item(),
          "HF bfloat16 vs float32", (want - want_fp32).abs().max().item())
    assert (scores - want).abs().max().item() <= tol
    steered = [logp[i - 1, t].item() for i, t in enumerate(seq) if i >= len(ids)]
    assert gap(out["logprobs"]["token_logprobs"], steered) <= BF16_TRAINED_LOGPROB_TOL


@pytest.mark.slow  # stops the module's server: last in this file
def test_checkpoint_loads_in_transformers_and_a_restart_serves_the_same(server, servers_restart, tiny_qwen3_next, tok,
                                                                      tmp_path):
    """/checkpoint after training writes a Hugging Face directory: stock transformers loads it and computes
    the served log-probs (not the original's), and a fresh server from it serves them unchanged."""
    from transformers import AutoModelForCausalLM

    from vllm_plasticity.launcher import ServerProcess

    model = str(tiny_qwen3_next)
    ids = tok("The cat saw the sea near the barn, and the story went on.")["input_ids"]
    r = requests.post(server.url + "/train", headers=HEADERS, timeout=600, json={
        "context_ids": ids[:5], "continuation_ids": ids[5:], "steps": 3, "force": True, "optimizer": {"lr": 1e-2}})
    assert r.status_code == 200, r.text
    served = prompt_logprobs(server.url, model, ids, API_KEY)
    r = requests.post(server.url + "/checkpoint", headers=HEADERS, timeout=600, json={})
    assert r.status_code == 200, r.text
    ckpt = Path(r.json()["path"])

    def hf(path) -> list[float]:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            logp = torch.log_softmax(m(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        return [logp[i - 1, t].item() for i, t in enumerate(ids) if i > 0]
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["Qwen3NextForCausalLM"]
    print("checkpoint in transformers vs served:", gap(hf(ckpt), served), "original vs served:", gap(hf(model), served))
    assert gap(hf(ckpt), served) <= BF16_TRAINED_LOGPROB_TOL < gap(hf(model), served)

    servers_restart.stop()
    # Started as the first one was: in bfloat16 the readout tap and the training kernels change the rounding.
    args = [*SERVER_ARGS, "--training", "--state-dir", str(tmp_path / "state"), "--vectors-dir", str(server.vectors_dir)]
    fresh = servers_restart.start("qwen3-next-restored", lambda log_path: ServerProcess.plasticity(
        ckpt.parent, extra_args=args, log_path=log_path))
    name = requests.get(fresh.url + "/v1/models", headers=HEADERS, timeout=10).json()["data"][0]["id"]
    assert gap(prompt_logprobs(fresh.url, name, ids, API_KEY), served) <= 1e-6
    servers_restart.stop()
