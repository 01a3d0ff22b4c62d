"""What the second hardening pass broke in the trainer, at the level of the trainer core, the checkpoint module
and the job runner (issue "Hardening, round 2", items 1, 2, 9, 11, 13, 15), without a vLLM server: a job start
that fails, a job whose loss diverges (and its rollback), the weight version across a crash, checkpoint names
and free disk space, temporary files of a killed write, and two models sharing one state directory.
(tests/test_hardening.py drives items 1 and 2 through /train on a real server.)"""

from __future__ import annotations

import asyncio
import types

import pytest
import torch

from plasticity_training import checkpoint as ckpt
from plasticity_training import divergence
from plasticity_training.default_model import ModelSpec, build_model
from plasticity_training.trainer import answer
from plasticity_training.trainer_core import TrainerCore
from tiny_models import TEXT, tiny, vllm_layout  # noqa: F401 (tiny is a fixture)
from vllm_plasticity.contract.messages import BeginJob, TrainerError, decode_reply, encode, encode_reply

SAMPLE = {"context_ids": [5, 6, 7], "continuation_ids": [8, 9, 10]}
WRECKING = {"lr": 1.0, "scale": 1000.0, "grad_clip": 1e6}  # in range, and it wrecks the model (issue item 2)


@pytest.fixture()
def core(tiny, tmp_path):
    weights = vllm_layout(tiny)
    c = TrainerCore(tiny, weights, tmp_path / "state")
    c.weights = weights
    return c


def clone(weights):
    return {k: v.clone() for k, v in weights.items()}


def run_until_diverged(core, steps=20):
    losses = []
    for _ in range(steps):
        try:
            losses.append(core.step()["loss"])
        except TrainerError as exc:
            return losses, exc
    raise AssertionError(f"no divergence in {steps} steps: {losses}")


# ---- 1. a failed job start leaves the trainer ready ------------------------------------------------------

def test_a_job_start_that_fails_leaves_no_job_open(core, monkeypatch):
    overflow = {"context_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [9], "ref_chosen_logp": -1e39,
                "ref_rejected_logp": 0.0}
    with pytest.raises(RuntimeError, match="overflow"):  # the reference log-probs do not fit a float32
        core.begin_job([overflow], objective="dpo", force=True)
    assert core.job is None
    core.begin_job([SAMPLE])  # was: "a job is already running in the trainer"
    core.end_job()

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(core, "_pair_logprobs", out_of_memory)
    pair = {k: v for k, v in overflow.items() if not k.startswith("ref_")}
    reply = answer(core, encode(BeginJob(samples=[pair], objective="dpo", force=True)))
    assert isinstance(reply, TrainerError) and reply.kind == "out_of_memory"
    assert core.job is None
    begun = answer(core, encode(BeginJob(samples=[SAMPLE], force=True)))
    assert not isinstance(begun, TrainerError), begun


# ---- 2. divergence and rollback --------------------------------------------------------------------------

def test_a_diverging_job_stops_and_rolls_back_weights_and_optimizer_state(core):
    core.begin_job([SAMPLE], optimizer={"lr": 1e-3})  # optimizer state exists before the wrecking job
    core.step()
    core.end_job()
    weights = clone(core.weights)
    state = {n: {k: v.clone() for k, v in st.items()} for n, st in core.optimizer.named_state_dict().items()}
    version = core.state.weight_version
    begun = core.begin_job([SAMPLE], optimizer=WRECKING, force=True)
    assert begun["rollback_bytes"] > sum(w.numel() * w.element_size() for w in core.named.values()) * 0.9
    losses, exc = run_until_diverged(core)
    assert exc.kind == "diverged" and "above 2 x its start" in str(exc), exc
    assert len(losses) >= 1 and any(not torch.equal(weights[k], core.weights[k]) for k in weights)
    ended = core.end_job(success=False)
    assert ended["rolled_back"] is True
    assert all(torch.equal(weights[k], core.weights[k]) for k in weights)  # bitwise the job's start
    after = core.optimizer.named_state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[n][k], state[n][k]) for n in state for k in state[n])
    # The restore is new weights for the server (published, repacked): a new version, never an old number.
    assert ended["weight_version"] == version + len(losses) + 1
    assert core.begin_job([SAMPLE], optimizer={"lr": 1e-3})["skipped_duplicates"] == 1  # not recorded as trained


