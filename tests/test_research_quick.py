"""Each research experiment's --quick mode runs against a real server on the built-in model and writes its
table and plot (the findings are not checked: a quick run is a smoke run)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

EXPERIMENTS = {
    "behaviour_vs_examples": ["behaviour_vs_examples_binary.png"],
    "forgetting": ["forgetting_perplexity.png", "forgetting_facts.png"],
    "steering_vs_training": ["steering_vs_training.png"],
    "optimizer_modes": ["optimizer_modes_loss.png"],
    "hogwild_vs_pause": ["hogwild_vs_pause.png"],
}


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_quick_run_writes_its_table_and_plots(name, servers_restart, default_model, tmp_path):
    servers_restart.stop()  # the experiment starts its own server (one engine at a time)
    out = subprocess.run([sys.executable, str(REPO / "research" / f"{name}.py"), "--quick", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    report = (tmp_path / f"{name}.md").read_text()
    assert "Hypothesis" in report and "| --- |" in report and "Reading" in report
    for plot in EXPERIMENTS[name]:
        assert (tmp_path / plot).stat().st_size > 5_000
