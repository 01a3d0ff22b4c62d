"""Each research experiment's --quick mode runs against a real server on the built-in model and writes its
table, plots and numbers (the findings are not checked: a quick run is a smoke run; what is checked is that it
measured something: the expected fields, finite values).

Four experiments share one server (`--server URL`); HOGWILD vs pause replays its steps on fresh weights, so it
starts its own (a restart)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO
from vllm_plasticity.launcher import ServerProcess

sys.path.insert(0, str(REPO / "research"))
from lab import QUICK_SERVER_ARGS, SERVER_ARGS, SERVER_ENV  # noqa: E402  (research/ is scripts, not a package)

pytestmark = pytest.mark.slow


def finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def check_behaviour(r):
    assert [row["n"] for row in r["rows"]] == [0, 1, 2]
    assert all(finite(row["binary"], row["logprob"], row["margin"], row["loss"], row["projection"]) for row in r["rows"])
    assert all(0 <= row["binary"] <= 1 for row in r["rows"])


def check_forgetting(r):
    (row,) = r.values()  # quick: one condition, one round
    assert row["steps"][0] == 0 and len(row["ppl"]) == len(row["fact"]) == 2
    assert finite(*row["ppl"], *row["fact"]) and all(p >= 1 for p in row["ppl"]) and all(f <= 0 for f in row["fact"])


def check_steering(r):
    assert set(r["projection"]) == {"plain", "steered", "trained, unsteered"} and finite(*r["projection"].values())
    assert finite(r["cosine"]) and -1 <= r["cosine"] <= 1 and finite(*r["losses"]) and len(r["losses"]) == 2


def check_optimizer(r):
    (row,) = r.values()  # quick: one mode
    assert 1 <= len(row["losses"]) <= 3 and finite(*row["losses"]) and row["step_ms"] > 0


def check_hogwild(r):
    mode = r["modes"]["hogwild"]
    assert mode["responses"] > 0 and len(mode["deviations"]) == mode["responses"] and finite(*mode["deviations"])
    assert 0 <= mode["torn"] <= mode["responses"] and len(r["neighbour_distances"]) == 2


# name: (plots, numbers check, shares the server)
EXPERIMENTS = {
    "behaviour_vs_examples": (["behaviour_vs_examples_binary.png"], check_behaviour, True),
    "forgetting": (["forgetting_perplexity.png", "forgetting_facts.png"], check_forgetting, True),
    "steering_vs_training": (["steering_vs_training.png"], check_steering, True),
    "optimizer_modes": (["optimizer_modes_loss.png"], check_optimizer, True),
    "hogwild_vs_pause": (["hogwild_vs_pause.png"], check_hogwild, False),
}


@pytest.fixture(scope="module")
def research_server(servers_restart, default_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("research")
    args = [*SERVER_ARGS, *QUICK_SERVER_ARGS, "--training", "--state-dir", str(work / "state"),
            "--vectors-dir", str(work / "vectors")]
    (work / "vectors").mkdir()
    return servers_restart.start("research", lambda log_path: ServerProcess.plasticity(
        default_model, extra_args=args, env=SERVER_ENV, log_path=log_path))


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_quick_run_writes_its_table_plots_and_numbers(name, servers_restart, request, tmp_path):
    plots, check, shared = EXPERIMENTS[name]
    cmd = [sys.executable, str(REPO / "research" / f"{name}.py"), "--quick", "--out-dir", str(tmp_path)]
    if shared:
        cmd += ["--server", request.getfixturevalue("research_server").url]
    else:
        servers_restart.stop()  # the experiment starts its own server (one engine at a time)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    report = (tmp_path / f"{name}.md").read_text()
    assert "Hypothesis" in report and "| --- |" in report and "Reading" in report
    for plot in plots:
        assert (tmp_path / plot).stat().st_size > 5_000
    check(json.loads((tmp_path / f"{name}.json").read_text()))