def test_rollback_false_or_no_room_keeps_no_copy_and_rollback_true_without_room_is_refused(core, monkeypatch):
    begun = core.begin_job([SAMPLE], optimizer=WRECKING, force=True, rollback=False)
    assert begun["rollback_bytes"] == 0 and "rollback: false" in begun["rollback_note"]
    weights = clone(core.weights)
    run_until_diverged(core)
    assert core.end_job(success=False)["rolled_back"] is False
    assert any(not torch.equal(weights[k], core.weights[k]) for k in weights)  # the job's weights stay

    monkeypatch.setattr(divergence, "available_host_bytes", lambda: 1 << 10)
    begun = core.begin_job([SAMPLE], force=True)  # default: only where memory allows
    assert begun["rollback_bytes"] == 0 and "would not fit" in begun["rollback_note"]
    core.end_job()
    with pytest.raises(TrainerError) as err:
        core.begin_job([SAMPLE], force=True, rollback=True)
    assert err.value.kind == "out_of_memory" and "MiB needed" in str(err.value)
    assert core.job is None


def test_a_healthy_job_at_a_high_learning_rate_does_not_count_as_diverged(core):
    core.begin_job([SAMPLE], optimizer={"lr": 1e-2}, force=True)
    losses = [core.step()["loss"] for _ in range(30)]
    core.end_job()
    assert losses[-1] < losses[0]


class InProcessTrainer:
    """The TrainerClient's interface, answered by a TrainerCore in this process through the real wire."""

    def __init__(self, core):
        self.core, self.state, self.pid, self.restarts, self.last_error, self.log_path = core, "ready", 1, 1, None, ""
        self.endpoint = None

    async def ensure_started(self):
        pass

    def alive(self):
        return True

    async def request(self, msg, timeout=None):
        return decode_reply(msg, encode_reply(answer(self.core, encode(msg))))


def service(core, tmp_path):
    from vllm_plasticity.training_service import TrainingService

    engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(add_request_async=lambda request: None))
    return TrainingService(engine, InProcessTrainer(core), vocab_size=300, max_model_len=512,
                           checkpoint_dir=tmp_path / "ckpts")


def run_job(svc, body):
    from vllm_plasticity.training_service import TrainRequest

    job = svc.submit(TrainRequest(**body))
    svc.queue.get_nowait()
    asyncio.run(svc._run_job(job))
    return job


def test_the_server_reports_diverged_and_holds_automatic_checkpoints_only_without_rollback(core, tmp_path):
    svc = service(core, tmp_path)
    svc.weight_version = svc.checkpointed_version = 0
    body = {**SAMPLE, "steps": 20, "force": True, "optimizer": WRECKING}
    rolled = run_job(svc, body)
    assert rolled.status == "diverged" and rolled.http_status == 422 and rolled.rolled_back is True
    assert "rolled back" in rolled.error and svc.checkpoints_held is None
    assert rolled.summary()["rolled_back"] is True

    kept = run_job(svc, {**body, "rollback": False})
    assert kept.status == "diverged" and kept.rolled_back is False and "not rolled back" in kept.error
    assert svc.checkpoints_held and kept.id in svc.checkpoints_held
    assert svc.checkpoint_status()["held"] == svc.checkpoints_held and svc.dirty
    svc.checkpoint_at_exit()  # held: the wreck is not written as the next generation of main
    assert not (tmp_path / "ckpts" / "main").exists()
    asyncio.run(svc.checkpoint(None))  # asked for: written, and the automatic ones resume
    assert (tmp_path / "ckpts" / "main" / "current").exists() and svc.checkpoints_held is None


