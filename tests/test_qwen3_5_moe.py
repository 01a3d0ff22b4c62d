"""Qwen 3.5 with experts (the 35B-A3B .. 397B-A17B releases) served by the plugin's subclasses, trained in
place, read, steered and checkpointed, each checked against transformers' own classes on the live weights:
`Qwen3_5MoeForCausalLM` (text only) and `Qwen3_5MoeForConditionalGeneration` (as released: served as its
language model).

The tiny random models (tests/qwen3_next_models.py) are the Qwen 3.5 model with the Qwen3-Next model's
experts and random router, bfloat16; tolerances are test_qwen3_next's, for the same reasons.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import torch

from conftest import API_KEY, prompt_logprobs
from qwen3_next_models import build_tiny_qwen3_5_moe
from test_qwen3_5 import image_text_release_round_trip, learns_a_fact
from test_qwen3_next import (BF16_LOGPROB_TOL, BF16_TRAINED_LOGPROB_TOL, HEADERS, SERVER_ARGS, gap, hf_logprobs,
                             live_view, readout_and_steering_equal_the_hf_form)


@pytest.fixture(scope="module")
def tiny_qwen3_5_moe(tmp_path_factory) -> Path:
    return build_tiny_qwen3_5_moe(tmp_path_factory.mktemp("qwen3_5_moe") / "m")


@pytest.fixture(scope="module")
def tok(tiny_qwen3_5_moe):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen3_5_moe)


def hf_checkpoint_logprobs(path, ids: list[int], cls=None) -> list[float]:
    """log p(token_i | <i), i >= 1, from a directory loaded by stock transformers (bfloat16)."""
    from transformers import AutoModelForCausalLM

    model = (cls or AutoModelForCausalLM).from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return [logp[i - 1, t].item() for i, t in enumerate(ids) if i > 0]


def test_a_checkpoint_keeps_the_releases_per_expert_tensors(tiny_qwen3_5_moe, tok, tmp_path):
    """The release keeps each expert's gate/up/down apart, the trainer's view stacks them: a checkpoint
    written from the view has exactly the release's tensor names (each expert's projections as views of the
    stack), a change to one expert lands in that expert's tensor, and transformers loads it as the view."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from plasticity_training.checkpoint import sync_checkpoint
    from plasticity_training.checkpoint_form import CheckpointForm

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_5_moe, dtype=torch.bfloat16).eval()
    experts = model.model.layers[1].mlp.experts
    inner = experts.gate_up_proj.shape[1] // 2
    with torch.no_grad():
        experts.gate_up_proj[2, inner + 1, 0] = 5.0  # expert 2's up_proj, row 1
        experts.down_proj[3, 0, 1] = -5.0
    form = CheckpointForm(tiny_qwen3_5_moe)
    assert form.per_expert
    assert form.names(["model.layers.1.mlp.experts.gate_up_proj"], model) == [
        f"model.layers.1.mlp.experts.{e}.{p}_proj.weight" for e in range(4) for p in ("gate", "up")]
    sync_checkpoint(form.tensors(model), tmp_path / "ckpt", tiny_qwen3_5_moe)

    def tensors(directory: Path) -> dict[str, torch.Tensor]:
        out = {}
        for shard in sorted(directory.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                out.update((n, f.get_tensor(n)) for n in f.keys())
        return out
    written, release = tensors(tmp_path / "ckpt" / "current"), tensors(tiny_qwen3_5_moe)
    assert set(written) == set(release)
    assert written["model.layers.1.mlp.experts.2.up_proj.weight"][1, 0] == 5.0
    assert written["model.layers.1.mlp.experts.3.down_proj.weight"][0, 1] == -5.0
    changed = {n for n in release if not torch.equal(written[n], release[n])}
    assert changed == {"model.layers.1.mlp.experts.2.up_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "current", dtype=torch.bfloat16).eval()
    ids = torch.tensor([tok("The story begins at the door of the old house")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# ---- one served model: training and readout on, bfloat16 (the full tier) ---------------------------------

@pytest.fixture(scope="module")
def server(servers_restart, tiny_qwen3_5_moe, tmp_path_factory):
    from vllm_plasticity.launcher import ServerProcess

    state_dir, vectors_dir = tmp_path_factory.mktemp("qwen3_5_moe-state"), tmp_path_factory.mktemp("qwen3_5_moe-vectors")
    args = [*SERVER_ARGS, "--training", "--state-dir", str(state_dir), "--vectors-dir", str(vectors_dir)]
    server = servers_restart.start("qwen3_5_moe", lambda log_path: ServerProcess.plasticity(
        tiny_qwen3_5_moe, extra_args=args, log_path=log_path))
    server.vectors_dir = vectors_dir
    return server


@pytest.mark.slow
def test_serves_the_plasticity_subclass_with_shared_weights(server, tiny_qwen3_5_moe, tok):
    info = requests.get(server.url + "/plasticity/info", headers=HEADERS, timeout=10).json()
    assert info["architecture"] == "PlasticityQwen3_5MoeForCausalLM" and info["weights_shareable"]
    assert info["repacked_after_step"] is True  # conv1d and experts: packed copies, packed again per step
    ids = tok("The story begins at the door of the old house")["input_ids"]
    served = prompt_logprobs(server.url, str(tiny_qwen3_5_moe), ids, API_KEY)
    print("served vs HF on the live weights, before training:", gap(served, hf_logprobs(server, ids)))
    assert gap(served, hf_logprobs(server, ids)) <= BF16_LOGPROB_TOL


@pytest.mark.slow
def test_learns_a_fact_and_serves_the_trainers_weights(server, tiny_qwen3_5_moe, tok):
    """Every parameter trained, experts and router included: the fact is learned and the served log-probs
    are the trainer's view's."""
    learns_a_fact(server, str(tiny_qwen3_5_moe), tok)


@pytest.mark.slow
def test_a_step_on_the_mlp_alone_moves_the_experts_and_router_and_is_served(server, tiny_qwen3_5_moe, tok):
    """`params` keeps the MLPs only: the routed experts (vLLM's fused w13/w2, packed copies on CPU), the
    router and the shared expert change, nothing else does, and the served log-probs follow the view."""
    model = str(tiny_qwen3_5_moe)
    ids = tok("The owl saw the gate near the lake, and the story went on. The boat saw the")["input_ids"]
    before = prompt_logprobs(server.url, model, ids, API_KEY)
    weights = {n: p.detach().clone() for n, p in live_view(server).named_parameters()}
    r = requests.post(server.url + "/train", headers=HEADERS, timeout=600, json={
        "context_ids": ids[:8], "continuation_ids": ids[8:], "steps": 5, "force": True, "optimizer": {"lr": 1e-2},
        "params": {"attention": False, "linear_attention": False, "decay": False, "embeddings": False,
                   "norms": False}})
    assert r.status_code == 200, r.text
    changed = {n for n, p in live_view(server).named_parameters() if not torch.equal(p, weights[n])}
    assert changed and all(".mlp." in n for n in changed), changed
    assert {"experts.gate_up_proj", "experts.down_proj", "gate.weight", "shared_expert.up_proj.weight"} <= {
        n.split(".mlp.")[1] for n in changed}
    after = prompt_logprobs(server.url, model, ids, API_KEY)
    assert gap(after, before) > 10 * BF16_TRAINED_LOGPROB_TOL
    assert gap(after, hf_logprobs(server, ids)) <= BF16_TRAINED_LOGPROB_TOL


@pytest.mark.slow
def test_readout_and_steering_at_a_gdn_layer_equal_the_hf_form(server, tiny_qwen3_5_moe, tok):
    readout_and_steering_equal_the_hf_form(server, str(tiny_qwen3_5_moe), tok, 0)


@pytest.mark.slow  # stops the module's server: the last test to use it
def test_checkpoint_is_a_directory_transformers_loads_and_a_restart_serves(server, servers_restart, tiny_qwen3_5_moe,
                                                                          tok, tmp_path):
    """/checkpoint writes the checkpoint's own names (experts whole, GDN projections unfused): stock
    transformers loads it and computes the served log-probs, not the original's, and a fresh server from it
    (started as the first was) serves them unchanged."""
    from vllm_plasticity.launcher import ServerProcess

    ids = tok("The cat saw the sea near the barn, and the story went on.")["input_ids"]
    served = prompt_logprobs(server.url, str(tiny_qwen3_5_moe), ids, API_KEY)
    r = requests.post(server.url + "/checkpoint", headers=HEADERS, timeout=600, json={})
    assert r.status_code == 200, r.text
    ckpt = Path(r.json()["path"])
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["Qwen3_5MoeForCausalLM"]
    from_ckpt, original = hf_checkpoint_logprobs(ckpt, ids), hf_checkpoint_logprobs(tiny_qwen3_5_moe, ids)
    print("checkpoint in transformers vs served:", gap(from_ckpt, served), "original vs served:", gap(original, served))
    assert gap(from_ckpt, served) <= BF16_TRAINED_LOGPROB_TOL < gap(original, served)

    servers_restart.stop()
    args = [*SERVER_ARGS, "--training", "--state-dir", str(tmp_path / "state"), "--vectors-dir", str(server.vectors_dir)]
    fresh = servers_restart.start("qwen3_5_moe-restored", lambda log_path: ServerProcess.plasticity(
        ckpt.parent, extra_args=args, log_path=log_path))
    name = requests.get(fresh.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    assert gap(prompt_logprobs(fresh.url, name, ids), served) <= 1e-6
    servers_restart.stop()


@pytest.mark.slow
def test_an_image_text_release_is_served_as_its_language_model_trained_and_checkpointed_whole(
        servers_restart, tok, tmp_path):
    """`plasticity serve` on a Qwen 3.5 MoE release (image-text) serves its language model, trains it in
    place, and /checkpoint writes the whole release back (each expert's tensors apart, as released):
    transformers loads it as the image-text model with the served text log-probs and the release's vision
    tower."""
    from transformers import Qwen3_5MoeForConditionalGeneration

    release = build_tiny_qwen3_5_moe(tmp_path / "release", image_text=True)
    image_text_release_round_trip(servers_restart, release, tok, tmp_path,
                                  "PlasticityQwen3_5MoeForConditionalGeneration", Qwen3_5MoeForConditionalGeneration)
