"""research/gpu_check.py runs end to end here with --smoke (a tiny fp32 Llama and a tiny bf16 Qwen 3.5 on
CPU): every check it can run on CPU passes, the CUDA-only ones say they did not run and why, and the report
is written. The GPU figures themselves come only from a GPU run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_and_says_what_it_could_not_run(servers_restart, tmp_path):
    servers_restart.stop()  # the check starts its own servers, one at a time
    out_file = tmp_path / "gpu.md"
    run = subprocess.run([sys.executable, str(REPO / "research" / "gpu_check.py"), "--smoke", "--out", str(out_file)],
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1] for line in out_file.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| check") and not line.startswith("| ---")}
    assert rows.pop("CUDA IPC weight sharing") == "not run"
    assert rows.pop("built-in model (fp32): readout + steering vs Hugging Face") == "not run"
    for check in ("logits: plugin architecture vs stock vLLM", "readout + steering vs Hugging Face",
                  "extraction through the server vs Hugging Face in-process", "/train step",
                  "/train in place: the server serves the trained weights", "Qwen 3.5: weights shared in place",
                  "Qwen 3.5: served vs Hugging Face on the live weights",
                  "Qwen 3.5: readout + steering at a GDN layer vs Hugging Face", "Qwen 3.5: /train step",
                  "Qwen 3.5: the server serves the trained weights"):
        assert rows.pop(check) == "pass", check
    for check in ("throughput: plugin (--training --vectors-dir, idle) vs stock", "throughput: readout 1 layer vs idle",
                  "throughput: steer 1 layer vs idle", "throughput: readout every layer vs idle", "publishing a step",
                  "/checkpoint: the first, then after a one-layer step", "stock vLLM serves the model", "build the model",
                  "Qwen 3.5: build the model", "Qwen 3.5: throughput (--training --vectors-dir, idle)"):
        assert rows.pop(check) == "measured", check
    assert not rows, f"unexpected rows (a phase failed?): {rows}"
    assert "--smoke: the script on a tiny model, not a GPU result" in out_file.read_text()