def test_a_failed_job_start_fails_the_job_with_its_reason_and_the_next_job_runs(core, tmp_path, monkeypatch):
    svc = service(core, tmp_path)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(core, "_pair_logprobs", out_of_memory)
    pair = {"context_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [9]}
    failed = run_job(svc, {"objective": "dpo", "samples": [pair], "force": True})
    assert failed.status == "failed" and failed.http_status == 507 and "out of memory" in failed.error
    assert svc.trainer.state == "ready" and core.job is None
    monkeypatch.undo()
    assert run_job(svc, {**SAMPLE, "force": True}).status == "succeeded"


# ---- 9. the weight version across a crash and a restart -------------------------------------------------

def test_the_weight_version_never_counts_backwards_across_a_crash_or_a_restore(tiny, tmp_path):
    weights = vllm_layout(tiny)
    first = TrainerCore(tiny, weights, tmp_path / "s")
    first.begin_job([SAMPLE], optimizer={"lr": 1e-3})
    first.step()
    first.end_job()
    first.checkpoint(str(tmp_path / "ckpts" / "main"), str(tmp_path / "ckpts"))  # saved at version 1
    first.begin_job([SAMPLE], optimizer={"lr": 1e-3}, force=True)
    for _ in range(3):
        first.step()
    first.end_job()  # version 4, saved
    first.begin_job([SAMPLE], optimizer={"lr": 1e-3}, force=True)
    for _ in range(3):
        first.step()
    reached = first.state.weight_version  # 7, then the whole tree is SIGKILLed: nothing saved
    assert reached == 7
    again = TrainerCore(tiny, weights, tmp_path / "s")
    assert again.state.weight_version > reached
    restored = TrainerCore(tmp_path / "ckpts" / "main" / "current", weights, tmp_path / "s")
    assert restored.restored_from and restored.state.weight_version > reached
    # A clean restart does not jump: the mark was settled when the state was saved.
    restored.begin_job([SAMPLE], optimizer={"lr": 1e-3}, force=True)
    restored.step()
    restored.end_job()
    assert TrainerCore(tmp_path / "ckpts" / "main" / "current", weights, tmp_path / "s").state.weight_version \
        == restored.state.weight_version


# ---- 11. checkpoint names and free disk space ------------------------------------------------------------

@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def test_checkpoint_names_are_limited_and_existing_names_still_write(tmp_path, model_dir):
    root = tmp_path / "ckpts"
    for name in ("a", "deep/b"):
        ckpt.sync_checkpoint({"w": torch.ones(4)}, root / name, model_dir, allowed_root=root, max_names=2)
    with pytest.raises(ckpt.CheckpointSpaceError, match="2 checkpoint names, the limit is 2"):
        ckpt.sync_checkpoint({"w": torch.ones(4)}, root / "c", model_dir, allowed_root=root, max_names=2)
    assert not (root / "c").exists()
    report = ckpt.sync_checkpoint({"w": torch.full((4,), 2.0)}, root / "a", model_dir, allowed_root=root, max_names=2)
    assert report.generation == 2


def test_a_write_that_needs_more_than_the_free_space_is_refused_with_the_figures(tmp_path, model_dir, monkeypatch):
    root = tmp_path / "ckpts"
    weights = {"w": torch.ones(1 << 16)}  # 256 KiB
    monkeypatch.setattr(ckpt, "free_bytes", lambda path: 300 << 10)  # the first sync writes it twice (seeding)
    with pytest.raises(ckpt.CheckpointSpaceError, match=r"needs \d+ bytes .* and the disk has 307200 bytes"):
        ckpt.sync_checkpoint(weights, root / "main", model_dir, allowed_root=root)
    assert not (root / "main").exists()
    monkeypatch.setattr(ckpt, "free_bytes", lambda path: 1 << 30)
    ckpt.sync_checkpoint(weights, root / "main", model_dir, allowed_root=root)
    monkeypatch.setattr(ckpt, "free_bytes", lambda path: 300 << 10)  # a block diff writes in place: enough
    weights["w"][:10] = 3.0
    assert ckpt.sync_checkpoint(weights, root / "main", model_dir, allowed_root=root).generation == 2


def test_the_trainer_answers_a_refused_checkpoint_as_disk_full(core, tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "free_bytes", lambda path: 0)
    with pytest.raises(TrainerError) as err:
        core.checkpoint(str(tmp_path / "ckpts" / "main"), str(tmp_path / "ckpts"))
    assert err.value.kind == "disk_full" and "MiB" in str(err.value)


# ---- 13. temporary files of a killed write ---------------------------------------------------------------

def test_temporary_files_of_a_killed_state_write_are_removed_at_the_next_start(tiny, tmp_path):
    from plasticity_training.state_store import MODELS, model_key

    root = tmp_path / "s"
    own = root / MODELS / model_key(tiny)
    own.mkdir(parents=True)
    ours = [root / "optimizer.safetensors.tmp", root / "trainer_state.json.tmp", own / "optimizer.safetensors.tmp",
            own / "trainer_state.json.tmp", root / "weight_version.json.tmp"]
    others = [root / "notes.tmp", own / "optimizer.safetensors.tmp.keep", root / "mine.safetensors.tmp"]
    for path in ours + others:
        path.write_bytes(b"half a file")
    TrainerCore(tiny, vllm_layout(tiny), root)
    assert [p for p in ours if p.exists()] == []
    assert all(p.exists() for p in others)


# ---- 15. two models, one state directory -----------------------------------------------------------------

@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory):
    spec = ModelSpec(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, train_steps=0)
    return build_model(spec, tmp_path_factory.mktemp("other") / "m", text=TEXT, log=lambda m: None)


