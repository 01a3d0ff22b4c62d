"""/checkpoint on a real server: block-level diff, stock transformers loads it, bad paths, and a fresh
server started from a checkpoint (written on request and at clean shutdown) continues training."""

from __future__ import annotations

import json

import pytest
import requests
import torch
from safetensors.torch import load_file

import time

from conftest import API_KEY, QUIET_SECONDS, SERVER_ARGS, prompt_logprobs
from vllm_plasticity.launcher import ServerProcess

pytestmark = pytest.mark.server
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post(server, path, body=None):
    return requests.post(server.url + path, json=body, headers=AUTH, timeout=600)


def get(server, path):
    return requests.get(server.url + path, headers=AUTH, timeout=60).json()


@pytest.fixture(scope="module")
def tok(default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model)


def test_checkpoint_requires_training_routes_and_key(plasticity_server):
    assert requests.post(plasticity_server.url + "/checkpoint", timeout=10).status_code == 401


def test_one_layer_step_writes_about_that_layer(plasticity_server, tok, default_model):
    first = post(plasticity_server, "/checkpoint")
    assert first.status_code == 200, first.text
    body = first.json()
    assert {"path", "bytes_written", "blocks_changed", "blocks_total", "seconds", "weight_version"} <= set(body)
    model_bytes = body["blocks_total"] * 4096
    ids = tok("The old house stood at the end of the lane")["input_ids"]
    r = post(plasticity_server, "/train", {"context_ids": ids[:4], "continuation_ids": ids[4:], "force": True,
                                           "optimizer": {"lr": 1e-3},
                                           "params": {"layers": [1, 1], "attention": False, "norms": False}})
    assert r.status_code == 200, r.text
    second = post(plasticity_server, "/checkpoint").json()
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(default_model)
    layer_mlp_bytes = 3 * cfg.hidden_size * cfg.intermediate_size * 4  # gate, up, down in fp32
    assert layer_mlp_bytes * 0.5 <= second["weight_bytes_written"] <= layer_mlp_bytes + 8 * 4096
    assert second["weight_bytes_written"] < model_bytes / 5
    assert second["weight_version"] == body["weight_version"] + 1
    status = get(plasticity_server, "/checkpoint")
    assert status["last"]["weight_version"] == second["weight_version"] and status["totals"]["checkpoints"] >= 2
    assert status["dirty"] is False


def test_checkpoint_loads_in_stock_transformers(plasticity_server, tok, default_model):
    import transformers

    from plasticity_training.hf_view import token_logprobs

    path = post(plasticity_server, "/checkpoint").json()["path"]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok("A friend stood at the door with her coat on")["input_ids"]
    served = prompt_logprobs(plasticity_server.url, str(default_model), ids, API_KEY)
    assert max(abs(a - b) for a, b in zip(token_logprobs(model, ids), served)) <= 1e-5


def test_bad_checkpoint_paths_are_refused_and_change_nothing(plasticity_server):
    before = post(plasticity_server, "/checkpoint").json()
    for path in ("../outside", "/tmp/elsewhere", "main/../../x", "."):
        r = post(plasticity_server, "/checkpoint", {"path": path})
        assert r.status_code == 400, (path, r.status_code, r.text)
        assert "checkpoint directory" in r.json()["error"]["message"]
    # An unwritable target: a path through a regular file (root ignores permission bits).
    blocker = plasticity_server.state_dir / "checkpoints" / "blocker"
    blocker.write_text("not a directory")
    r = post(plasticity_server, "/checkpoint", {"path": "blocker/ckpt"})
    assert 400 <= r.status_code < 600 and r.status_code != 200
    assert r.json()["error"]["message"]
    after = get(plasticity_server, "/checkpoint")["last"]
    assert after["path"] == before["path"] and after["generation"] == before["generation"]


def test_a_name_holding_another_models_checkpoint_is_409_unless_replace(plasticity_server, tmp_path):
    from plasticity_training.checkpoint import sync_checkpoint

    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    foreign = plasticity_server.state_dir / "checkpoints" / "foreign"
    sync_checkpoint({"w": torch.ones(8)}, foreign, other)  # e.g. written by a server of another model
    before = (foreign / "current" / "model.safetensors").read_bytes()
    r = post(plasticity_server, "/checkpoint", {"path": "foreign"})
    assert r.status_code == 409, r.text
    message = r.json()["error"]["message"]
    assert "holds another model's weights: they descend from 'other-model'" in message, message
    assert '"replace": true' in message
    assert (foreign / "current" / "model.safetensors").read_bytes() == before
    assert post(plasticity_server, "/checkpoint", {"path": "foreign", "replace": "yes"}).status_code == 400
    r = post(plasticity_server, "/checkpoint", {"path": "foreign", "replace": True})
    assert r.status_code == 200 and r.json()["generation"] == 2, r.text


def test_scheduled_checkpoint_after_quiet_period(plasticity_server, tok):
    ids = tok("The long meeting went on past noon")["input_ids"]
    r = post(plasticity_server, "/train", {"context_ids": ids[:4], "continuation_ids": ids[4:], "force": True,
                                           "optimizer": {"lr": 1e-4}})
    assert r.status_code == 200, r.text
    status = get(plasticity_server, "/checkpoint")
    assert status["dirty"] is True and status["next_scheduled"] is not None
    deadline = time.time() + QUIET_SECONDS + 30
    while time.time() < deadline and get(plasticity_server, "/checkpoint")["dirty"]:
        time.sleep(0.5)
    last = get(plasticity_server, "/checkpoint")["last"]
    assert last["reason"] == "scheduled" and last["weight_version"] == r.json()["weight_version"]


