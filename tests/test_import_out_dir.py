"""`plasticity import causal-bank --out DIR` never deletes what it did not write: a non-empty DIR that is not
a previous import is refused (unless --force), a previous import is replaced, and --force overwrites only
same-named files, says which, and keeps everything else (training/plasticity_training/output_dir.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.causal_bank_models import reference_model

pytest.importorskip("decepticons")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The reference package's own files: <name>.checkpoint.pt and its result JSON."""
    d = tmp_path_factory.mktemp("run")
    ref = reference_model({}, seed=3, max_seq_len=64)
    torch.save(ref.state_dict(), d / "run.checkpoint.pt")
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(ref.config).items()}
    (d / "run.json").write_text(json.dumps({"model": fields, "config": {"train": {"seq_len": 64}},
                                            "dataset": {"vocab_size": 256}}))
    return d / "run.checkpoint.pt"


def run_import(checkpoint, out, *flags) -> int:
    from plasticity_training.cli import main

    try:
        main(["import", "causal-bank", str(checkpoint), "--out", str(out), *flags])
    except SystemExit as exit_:
        return exit_.code
    return 0


def tree(d) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


def test_a_directory_of_other_files_is_refused_and_left_as_it_was(checkpoint, tmp_path, capsys):
    out = tmp_path / "work"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "config.json").write_text('{"mine": true}')
    assert run_import(checkpoint, out) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err and "config.json" in err and "thesis.tex" in err
    assert tree(out) == {"thesis.tex": b"years of work", "config.json": b'{"mine": true}'}


def test_a_previous_import_is_replaced_without_asking(checkpoint, tmp_path):
    out = tmp_path / "served"
    assert run_import(checkpoint, out) == 0
    first = tree(out)
    assert "model.safetensors" in first and "config.json" in first
    manifest = json.loads(first["plasticity_files.json"])
    assert sorted(manifest["files"]) == sorted(set(first) - {"plasticity_files.json"})
    (out / "model.safetensors").write_bytes(b"stale")  # the new import must replace it
    assert run_import(checkpoint, out) == 0
    assert tree(out) == first
    assert [p.name for p in tmp_path.iterdir()] == ["served"]  # no temporary or replaced directory left


def test_files_added_to_a_previous_import_are_kept_and_force_says_what_it_overwrites(checkpoint, tmp_path, capsys):
    out = tmp_path / "served"
    assert run_import(checkpoint, out) == 0
    ours = tree(out)
    (out / "notes.md").write_text("my notes")
    assert run_import(checkpoint, out) == 2  # a previous import, but with a file it did not write
    assert "notes.md" in capsys.readouterr().err and (out / "notes.md").exists()

    capsys.readouterr()
    assert run_import(checkpoint, out, "--force") == 0
    assert tree(out) == {**ours, "notes.md": b"my notes"}
    assert "keeping 1 entries" in capsys.readouterr().err

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "data").mkdir()
    (other / "data" / "corpus.txt").write_text("text")
    assert run_import(checkpoint, other, "--force") == 0
    err = capsys.readouterr().err
    assert "overwriting 1 files" in err and "config.json" in err
    assert (other / "data" / "corpus.txt").read_text() == "text"
    assert json.loads((other / "config.json").read_text())["architectures"] == ["CausalBankForCausalLM"]


def test_a_forged_manifest_cannot_make_it_delete_anything_else(checkpoint, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("outside")
    out = tmp_path / "served"
    out.mkdir()
    (out / "sub").mkdir()
    (out / "sub" / "keep.txt").write_text("inside a directory")
    (out / "link").symlink_to(victim)
    (out / "plasticity_files.json").write_text(json.dumps({"files": ["../victim.txt", "sub", "link", "/etc/passwd"]}))
    assert run_import(checkpoint, out) == 2  # the entries are not files a write made: not a previous import
    assert run_import(checkpoint, out, "--force") == 0
    assert victim.read_text() == "outside"
    assert (out / "sub" / "keep.txt").read_text() == "inside a directory" and (out / "link").is_symlink()
    assert (out / "model.safetensors").is_file()


def test_a_file_or_symlink_as_out_is_refused(checkpoint, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    (tmp_path / "l").symlink_to(tmp_path / "d")
    for name in ("f", "l"):
        assert run_import(checkpoint, tmp_path / name, "--force") == 2
        assert "is not a directory" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "x" and list((tmp_path / "d").iterdir()) == []