def train_once(core, sample=SAMPLE):
    core.begin_job([sample], optimizer={"lr": 1e-3}, force=True)
    core.step()
    core.end_job()


def test_another_model_on_the_same_state_dir_trains_and_leaves_the_first_models_state(tiny, other_tiny, tmp_path):
    root = tmp_path / "s"
    first = TrainerCore(tiny, vllm_layout(tiny), root)
    train_once(first)
    saved = {p.name: p.read_bytes() for p in first.state_dir.iterdir() if p.is_file()}
    other = TrainerCore(other_tiny, vllm_layout(other_tiny), root)
    train_once(other)  # was: 500 "Invalid state for 'model.embed_tokens.weight': exp_avg has shape ..."
    assert {p.name: p.read_bytes() for p in first.state_dir.iterdir() if p.is_file()} == saved
    back = TrainerCore(tiny, vllm_layout(tiny), root)
    assert back.state.total_jobs == 1 and back.begin_job([SAMPLE])["skipped_duplicates"] == 1


def test_state_from_before_it_was_kept_per_model_goes_to_its_own_model_only(tiny, other_tiny, tmp_path):
    import os

    root = tmp_path / "s"
    first = TrainerCore(tiny, vllm_layout(tiny), root)
    train_once(first)
    for path in list(first.state_dir.iterdir()):  # the layout of earlier versions: files directly in root
        os.replace(path, root / path.name)
    first.state_dir.rmdir()
    train_once(TrainerCore(other_tiny, vllm_layout(other_tiny), root))
    assert (root / "optimizer.safetensors").exists() and (root / "trainer_state.json").exists()
    adopted = TrainerCore(tiny, vllm_layout(tiny), root)
    assert adopted.state.total_jobs == 1 and not (root / "optimizer.safetensors").exists()
    train_once(adopted)
    assert adopted.optimizer.named_state_dict()["model.layers.0.mlp.down_proj.weight"]["step"].item() == 2


