"""The memory tasks: each sample's format is what training/plasticity_training/memory_tasks.py documents,
and research/memory_tasks.py --quick produces its table and plots through real servers (not the findings)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from plasticity_training.memory_tasks import BLANK, DELIMITER, TASKS, assoc_recall, copy_memory, induction, make, selective_copy
from tests.conftest import REPO


def test_each_task_scores_what_it_says():
    rng = random.Random(0)
    s = copy_memory(rng, delay=5, n=4)
    assert s.ids[4:9] == [BLANK] * 5 and s.ids[9] == DELIMITER and s.ids[10:] == s.ids[:4]
    assert s.scored == [10, 11, 12, 13] and s.context == s.ids[:10]
    s = assoc_recall(rng, pairs=5)
    keys, values = s.ids[0:10:2], s.ids[1:10:2]
    assert s.ids[10] == DELIMITER and s.scored == [12]
    assert s.ids[12] == values[keys.index(s.ids[11])] and len(set(keys)) == 5
    s = selective_copy(rng, length=20, n=3)
    assert s.ids[20] == DELIMITER and [t for t in s.ids[:20] if t != BLANK] == s.ids[21:] and s.scored == [21, 22, 23]
    s = induction(rng, length=12)
    a, b = s.ids[-2], s.ids[-1]
    assert s.ids[12] == DELIMITER and s.scored == [14]
    assert any(s.ids[i:i + 2] == [a, b] for i in range(11))
    for task in TASKS:
        sample = make(task, rng, 16)
        assert all(0 <= t < 16 for t in sample.ids) and sample.scored[-1] == len(sample.ids) - 1
    with pytest.raises(ValueError, match="Invalid task"):
        make("recall", rng, 4)


@pytest.mark.slow
def test_the_benchmark_writes_its_table_and_plots(servers_restart, tmp_path):
    servers_restart.stop()  # the benchmark starts its own servers, one at a time
    # Two of the five architectures (a transformer and a recurrent one): the script's path is the same for each,
    # every architecture's own serving and training is tested in its own file, and each server start here
    # costs ~40 s of the full tier's 45 minutes.
    out = subprocess.run([sys.executable, str(REPO / "research" / "memory_tasks.py"), "--quick", "--archs", "llama,synthe",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    text = (tmp_path / "memory_tasks_results.md").read_text()
    for arch in ("llama", "synthe"):
        assert f"| {arch} |" in text
    assert "| tkc |" not in text
    for name in ("memory_tasks_accuracy.png", "memory_tasks_online.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_the_synthe_investigation_writes_its_tables(tmp_path):
    """research/synthe_memory.py --quick (in-process, no server): every variant asked for is trained and
    scored, and its diagnostics say what the variant changed."""
    out = subprocess.run([sys.executable, str(REPO / "research" / "synthe_memory.py"), "--quick", "--seeds", "1",
                          "--jobs", "1", "--variants", "llama,as benchmarked,no hub + PyTorch init + no router",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = (tmp_path / "synthe_memory.md").read_text()
    for name in ("llama", "as benchmarked", "no hub + PyTorch init + no router"):
        assert f"| {name} |" in text
    results = json.loads((tmp_path / "synthe_memory.json").read_text())["results"]
    (benchmarked,), (learnable,) = results["as benchmarked"], results["no hub + PyTorch init + no router"]
    assert benchmarked["start"]["budget"][1] < 1.0 and learnable["start"]["budget"] == [1.0, 1.0]  # no router
    assert "memory_hub" in benchmarked["gradient_shares"] and "memory_hub" not in learnable["gradient_shares"]
    assert all(len(runs[0]["history"]) == 6 for runs in results.values())
    assert (tmp_path / "synthe_memory_loss.png").stat().st_size > 10_000
