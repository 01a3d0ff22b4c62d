"""The operator's switches (PLASTICITY_* variables): every flag reads the same words, and a variable the
project does not know (a typo) stops the server with the known names instead of being ignored."""

from __future__ import annotations

import pytest

from vllm_plasticity.config import PlasticityConfig


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in [k for k in os.environ if k.startswith("PLASTICITY_")]:
        monkeypatch.delenv(key)


@pytest.mark.parametrize("value, on", [("false", False), ("0", False), ("off", False), ("no", False),
                                       ("true", True), ("1", True), ("", True)])
def test_the_page_switch_reads_every_flag_word(monkeypatch, value, on):
    monkeypatch.setenv("PLASTICITY_UI", value)
    assert PlasticityConfig.from_env().ui is on


def test_an_unknown_variable_is_refused_with_the_known_names(monkeypatch):
    monkeypatch.setenv("PLASTICITY_TRAINNG", "1")
    with pytest.raises(RuntimeError, match="unknown variable PLASTICITY_TRAINNG: the known ones are .*PLASTICITY_TRAINING"):
        PlasticityConfig.from_env()


def test_variables_read_outside_the_config_are_known(monkeypatch):
    for name in ("PLASTICITY_DISABLE", "PLASTICITY_CACHE_DIR", "PLASTICITY_VLLM"):
        monkeypatch.setenv(name, "0" if name == "PLASTICITY_DISABLE" else "x")
    assert PlasticityConfig.from_env() == PlasticityConfig()


def test_unset_variables_give_the_declared_defaults():
    assert PlasticityConfig.from_env() == PlasticityConfig()