def test_optimizer_state_that_does_not_fit_is_a_conflict_with_what_to_do_and_is_kept(tiny, other_tiny, tmp_path):
    root = tmp_path / "s"
    other = TrainerCore(other_tiny, vllm_layout(other_tiny), root)
    train_once(other)
    first = TrainerCore(tiny, vllm_layout(tiny), root)
    foreign = (other.state_dir / "optimizer.safetensors").read_bytes()
    (first.state_dir / "optimizer.safetensors").write_bytes(foreign)  # e.g. copied in by hand
    with pytest.raises(TrainerError) as err:
        first.begin_job([SAMPLE])
    assert err.value.kind == "conflict" and "move that file away" in str(err.value) and first.job is None
    assert (first.state_dir / "optimizer.safetensors").read_bytes() == foreign


def test_a_second_model_never_overwrites_the_first_models_checkpoint_unasked(tiny, other_tiny, tmp_path, capfd):
    from fastapi import HTTPException

    from test_checkpoint import tree_bytes

    root, ckpts = tmp_path / "s", tmp_path / "ckpts"
    first = TrainerCore(tiny, vllm_layout(tiny), root)
    train_once(first)
    first.checkpoint(str(ckpts / "main"), str(ckpts))
    before = tree_bytes(ckpts / "main")

    other = TrainerCore(other_tiny, vllm_layout(other_tiny), root)  # same state dir, same default checkpoint
    train_once(other)
    with pytest.raises(TrainerError) as err:
        other.checkpoint(str(ckpts / "main"), str(ckpts))
    assert err.value.kind == "other_model" and '"replace": true' in str(err.value)
    svc = service(other, tmp_path)
    svc.weight_version, svc.checkpointed_version = 1, 0
    with pytest.raises(HTTPException) as refused:  # the quiet timer's checkpoint (and a plain POST /checkpoint)
        asyncio.run(svc.checkpoint(reason="scheduled"))
    assert refused.value.status_code == 409
    held = svc.checkpoint_status()["held"]
    assert "automatic checkpoints are skipped" in held and f"descend from {tiny.name!r} ({tiny.resolve()})" in held
    assert "automatic checkpoints are skipped" in capfd.readouterr().err  # logged
    svc.checkpoint_at_exit()  # skipped, not sent
    assert tree_bytes(ckpts / "main") == before  # the first model's checkpoint, byte for byte

    assert asyncio.run(svc.checkpoint("other"))["generation"] == 1  # another name: written
    assert svc.checkpoint_status()["held"] == held  # the default name still belongs to the first model
    assert asyncio.run(svc.checkpoint(replace=True))["generation"] == 2  # asked for: replaced
    assert svc.checkpoint_status()["held"] is None


def test_the_checkpoint_body_takes_replace_as_a_json_boolean_only():
    from pydantic import ValidationError

    from vllm_plasticity.training_service import CheckpointRequest

    assert CheckpointRequest.model_validate_json('{"path": "main", "replace": true}').replace is True
    assert CheckpointRequest.model_validate_json("{}").replace is False
    for body in ('{"replace": "true"}', '{"replace": 1}', '{"replace": null}', '{"overwrite": true}'):
        with pytest.raises(ValidationError):
            CheckpointRequest.model_validate_json(body)


def test_resuming_from_a_checkpoint_checkpoints_back_into_its_own_name(tiny, tmp_path):
    root, ckpts = tmp_path / "s", tmp_path / "ckpts"
    first = TrainerCore(tiny, vllm_layout(tiny), root)
    train_once(first)
    first.checkpoint(str(ckpts / "main"), str(ckpts))
    resumed = TrainerCore(ckpts / "main" / "current", vllm_layout(tiny), root)
    train_once(resumed)
    for generation in (2, 3):  # the second sync writes over the generation this server was started from
        assert resumed.checkpoint(str(ckpts / "main"), str(ckpts))["generation"] == generation
    assert ckpt.checkpoint_info(ckpts / "main")["origin"] == str(tiny.resolve())