@pytest.mark.slow  # a server of its own
def test_qwen3_tied_model_trains_in_place(servers_restart, tmp_path):
    """The Qwen3 subclass with tied embeddings: served, shared, trained, and the view still matches."""
    from plasticity_training.default_model import ModelSpec, build_model, read_project_text
    from plasticity_training.hf_view import build_hf_view, token_logprobs
    from vllm_plasticity.contract.weights import WeightManifest, map_shared_weights

    spec = ModelSpec(arch="qwen3", tie_word_embeddings=True, vocab_size=512, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, train_steps=0)
    model_dir = build_model(spec, tmp_path / "qwen3", text=read_project_text(), log=lambda m: None)
    args = [*SERVER_ARGS, "--training", "--api-key", API_KEY, "--state-dir", str(tmp_path / "state"),
            "--vectors-dir", str(tmp_path / "vectors")]
    server = servers_restart.start("qwen3", lambda log_path: ServerProcess.plasticity(model_dir, extra_args=args,
                                                                                   log_path=log_path))
    info = get(server, "/plasticity/info")
    assert info["architecture"] == "PlasticityQwen3ForCausalLM" and info["weights_shareable"]
    manifest = WeightManifest.from_dict(json.load(open(info["weight_manifest"])))
    assert "lm_head.weight" not in {t.name for t in manifest.tensors}  # one tensor for both ends
    ids = [5, 17, 42, 99, 7, 250, 31, 8]
    r = post(server, "/train", {"context_ids": ids[:4], "continuation_ids": ids[4:], "steps": 3, "optimizer": {"lr": 1e-2}})
    assert r.status_code == 200, r.text
    view = build_hf_view(model_dir, map_shared_weights(manifest))
    assert view.lm_head.weight is view.model.embed_tokens.weight
    served = prompt_logprobs(server.url, str(model_dir), ids, API_KEY)
    assert max(abs(a - b) for a, b in zip(token_logprobs(view, ids), served)) <= 1e-5

    # Readout and steering on the Qwen3 layers (tapped after construction: no layer-type argument there).
    from vllm_plasticity.contract.bank import save_bank
    from test_readout import hf_forward

    vectors = torch.nn.functional.normalize(torch.randn(2, 64, generator=torch.Generator().manual_seed(3)), dim=1)
    save_bank(tmp_path / "vectors" / "q", ["a", "b"], {1: vectors}, model="t", method="t")
    assert post(server, "/readout/load", {"name": "q", "path": "q"}).status_code == 200
    r = post(server, "/v1/completions", {"model": str(model_dir), "prompt": ids, "max_tokens": 3, "temperature": 0,
                                         "return_token_ids": True, "readout": "q", "steer": ["q/a", 5.0]})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    states, _ = hf_forward(view, ids + choice["token_ids"], steer={1: 5.0 * vectors[0]})
    got = torch.tensor(choice["readout"]["scores"])[:, 0, :]
    assert (got - states[1][: len(got)] @ vectors.T).abs().max().item() <= 1e-4


def test_fresh_server_from_checkpoint_continues(servers_restart, plasticity_server, default_model, tok, tmp_path):
    model = str(default_model)
    ids = tok("The build passed at midnight after eleven days")["input_ids"]
    post(plasticity_server, "/checkpoint")
    # Trained after the explicit checkpoint: only the shutdown checkpoint has this step.
    r = post(plasticity_server, "/train", {"context_ids": ids[:4], "continuation_ids": ids[4:], "force": True,
                                           "optimizer": {"lr": 1e-3}})
    assert r.status_code == 200, r.text
    version = r.json()["weight_version"]
    probe = tok("She read the paper twice and then once more")["input_ids"]
    trained = prompt_logprobs(plasticity_server.url, model, probe, API_KEY)
    ckpt_dir = plasticity_server.state_dir / "checkpoints" / "main"
    servers_restart.stop()  # clean shutdown: writes a checkpoint of the last step

    saved_state = json.loads((ckpt_dir / "current" / "plasticity_state" / "trainer_state.json").read_text())
    assert saved_state["weight_version"] == version
    saved_opt = load_file(str(ckpt_dir / "current" / "plasticity_state" / "optimizer.safetensors"))
    key = "model.layers.0.mlp.down_proj.weight::step"
    state_dir = tmp_path / "state2"
    args = [*SERVER_ARGS, "--training", "--api-key", API_KEY, "--state-dir", str(state_dir)]
    server = servers_restart.start("restored", lambda log_path: ServerProcess.plasticity(ckpt_dir, extra_args=args,
                                                                                      log_path=log_path))
    served_model = requests.get(server.url + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"]
    # The checkpoint holds the served weights bit for bit (tests/test_checkpoint.py); a few float32 ulps of
    # slack (1e-6 relative): measured 2 ulps apart on an AMD EPYC CPU, whose GEMM may sum in another order.
    assert prompt_logprobs(server.url, served_model, probe, API_KEY) == pytest.approx(trained, rel=1e-6, abs=1e-6)
    r = post(server, "/train", {"context_ids": ids[:4], "continuation_ids": ids[4:], "force": True,
                                "optimizer": {"lr": 1e-3}})
    assert r.status_code == 200, r.text
    assert r.json()["weight_version"] == version + 1
    resumed = load_file(str(next(state_dir.glob("models/*/optimizer.safetensors"))))  # state is kept per model
    assert resumed[key].item() == saved_opt[key].item() + 1  # optimizer state continued, not restarted
