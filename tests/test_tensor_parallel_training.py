"""Training split over two trainers the way a --tensor-parallel-size 2 server splits its weights: each rank
is a real process holding only its shard (vLLM's layout, tiny_models.vllm_shard), the ranks talk over a
gloo process group, and the job they run together must give what one trainer gives on the whole tensors:
the same losses, the same log-probs and, gathered, the same weights. No vLLM here: the shards are built
from the model on disk the way vLLM's parallel layers load it."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from plasticity_training.default_model import ModelSpec, build_model
from plasticity_training.hf_view import build_hf_view, token_logprobs
from plasticity_training.tensor_parallel import Shard, TensorParallelError, local_config
from plasticity_training.trainer_core import TrainerCore
from tiny_models import TEXT, vllm_gather, vllm_layout, vllm_shard

WORLD = 2
# k and v (2 KV heads x 16 = 32 rows of 64 inputs) are wide: APOLLO's channels are their unsplit inputs and the
# split side is contracted (the projected gradient is summed over ranks); q, gate, up, o, down and the
# vocabulary are split along their channels. The vocabulary (300) pads to 320: rank 1 holds 20 padding rows.
SPEC = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, train_steps=0)
SAMPLES = [{"context_ids": [5, 17, 42, 99], "continuation_ids": [7, 250, 31]},
           {"context_ids": [12, 13], "continuation_ids": [280, 299, 4, 8, 9]},
           {"context_ids": [200, 150, 100, 50, 25], "continuation_ids": [171]}]
PAIRS = [{"context_ids": s["context_ids"], "chosen_ids": s["continuation_ids"],
          "rejected_ids": list(reversed(s["continuation_ids"])) + [3]} for s in SAMPLES]
PROBE = [5, 17, 42, 99, 7, 250, 31, 290, 160, 159]  # tokens of both vocabulary blocks
STEPS = 3
JOBS = {
    # grad_clip 0.05 clips every step: the norm spans both ranks' split tensors and the whole ones once
    "sft, apollo rank 8, untied": dict(tie=False, samples=SAMPLES, job=dict(
        objective="sft", optimizer={"lr": 3e-3, "rank": 8, "grad_clip": 0.05})),
    "dpo, apollo-mini, tied": dict(tie=True, samples=PAIRS, job=dict(
        objective="dpo", optimizer={"lr": 3e-3, "mini": True})),
    "sft no_grad context, tied": dict(tie=True, samples=SAMPLES, job=dict(
        objective="sft", context_mode="no_grad", optimizer={"lr": 3e-3, "rank": 4, "weight_decay": 0.1})),
}


def model(tmp_path, tie: bool):
    return build_model(ModelSpec(**SPEC, tie_word_embeddings=tie), tmp_path / "model", text=TEXT, log=lambda m: None)


def run_job(core: TrainerCore, samples: list[dict], job: dict) -> dict:
    """Open the job, take STEPS steps, close it: the losses, and the probe's log-probs before and after."""
    before = token_logprobs(core.model, PROBE)
    opened = core.begin_job(samples, **job)
    losses = [core.step()["loss"] for _ in range(STEPS)]
    core.end_job()
    return {"opened": opened, "losses": losses, "before": before, "after": token_logprobs(core.model, PROBE)}


