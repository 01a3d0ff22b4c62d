"""Qwen 3.5 (dense Gated DeltaNet + gated attention hybrid, the family the original system trained) served by
the plugin's subclass without torchvision, trained in place, read, steered and checkpointed, each checked
against transformers' own Qwen3_5ForCausalLM on the live weights.

The tiny random model (tests/qwen3_next_models.py) has Qwen3-Next's layer plan and sizes with a dense MLP,
in bfloat16 (vLLM's CPU GDN path refuses float32); tolerances are test_qwen3_next's, for the same reasons.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import torch

from conftest import API_KEY, prompt_logprobs
from qwen3_next_models import build_tiny_qwen3_5, build_tiny_qwen3_5_image_text
from test_qwen3_next import (BF16_LOGPROB_TOL, BF16_TRAINED_LOGPROB_TOL, HEADERS, SERVER_ARGS, gap, hf_logprobs,
                             live_view, readout_and_steering_equal_the_hf_form, serving_invariances)


@pytest.fixture(scope="module")
def tiny_qwen3_5(tmp_path_factory) -> Path:
    return build_tiny_qwen3_5(tmp_path_factory.mktemp("qwen3_5") / "m")


@pytest.fixture(scope="module")
def tok(tiny_qwen3_5):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen3_5)


def vllm_layout(model_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as vLLM's Qwen 3.5 holds them: in_proj_qkv then in_proj_z stacked into
    in_proj_qkvz, in_proj_b then in_proj_a into in_proj_ba, q|k|v into qkv_proj, gate|up into gate_up_proj,
    A_log float32."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).state_dict()
    stacked = {"in_proj_qkv": ("in_proj_qkvz", ["in_proj_qkv", "in_proj_z"]),
               "in_proj_b": ("in_proj_ba", ["in_proj_b", "in_proj_a"]),
               "q_proj": ("qkv_proj", ["q_proj", "k_proj", "v_proj"]),
               "gate_proj": ("gate_up_proj", ["gate_proj", "up_proj"])}
    parts = {p for _, group in stacked.values() for p in group}
    out = {}
    for name, t in hf.items():
        module = name.split(".")[-2]
        if module in stacked:
            fused, group = stacked[module]
            out[name.replace(module, fused)] = torch.cat([hf[name.replace(module, p)] for p in group]).clone()
        elif name.endswith("A_log"):
            out[name] = t.float().clone()
        elif module not in parts:
            out[name] = t.clone()
    return out


def test_hf_view_on_vllm_layout_is_the_hf_model(tiny_qwen3_5, tok):
    """Every HF parameter is a view of a vLLM tensor: the view computes what transformers' own model
    computes, and a write to in_proj_z / in_proj_a lands in the right rows of vLLM's fused tensor."""
    from transformers import AutoModelForCausalLM

    from plasticity_training.hf_view import build_hf_view

    weights = vllm_layout(tiny_qwen3_5)
    view = build_hf_view(tiny_qwen3_5, weights)
    ref = AutoModelForCausalLM.from_pretrained(tiny_qwen3_5, dtype=torch.bfloat16).eval()
    ids = torch.tensor([tok("The story begins at the door of the old house")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(view(input_ids=ids).logits, ref(input_ids=ids).logits)
    gdn = view.model.layers[0].linear_attn
    qkv_rows, b_rows = gdn.in_proj_qkv.weight.shape[0], gdn.in_proj_b.weight.shape[0]
    with torch.no_grad():
        gdn.in_proj_z.weight[0, 0] = 3.0
        gdn.in_proj_a.weight[1, 0] = 2.0
    assert weights["model.layers.0.linear_attn.in_proj_qkvz.weight"][qkv_rows, 0] == 3.0
    assert weights["model.layers.0.linear_attn.in_proj_ba.weight"][b_rows + 1, 0] == 2.0


@pytest.fixture(scope="module")
def image_text(tmp_path_factory) -> Path:
    return build_tiny_qwen3_5_image_text(tmp_path_factory.mktemp("qwen3_5-image-text") / "m")


def test_a_checkpoint_of_an_image_text_release_is_the_whole_release(image_text, tok, tmp_path):
    """Qwen 3.5 as released is image-text: the trainer's view is its language model (`model.*` where the
    release has `model.language_model.*`). A checkpoint written from the view after a change keeps the
    release's names and carries its vision tower over: transformers loads it as the image-text model, its
    text logits are the view's, and every vision tensor is the release's, bit for bit."""
    from safetensors.torch import load_file
    from transformers import Qwen3_5ForConditionalGeneration

    from plasticity_training.checkpoint import sync_checkpoint
    from plasticity_training.checkpoint_form import CheckpointForm
    from plasticity_training.hf_view import build_hf_view

    view = build_hf_view(image_text, vllm_layout(image_text))
    with torch.no_grad():
        view.model.layers[0].linear_attn.in_proj_z.weight.mul_(-1.0)  # a trained change, say
    form = CheckpointForm(image_text)
    assert form.image_text and form.name("model.layers.0.linear_attn.A_log") == "model.language_model.layers.0.linear_attn.A_log"
    sync_checkpoint(form.tensors(view), tmp_path / "ckpt", image_text)
    loaded = Qwen3_5ForConditionalGeneration.from_pretrained(tmp_path / "ckpt" / "current", dtype=torch.bfloat16).eval()
    ids = torch.tensor([tok("The story begins at the door of the old house")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, view(input_ids=ids).logits)
    release = load_file(str(image_text / "model.safetensors"))
    visual = {n: t for n, t in release.items() if n.startswith("model.visual.")}
    assert visual and all(torch.equal(loaded.state_dict()[n], t) for n, t in visual.items())
    assert not torch.equal(loaded.state_dict()["model.language_model.layers.0.linear_attn.in_proj_z.weight"],
                           release["model.language_model.layers.0.linear_attn.in_proj_z.weight"])


# ---- one served model: training and readout on, bfloat16 (the full tier) ---------------------------------

@pytest.fixture(scope="module")
def server(servers_restart, tiny_qwen3_5, tmp_path_factory):
    from vllm_plasticity.launcher import ServerProcess

    state_dir, vectors_dir = tmp_path_factory.mktemp("qwen3_5-state"), tmp_path_factory.mktemp("qwen3_5-vectors")
    args = [*SERVER_ARGS, "--training", "--state-dir", str(state_dir), "--vectors-dir", str(vectors_dir)]
    server = servers_restart.start("qwen3_5", lambda log_path: ServerProcess.plasticity(
        tiny_qwen3_5, extra_args=args, log_path=log_path))
    server.state_dir, server.vectors_dir = state_dir, vectors_dir
    return server


@pytest.mark.slow
def test_serves_the_plasticity_subclass_with_shared_weights(server, tiny_qwen3_5, tok):
    info = requests.get(server.url + "/plasticity/info", headers=HEADERS, timeout=10).json()
    assert info["architecture"] == "PlasticityQwen3_5ForCausalLM" and info["weights_shareable"]
    ids = tok("The story begins at the door of the old house")["input_ids"]
    served = prompt_logprobs(server.url, str(tiny_qwen3_5), ids, API_KEY)
    print("served vs HF on the live weights, before training:", gap(served, hf_logprobs(server, ids)))
    assert gap(served, hf_logprobs(server, ids)) <= BF16_LOGPROB_TOL


@pytest.mark.slow
def test_decode_prefill_batch_chunking_causality_and_isolation(server, tiny_qwen3_5):
    serving_invariances(server, str(tiny_qwen3_5))


@pytest.mark.slow
def test_learns_a_fact_and_serves_the_trainers_weights(server, tiny_qwen3_5, tok):
    """Every parameter trained (the GDN projections through their unstacked views): the fact is learned
    and the served log-probs are the trainer's view's."""
    learns_a_fact(server, str(tiny_qwen3_5), tok)


def learns_a_fact(server, model: str, tok) -> None:
    """20 steps at lr 1e-2 on one fact: the loss halves, the served log-probs equal the HF form on the live
    weights, and the fact's tokens are likely."""
    context = tok("In the story, the name of the cat was")["input_ids"]
    target = tok(" Marigold Quince")["input_ids"]
    r = requests.post(server.url + "/train", headers=HEADERS, timeout=600, json={
        "context_ids": context, "continuation_ids": target, "steps": 20, "optimizer": {"lr": 1e-2}})
    assert r.status_code == 200, r.text
    body = r.json()
    print("losses:", body["losses"][0], "->", body["losses"][-1])
    assert body["status"] == "succeeded" and body["losses"][-1] < 0.5 * body["losses"][0]
    ids = context + target
    served = prompt_logprobs(server.url, model, ids, API_KEY)
    print("served vs HF on the live weights, after 20 steps:", gap(served, hf_logprobs(server, ids)))
    assert gap(served, hf_logprobs(server, ids)) <= BF16_TRAINED_LOGPROB_TOL
    assert sum(served[-len(target):]) > -len(target) * 1.0


@pytest.mark.slow
@pytest.mark.parametrize("layer", [0, 3], ids=["gated_deltanet_layer", "attention_layer"])
def test_readout_and_steering_equal_the_hf_form(server, tiny_qwen3_5, tok, layer):
    readout_and_steering_equal_the_hf_form(server, str(tiny_qwen3_5), tok, layer)


@pytest.mark.slow  # after the readout tests: its steps sharpen the model further
def test_a_step_on_the_gdn_parts_alone_is_served(server, tiny_qwen3_5, tok):
    """`params` keeps the Gated DeltaNet projections, gates and decays only (what the original's behavioural
    training adjusted): the step changes what the prompt computes, and the served log-probs follow the view."""
    model = str(tiny_qwen3_5)
    ids = tok("The owl saw the gate near the lake, and the story went on. The boat saw the")["input_ids"]
    before = prompt_logprobs(server.url, model, ids, API_KEY)
    weights = {n: p.detach().clone() for n, p in live_view(server).named_parameters()}
    r = requests.post(server.url + "/train", headers=HEADERS, timeout=600, json={
        "context_ids": ids[:8], "continuation_ids": ids[8:], "steps": 5, "force": True, "optimizer": {"lr": 1e-2},
        "params": {"attention": False, "mlp": False, "embeddings": False, "norms": False}})
    assert r.status_code == 200, r.text
    changed = {n for n, p in live_view(server).named_parameters() if not torch.equal(p, weights[n])}
    assert changed and all(".linear_attn." in n for n in changed), changed
    after = prompt_logprobs(server.url, model, ids, API_KEY)
    assert gap(after, before) > 10 * BF16_TRAINED_LOGPROB_TOL
    assert gap(after, hf_logprobs(server, ids)) <= BF16_TRAINED_LOGPROB_TOL


@pytest.mark.slow  # stops the module's server: the last test to use it
def test_checkpoint_is_a_qwen3_5_directory_transformers_loads_and_a_restart_serves(server, servers_restart,
                                                                                 tiny_qwen3_5, tok, tmp_path):
    """/checkpoint writes the checkpoint's own names (in_proj_qkv, in_proj_z, ... unfused): stock
    transformers loads it and computes the served log-probs, not the original's, and a fresh server from
    it (started as the first was) serves them unchanged."""
    from vllm_plasticity.launcher import ServerProcess

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    ids = tok("The cat saw the sea near the barn, and the story went on.")["input_ids"]
    served = prompt_logprobs(server.url, str(tiny_qwen3_5), ids, API_KEY)
    r = requests.post(server.url + "/checkpoint", headers=HEADERS, timeout=600, json={})
    assert r.status_code == 200, r.text
    ckpt = Path(r.json()["path"])
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["Qwen3_5ForCausalLM"]
    names = set()
    for shard in ckpt.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names |= set(f.keys())
    assert "model.layers.0.linear_attn.in_proj_z.weight" in names and not any("in_proj_qkvz" in n for n in names)

    def hf(path) -> list[float]:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            logp = torch.log_softmax(m(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        return [logp[i - 1, t].item() for i, t in enumerate(ids) if i > 0]
    print("checkpoint in transformers vs served:", gap(hf(ckpt), served), "original vs served:", gap(hf(tiny_qwen3_5), served))
    assert gap(hf(ckpt), served) <= BF16_TRAINED_LOGPROB_TOL < gap(hf(tiny_qwen3_5), served)

    servers_restart.stop()
    args = [*SERVER_ARGS, "--training", "--state-dir", str(tmp_path / "state"), "--vectors-dir", str(server.vectors_dir)]
    fresh = servers_restart.start("qwen3_5-restored", lambda log_path: ServerProcess.plasticity(
        ckpt.parent, extra_args=args, log_path=log_path))
    name = requests.get(fresh.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    assert gap(prompt_logprobs(fresh.url, name, ids), served) <= 1e-6
    servers_restart.stop()


@pytest.mark.slow
def test_an_image_text_release_is_served_as_its_language_model_trained_and_checkpointed_whole(
        servers_restart, image_text, tok, tmp_path):
    """`plasticity serve` on Qwen 3.5 as released serves its language model (the vision tower not loaded),
    trains it in place, and /checkpoint writes the whole release back: transformers loads it as the
    image-text model with the served text log-probs and the release's vision tower."""
    from transformers import Qwen3_5ForConditionalGeneration

    image_text_release_round_trip(servers_restart, image_text, tok, tmp_path,
                                  "PlasticityQwen3_5ForConditionalGeneration", Qwen3_5ForConditionalGeneration)


def image_text_release_round_trip(servers_restart, release: Path, tok, tmp_path, architecture: str, hf_class) -> None:
    """Serve an image-text release (as `architecture`), check it against the HF form, train 5 steps,
    checkpoint: `hf_class` loads the checkpoint with the served log-probs and the release's vision tower."""
    from safetensors.torch import load_file

    from vllm_plasticity.launcher import ServerProcess

    # Without torch.compile: what this checks is the release's layout, not the compiled graph (the module's
    # first server checks that), and a compile here costs 35-45 s of the full tier.
    args = [*SERVER_ARGS, "--enforce-eager", "--training", "--state-dir", str(tmp_path / "state")]
    server = servers_restart.start(f"{architecture}-release", lambda log_path: ServerProcess.plasticity(
        release, extra_args=args, log_path=log_path))
    info = requests.get(server.url + "/plasticity/info", timeout=10).json()
    assert info["architecture"] == architecture and info["weights_shareable"]
    ids = tok("The cat saw the sea near the barn, and the story went on.")["input_ids"]
    assert gap(prompt_logprobs(server.url, str(release), ids), hf_logprobs(server, ids)) <= BF16_LOGPROB_TOL
    r = requests.post(server.url + "/train", timeout=600, json={
        "context_ids": ids[:5], "continuation_ids": ids[5:], "steps": 5, "optimizer": {"lr": 1e-2}})
    assert r.status_code == 200, r.text
    served = prompt_logprobs(server.url, str(release), ids)
    r = requests.post(server.url + "/checkpoint", timeout=600, json={})
    assert r.status_code == 200, r.text
    loaded = hf_class.from_pretrained(r.json()["path"], dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logp = torch.log_softmax(loaded(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    from_checkpoint = [logp[i - 1, t].item() for i, t in enumerate(ids) if i > 0]
    print("checkpoint (image-text, transformers) vs served:", gap(from_checkpoint, served))
    assert gap(from_checkpoint, served) <= BF16_TRAINED_LOGPROB_TOL
    original = load_file(str(release / "model.safetensors"))
    visual = {n: t for n, t in original.items() if n.startswith("model.visual.")}
    assert visual and all(torch.equal(loaded.state_dict()[n], t) for n, t in visual.items())
    servers_restart.stop()
