"""What the hardening pass fixed, at the level where a public route cannot reach it: an optimizer step
that would leave a non-finite weight, a checkpoint of non-finite weights, checkpoints nested in another's
generation, bank files that are empty or ambiguous, shared-memory files of a dead server, and the
subspace method's default rank. (tests/test_hardening.py drives the same rules through the routes.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from plasticity_training.apollo import Apollo, NonFiniteUpdateError
from vllm_plasticity.contract.bank import BankError, load_bank, save_bank
from plasticity_training.checkpoint import CheckpointNonFiniteError, CheckpointPathError, resolve_checkpoint, sync_checkpoint


def test_a_step_that_would_make_a_weight_non_finite_changes_no_byte():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8))
    b = torch.nn.Parameter(torch.full((8,), -3.0e38))  # near float32's largest magnitude
    opt = Apollo([("w", w), ("b", b)], lr=1.0, rank=2)
    for p in (w, b):
        p.grad = torch.ones_like(p)
    opt.step()  # a first, finite step: state exists
    before = {n: p.detach().clone() for n, p in (("w", w), ("b", b))}
    state = {n: {k: v.clone() for k, v in st.items()} for n, st in opt.named_state_dict().items()}
    opt.param_groups[0]["lr"] = 1e38  # what an unbounded lr in a /train body would have reached
    for p in (w, b):
        p.grad = torch.ones_like(p)  # Adam's direction ~1: w moves to ~-1e38 (finite), b to -4e38 (overflow)
    with pytest.raises(NonFiniteUpdateError, match="'b'"):
        opt.step()
    assert torch.equal(w, before["w"]) and torch.equal(b, before["b"])
    after = opt.named_state_dict()
    assert all(torch.equal(after[n][k], state[n][k]) for n in state for k in state[n])


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def test_a_checkpoint_of_non_finite_weights_is_refused_and_keeps_the_previous(tmp_path, model_dir):
    root = tmp_path / "ckpts"
    good = {"w": torch.ones(4, 4)}
    sync_checkpoint(good, root / "main", model_dir, allowed_root=root)
    generation = resolve_checkpoint(root / "main")
    bad = {"w": torch.ones(4, 4)}
    bad["w"][1, 2] = float("nan")
    with pytest.raises(CheckpointNonFiniteError, match="NaN"):
        sync_checkpoint(bad, root / "main", model_dir, allowed_root=root)
    assert resolve_checkpoint(root / "main") == generation


def test_a_checkpoint_inside_another_or_with_an_overlong_name_is_refused(tmp_path, model_dir):
    root = tmp_path / "ckpts"
    sync_checkpoint({"w": torch.ones(2)}, root / "main", model_dir, allowed_root=root)
    for target in (root / "main" / "gen-b" / "sub", root / "main" / "gen-a", root / "main" / "x"):
        with pytest.raises(CheckpointPathError, match="inside the checkpoint"):
            sync_checkpoint({"w": torch.ones(2)}, target, model_dir, allowed_root=root)
    with pytest.raises(CheckpointPathError, match="longer than the filesystem allows"):
        sync_checkpoint({"w": torch.ones(2)}, root / ("n" * 300), model_dir, allowed_root=root)
    assert sorted(p.name for p in root.iterdir()) == ["main"]


def test_empty_banks_and_duplicate_concepts_are_refused(tmp_path):
    path = save_bank(tmp_path / "b", ["a", "b"], {1: torch.randn(2, 8)}, model="m", method="t")
    manifest = json.loads((path / "readout.json").read_text())
    for concepts, layers, reason in ((["a", "a"], [1], "duplicate"), ([], [1], "empty"), (["a", "b"], [], "empty")):
        (path / "readout.json").write_text(json.dumps({**manifest, "concepts": concepts, "layers": layers}))
        with pytest.raises(BankError, match=reason):
            load_bank(path)


def test_shm_files_of_a_dead_server_are_removed_and_live_ones_kept(tmp_path):
    from vllm_plasticity.shm_ledger import record_shm_files, sweep_dead_servers
    from vllm_plasticity.contract.weights import SHM_DIR

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    left, held = SHM_DIR / f"psm_test_left_{os.getpid()}", SHM_DIR / f"psm_test_held_{os.getpid()}"
    left.write_bytes(b"x")
    held.write_bytes(b"x")
    with open(held, "rb"):  # a live process (this one) holds it: never removed
        (tmp_path / f"shm-{dead_pid}.json").write_text(json.dumps({"pid": dead_pid, "files": [left.name, held.name]}))
        mine = record_shm_files(tmp_path, os.getpid())  # a live server's ledger: left alone
        assert held.name in json.loads(mine.read_text())["files"]
        removed = sweep_dead_servers(tmp_path)
        # The dead server's ledger stays while a file it lists exists (held here), listing only that file.
        dead_ledger = tmp_path / f"shm-{dead_pid}.json"
        assert json.loads(dead_ledger.read_text())["files"] == [held.name]
    try:
        assert removed == [left] and not left.exists() and held.exists()
        assert sweep_dead_servers(tmp_path) == [held]  # no longer held: removed at the next start, with the ledger
        assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name]
    finally:
        left.unlink(missing_ok=True)
        held.unlink(missing_ok=True)


@pytest.mark.slow  # extracts the whole corpus (~1-2 min on 2 cores)
def test_subspace_extraction_works_with_its_defaults_on_texts_longer_than_hidden(default_model, tmp_path):
    from plasticity_training.extract import ExtractOptions, run

    logs = []
    out = run(ExtractOptions(out=str(tmp_path / "bank"), model=str(default_model), method="subspace", progress=False),
              log=logs.append)
    bank = load_bank(out)
    assert len(bank.concepts) > 100 and bank.extraction["subspace_rank"] == 32  # hidden 128 / 4
    assert any("subspace rank 32 (auto" in line for line in logs)