def rank_main(rank: int, path: str, init: str, samples: list[dict], job: dict, out: str, start: str | None = None) -> None:
    """One tensor-parallel trainer: its shard of the model on disk (or of the whole tensors saved at
    `start`), the job, a checkpoint; what it saw and its tensors."""
    import transformers

    shard = Shard.join(rank, WORLD, init)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        whole = torch.load(start) if start else vllm_layout(path)
        weights = vllm_shard(whole, config, rank, WORLD)
        core = TrainerCore(path, weights, f"{out}/state", shard=shard)
        result = run_job(core, samples, job)
        written = core.checkpoint(f"{out}/checkpoint", out)
        torch.save({"result": result, "weights": weights, "checkpoint": written}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(path, tmp_path, name: str, samples, job, start=None) -> list[dict]:
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    mp.start_processes(rank_main, args=(str(path), f"file://{tmp_path / (name + '-rendezvous')}", samples, job,
                                        str(out), start and str(start)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def saved(directory) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files under `directory` (a checkpoint's, a state directory's)."""
    from safetensors.torch import load_file

    return {k: v for f in sorted(directory.rglob("*.safetensors")) for k, v in load_file(f).items()}


def assert_results_equal(ranks: list[dict], want: dict) -> None:
    for r in ranks:
        got = r["result"]
        assert got["opened"]["samples"] == want["opened"]["samples"]
        assert got["before"] == pytest.approx(want["before"], abs=1e-5)  # the split forward is the whole one
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-5, abs=1e-6)
        assert got["after"] == pytest.approx(want["after"], abs=2e-5)


def assert_tensors_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def poisoned_rank_main(rank: int, path: str, init: str, out: str) -> None:
    """Both trainers step, but rank 1's gradient of one of its split tensors is NaN: both must refuse."""
    import transformers

    from vllm_plasticity.contract.messages import TrainerError

    shard = Shard.join(rank, WORLD, init)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        weights = vllm_shard(vllm_layout(path), config, rank, WORLD)
        before = {n: t.clone() for n, t in weights.items()}
        core = TrainerCore(path, weights, f"{out}/state", shard=shard)
        if rank == 1:
            core.model.model.layers[1].mlp.down_proj.weight.register_hook(lambda g: g * float("nan"))
        core.begin_job(SAMPLES, optimizer={"rank": 8})
        try:
            core.step()
            refusal = None
        except TrainerError as exc:
            refusal = exc.kind
        torch.save({"refusal": refusal, "unchanged": all(torch.equal(before[n], weights[n]) for n in weights),
                    "state": bool(core.optimizer.state)}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("case", list(JOBS))
def test_two_trainers_on_shards_take_the_step_one_trainer_takes_on_the_whole_model(case, tmp_path):
    import transformers

    tie, samples, job = JOBS[case]["tie"], JOBS[case]["samples"], JOBS[case]["job"]
    path = model(tmp_path, tie)
    config = transformers.AutoConfig.from_pretrained(path)
    whole = vllm_layout(path)
    one = TrainerCore(path, whole, tmp_path / "tp1" / "state")
    want = run_job(one, samples, job)
    one.checkpoint(str(tmp_path / "tp1" / "checkpoint"), str(tmp_path / "tp1"))

    ranks = run_ranks(path, tmp_path, "tp2", samples, job)
    assert_results_equal(ranks, want)
    assert want["after"] != pytest.approx(want["before"], abs=1e-3)  # the job moved the model
    trained = vllm_gather([r["weights"] for r in ranks], config)
    for name, tensor in whole.items():
        assert (tensor - vllm_layout(path)[name]).abs().max().item() > 0, f"{name} did not train"
    assert_tensors_close(trained, whole)
    # One whole checkpoint (rank 0 writes it; both ranks answer alike) and one whole optimizer state: the
    # same files one trainer writes, so any shard count resumes them.
    assert ranks[0]["checkpoint"] == ranks[1]["checkpoint"]
    assert_tensors_close(saved(tmp_path / "tp2" / "checkpoint" / "current"), saved(tmp_path / "tp1" / "checkpoint" / "current"))
    assert_tensors_close(saved(tmp_path / "tp2" / "state"), saved(tmp_path / "tp1" / "state"))


def test_a_state_one_trainer_saved_resumes_on_two_and_continues_as_one_would(tmp_path):
    """Weights and optimizer state after a job on one trainer; the next job on two trainers started from
    them (the whole state file sliced per rank) equals the next job on the one."""
    import shutil

    path = model(tmp_path, tie=False)
    whole = vllm_layout(path)
    one = TrainerCore(path, whole, tmp_path / "tp1" / "state")
    job = {"optimizer": {"lr": 3e-3, "rank": 8}}
    run_job(one, SAMPLES[:2], job)
    torch.save(whole, tmp_path / "after-first-job.pt")
    (tmp_path / "tp2").mkdir()
    shutil.copytree(tmp_path / "tp1" / "state", tmp_path / "tp2" / "state")
    want = run_job(one, SAMPLES[2:], job)  # the optimizer's moments carry over: the steps differ without them
    ranks = run_ranks(path, tmp_path, "tp2", SAMPLES[2:], job, start=tmp_path / "after-first-job.pt")
    assert_results_equal(ranks, want)
    assert_tensors_close(saved(tmp_path / "tp2" / "state"), saved(tmp_path / "tp1" / "state"))


def test_a_bad_gradient_on_one_rank_is_refused_on_every_rank_and_changes_no_weight(tmp_path):
    path = model(tmp_path, tie=False)
    mp.start_processes(poisoned_rank_main, args=(str(path), f"file://{tmp_path / 'rendezvous'}", str(tmp_path)),
                       nprocs=WORLD, start_method="spawn")
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got == {"refusal": "rejected", "unchanged": True, "state": False}, r


def test_a_model_vllm_would_not_split_evenly_is_refused_with_the_reason(tmp_path):
    import transformers

    path = build_model(ModelSpec(**{**SPEC, "num_key_value_heads": 1}), tmp_path / "m", text=TEXT, log=lambda m: None)
    with pytest.raises(TensorParallelError, match="num_key_value_heads = 1 does not split over 2"):
        local_config(transformers.AutoConfig.from_pretrained(path), WORLD)


def test_one_rank_view_holds_its_shard_and_nothing_more(tmp_path):
    """Every parameter of rank 1's view is a view of rank 1's tensors (no copy): a write there is a write
    into the worker's weights."""
    import transformers

    path = model(tmp_path, tie=False)
    config = transformers.AutoConfig.from_pretrained(path)
    weights = vllm_shard(vllm_layout(path), config, 1, WORLD)
    view = build_hf_view(path, weights, shard=Shard(1, WORLD))
    storages = {t.untyped_storage().data_ptr() for t in weights.values()}
    for name, p in view.named_parameters():
        assert p.untyped_storage().data_ptr() in storages, name
    assert view.model.embed_tokens.weight.shape == (160, 64) and view.lm_head.valid == 140
    assert view.model.layers[0].self_attn.k_proj.weight.shape == (16, 64)
