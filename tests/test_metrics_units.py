"""The plugin's Prometheus series (plugin/vllm_plasticity/metrics.py) without a server: one API server
process, and several writing to Prometheus' multiprocess directory the way `vllm serve --api-server-count N`
runs them, read back through vLLM's own registry. Each case runs in fresh Python processes, because
prometheus_client picks its storage (memory or PROMETHEUS_MULTIPROC_DIR files) when it is imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

import vllm_plasticity

# The children import the plugin this test process imports.
PLUGIN_ROOT = Path(vllm_plasticity.__file__).resolve().parent.parent


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGIN_ROOT), os.environ.get("PYTHONPATH", "")]),
                   **env}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environment, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def samples(text: str) -> list[tuple[str, dict, float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("plasticity:")]


def value(found: list[tuple[str, dict, float]], name: str, **labels: str) -> float:
    matches = [v for n, l, v in found if n == name and all(l.get(k) == x for k, x in labels.items())]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


API_SERVER = """
    from vllm_plasticity import metrics
    metrics.install("m")
    metrics.train_step(seconds=0.02, loss={loss}, tokens=5)
    metrics.job_ended("succeeded")
    metrics.weight_version({version})
    metrics.checkpoint_written(0.1, 1000)
    metrics.completion_request(readout=True, steered=True)
    metrics.banks_changed({{"a": {{"columns": [0, {columns}]}}, "dims": {{"coordinates": [0, 8]}}}}, {{"capacity": 256}})
    metrics.trainer_restarted()
"""


def test_several_api_server_processes_add_up_and_each_gauge_shows_one_value(tmp_path):
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    # Two API server processes, one after the other: the second holds the most recent gauge values.
    run_python(API_SERVER.format(loss=2.5, version=7, columns=3), PROMETHEUS_MULTIPROC_DIR=str(multiproc))
    run_python(API_SERVER.format(loss=1.5, version=5, columns=4), PROMETHEUS_MULTIPROC_DIR=str(multiproc))
    scrape = run_python("""
        from prometheus_client import generate_latest
        from vllm.v1.metrics.prometheus import get_prometheus_registry
        print(generate_latest(get_prometheus_registry()).decode())
    """, PROMETHEUS_MULTIPROC_DIR=str(multiproc)).stdout
    found = samples(scrape)
    assert not [s for s in found if "pid" in s[1]], "a gauge without a multiprocess mode shows one series per pid"
    assert value(found, "plasticity:train_jobs_total", outcome="succeeded", model_name="m") == 2
    assert value(found, "plasticity:train_jobs_total", outcome="refused") == 0
    assert value(found, "plasticity:train_steps_total") == 2
    assert value(found, "plasticity:train_tokens_total") == 10
    assert value(found, "plasticity:train_step_duration_seconds_count") == 2
    assert value(found, "plasticity:train_last_loss") == 1.5  # the most recent
    assert value(found, "plasticity:weight_version") == 7  # the highest: versions only move forward
    assert value(found, "plasticity:checkpoint_bytes_written_total") == 2000
    assert value(found, "plasticity:checkpoint_duration_seconds_count") == 2
    assert value(found, "plasticity:checkpoint_last_timestamp_seconds") > 1.7e9
    assert value(found, "plasticity:readout_requests_total") == 2
    assert value(found, "plasticity:steered_requests_total") == 2
    assert value(found, "plasticity:readout_banks_loaded") == 2
    assert value(found, "plasticity:readout_capacity_used") == 4  # the basis bank holds no columns
    assert value(found, "plasticity:readout_capacity") == 256
    assert value(found, "plasticity:trainer_restarts_total") == 2


def test_metrics_do_nothing_before_install_and_an_error_is_logged_once_never_raised():
    done = run_python("""
        from prometheus_client import REGISTRY, generate_latest
        from vllm_plasticity import metrics
        metrics.job_ended("succeeded")            # before install: nothing, no error
        metrics.install("m")
        metrics.install("m")                      # idempotent
        metrics.train_step(seconds="not a number", loss=None, tokens=1)
        metrics.job_ended("no such outcome")
        metrics.job_ended("cancelled")
        print(generate_latest(REGISTRY).decode())
    """)
    found = samples(done.stdout)
    assert value(found, "plasticity:train_jobs_total", outcome="succeeded") == 0
    assert value(found, "plasticity:train_jobs_total", outcome="cancelled") == 1
    assert value(found, "plasticity:checkpoint_last_timestamp_seconds") == 0
    assert done.stderr.count("plasticity metrics:") == 1, done.stderr
