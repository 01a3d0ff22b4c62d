"""A bank's readout.json is read by one rule (issue "Hardening, round 2", item 6): a regular file only,
never waited on (a FIFO is refused at once), and of the documented shape: concepts a list of distinct
non-empty strings (a JSON object's keys or a string's letters are not concepts), layers a list of layer
indices, hidden_size a positive integer. The listing of a vectors directory shows the refused ones with
the reason and keeps listing the others."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from vllm_plasticity.contract.bank import BankError, load_bank, read_manifest, save_bank


@pytest.fixture
def bank(tmp_path):
    return save_bank(tmp_path / "good", ["a", "b"], {1: torch.randn(2, 8)}, model="m", method="t")


def with_manifest(bank, **fields):
    manifest = json.loads((bank / "readout.json").read_text())
    (bank / "readout.json").write_text(json.dumps({**manifest, **fields}))
    return bank


@pytest.mark.parametrize("fields, reason", [
    ({"concepts": {"a": 1, "b": 2}}, "concepts must be a list of non-empty strings"),
    ({"concepts": "ab"}, "concepts must be a list of non-empty strings"),
    ({"concepts": 5}, "concepts must be a list of non-empty strings"),
    ({"concepts": ["a", 2]}, "concepts must be a list of non-empty strings"),
    ({"layers": ["1"]}, "layers must be a list of layer indices"),
    ({"layers": [True]}, "layers must be a list of layer indices"),
    ({"layers": [1, 1]}, "duplicate layers"),
    ({"layers": 1}, "layers must be a list of layer indices"),
    ({"hidden_size": "8"}, "hidden_size must be a positive integer"),
])
def test_a_manifest_of_the_wrong_shape_is_refused_naming_the_field(bank, fields, reason):
    with_manifest(bank, **fields)
    for read in (read_manifest, load_bank):
        with pytest.raises(BankError, match=reason):
            read(bank)


def test_a_manifest_that_is_not_a_json_object_is_refused(bank):
    for text in ("[1, 2]", '"concepts"', "5", "[" * 100_000):
        (bank / "readout.json").write_text(text)
        with pytest.raises(BankError, match="JSON"):
            read_manifest(bank)


def test_a_fifo_named_readout_json_is_refused_at_once_not_waited_on(bank):
    (bank / "readout.json").unlink()
    os.mkfifo(bank / "readout.json")
    outcome = []

    def read() -> None:
        try:
            read_manifest(bank)
        except BankError as exc:
            outcome.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    try:
        assert not reader.is_alive(), "read_manifest waited on a FIFO"
        assert "not a regular file" in outcome[0]
    finally:
        if reader.is_alive():  # let a blocked reader go: a writer opens and closes the FIFO
            os.close(os.open(bank / "readout.json", os.O_WRONLY | os.O_NONBLOCK))
    with pytest.raises(BankError, match="not a regular file"):
        load_bank(bank)


def test_the_listing_shows_refused_directories_with_the_reason_and_keeps_the_others(bank, tmp_path):
    from vllm_plasticity.readout_service import scan_vectors_dir

    with_manifest(save_bank(tmp_path / "obj", ["a"], {1: torch.randn(1, 8)}, model="m", method="t"),
                  concepts={"a": 1})
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "readout.json")
    listing = scan_vectors_dir(tmp_path)
    assert [b["path"] for b in listing["banks"]] == ["good"] and listing["banks"][0]["concepts"] == 2
    reasons = {u["path"]: u["error"] for u in listing["unreadable"]}
    assert "concepts must be a list" in reasons["obj"] and "not a regular file" in reasons["fifo"]
