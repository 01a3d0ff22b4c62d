"""The trainer's logic without a server: parameter filters, the two context-freezing modes, rejected steps,
dedup and persisted state. Runs on a tiny private model (weights in ordinary tensors, vLLM names)."""

from __future__ import annotations

import pytest
import torch

from plasticity_training.hf_view import build_hf_view, token_logprobs
from tiny_models import TEXT, tiny, vllm_layout  # noqa: F401 (tiny is a fixture)
from plasticity_training.trainer_core import TrainerCore
from vllm_plasticity.contract.messages import TrainerError
from vllm_plasticity.contract.settings import param_kind, select_params



@pytest.fixture()
def core(tiny, tmp_path):
    weights = vllm_layout(tiny)
    c = TrainerCore(tiny, weights, tmp_path / "state")
    c.weights = weights
    return c


def test_view_matches_plain_hf_model(tiny):
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    view = build_hf_view(tiny, vllm_layout(tiny))
    ids = [5, 17, 42, 99, 7, 250]
    assert token_logprobs(view, ids) == pytest.approx(token_logprobs(ref, ids), abs=1e-6)


def test_param_kinds_and_filters(core):
    names = list(core.named)
    assert {param_kind(n) for n in names} == {"attention", "mlp", "embeddings", "norms"}
    only_layer1_mlp = select_params(names, {"layers": [1, 1], "attention": False, "norms": False})
    assert only_layer1_mlp and all(n.startswith("model.layers.1.mlp.") for n in only_layer1_mlp)
    assert select_params(names, {"layers": [5, 9]}) == []
    with pytest.raises(TrainerError) as err:
        core.begin_job([{"context_ids": [1, 2], "continuation_ids": [3]}], params={"layers": [5, 9]})
    assert err.value.kind == "invalid"


def test_project_architectures_token_tables_count_as_embeddings():
    """/train's `embeddings: false` must leave the token tables of every project architecture alone."""
    embeddings = ["embed.weight", "embedding.weight", "pos_embedding.weight", "linear_embedding.weight"]
    others = ["embed_norm.weight", "blocks.0.jordan.W_k.weight", "memory_hub.tier1_read.bias", "backbone.0.gru.weight_ih_l0"]
    assert [param_kind(n) for n in embeddings] == ["embeddings"] * 4
    assert [param_kind(n) for n in others] == ["mlp"] * 4


def test_step_writes_through_views_only_selected_params(core):
    before = {k: v.clone() for k, v in core.weights.items()}
    core.begin_job([{"context_ids": [5, 6, 7], "continuation_ids": [8, 9]}], optimizer={"lr": 1e-2},
                   params={"layers": [1, 1], "attention": False, "norms": False})
    out = core.step()
    core.end_job()
    assert out["weight_version"] == 1 and out["loss"] > 0
    changed = {k for k in before if not torch.equal(before[k], core.weights[k])}
    assert changed == {"model.layers.1.mlp.gate_up_proj.weight", "model.layers.1.mlp.down_proj.weight"}


def test_masked_and_no_grad_give_same_loss_different_gradients(core):
    samples = [{"context_ids": [5, 6, 7, 8], "continuation_ids": [9, 10, 11]}]

    def loss_and_grad(mode):
        core.model.zero_grad(set_to_none=True)
        for p in core.named.values():
            p.requires_grad_(True)
        loss = core._loss(samples, mode)
        loss.backward()
        return loss.item(), core.named["model.layers.0.self_attn.k_proj.weight"].grad.clone()

    masked_loss, masked_grad = loss_and_grad("masked")
    nograd_loss, nograd_grad = loss_and_grad("no_grad")
    assert nograd_loss == pytest.approx(masked_loss, rel=1e-5)
    # With the context frozen under no_grad, only the continuation's own keys carry gradient.
    assert not torch.allclose(masked_grad, nograd_grad)


def test_no_grad_context_learns_the_continuations_first_token(core):
    """The first continuation token is predicted from the context's last position: in no_grad mode that position
    still runs with a graph, so the first token's loss falls as fast as the others' (it did not, before)."""
    context, continuation = [5, 6, 7, 8], [9, 10, 11]
    ids = context + continuation
    first_before = -token_logprobs(core.model, ids)[len(context) - 1]
    core.begin_job([{"context_ids": context, "continuation_ids": continuation}], optimizer={"lr": 1e-2},
                   context_mode="no_grad")
    for _ in range(5):
        core.step()
    core.end_job()
    first_after = -token_logprobs(core.model, ids)[len(context) - 1]
    assert first_after < 0.5 * first_before


def test_non_finite_loss_is_rejected_and_changes_nothing(core):
    core.weights["model.norm.weight"][0] = float("nan")  # poisons the forward, not a trained weight
    before = {k: v.clone() for k, v in core.weights.items()}
    core.begin_job([{"context_ids": [5, 6], "continuation_ids": [7]}], optimizer={"lr": 1e-2})
    with pytest.raises(TrainerError) as err:
        core.step()
    assert err.value.kind == "rejected"
    for k, v in before.items():
        assert torch.equal(v, core.weights[k]) or (torch.isnan(v).any() and torch.equal(v.isnan(), core.weights[k].isnan()))
    assert core.state.weight_version == 0


def test_dedup_and_state_survive_a_restart(tiny, tmp_path):
    weights = vllm_layout(tiny)
    sample = {"context_ids": [5, 6], "continuation_ids": [7, 8]}
    first = TrainerCore(tiny, weights, tmp_path / "s")
    assert first.begin_job([sample], optimizer={"lr": 1e-3})["skipped_duplicates"] == 0
    first.step()
    first.end_job()
    again = TrainerCore(tiny, weights, tmp_path / "s")  # a fresh trainer process, same state dir
    assert again.state.weight_version == 1
    assert again.begin_job([sample], optimizer={"lr": 1e-3})["skipped_duplicates"] == 1
    again.end_job()
    assert again.begin_job([sample], optimizer={"lr": 1e-3}, force=True)["samples"] == 1
    again.step()
    again.end_job()
    assert again.optimizer.named_state_dict()["model.layers.0.mlp.down_proj.weight"]["step"].item() == 2
    with pytest.raises(TrainerError) as err:
        TrainerCore(tiny, weights, tmp_path / "s").begin_job([sample], optimizer={"rank": 8}, force=True)
    assert err.value.kind == "conflict"


def test_qwen2_view_splits_fused_qkv_bias(tmp_path):
    """Qwen2 has q/k/v biases: vLLM fuses them like the weights; the view must slice them the same way."""
    import transformers
    from safetensors.torch import load_file, save_file

    from plasticity_training.default_model import ModelSpec, build_model

    spec = ModelSpec(arch="qwen2", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, train_steps=0)
    path = build_model(spec, tmp_path / "q2", text=TEXT, log=lambda m: None)
    hf = load_file(str(path / "model.safetensors"))
    for name in [n for n in hf if n.endswith("_proj.bias")]:
        hf[name] = torch.randn_like(hf[name])  # distinct biases, so a wrong slice shows
    save_file(hf, str(path / "model.safetensors"), metadata={"format": "pt"})
    weights = vllm_layout(path)
    fused = weights["model.layers.0.self_attn.qkv_proj.bias"]
    assert fused.shape[0] == hf["model.layers.0.self_attn.q_proj.bias"].shape[0] * 2  # q (2 heads) + k + v (1 each)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    view = build_hf_view(path, weights)
    assert torch.equal(view.model.layers[0].self_attn.v_proj.bias, hf["model.layers.0.self_attn.v_proj.bias"])
    ids = [5, 17, 42, 99, 7, 250]
    assert token_logprobs(view, ids) == pytest.approx(token_logprobs(ref, ids), abs=1e-6)
