"""Prometheus series of training, checkpoints and readout, served on vLLM's own /metrics.

Runs in the API server process. The routes' services report events through the functions below; the
series are created by `install()` when the plugin's server state starts, so the other processes that
import this package (the engine, its workers, the trainer) never create any.

vLLM (0.32, vllm/v1/metrics/prometheus.py and entrypoints/serve/instrumentator/metrics.py) serves /metrics
from prometheus_client's default registry; with several API server processes (`--api-server-count N`)
it sets PROMETHEUS_MULTIPROC_DIR before starting them and serves what every process wrote there
(Prometheus' multiprocess mode). Series made here with prometheus_client's own classes land in both:
counters and histograms add up over processes, and each gauge names how the processes' values combine
(`multiprocess_mode`), so a scrape shows one value per series, not one per pid.

Names follow vLLM's (`vllm:num_requests_running`, label `model_name`): a `plasticity:` prefix; counters
end in `_total` (prometheus_client adds it), durations are histograms in seconds.

    >>> metrics.install("my-model")                  # at server start; again: nothing happens
    >>> metrics.train_step(seconds=0.18, loss=2.7, tokens=12)
    >>> metrics.job_ended("succeeded")

Metrics are best-effort: before install() every call does nothing, and an error inside one is logged
once and never reaches the route or the job that reported the event.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable

logger = logging.getLogger(__name__)

# How a job ended (its status in /train/status), and `refused`: a /train request the server refused
# before queueing it (a limit, the queue full, token ids outside the vocabulary). `rejected` is the
# trainer's refusal of a queued job before its first step.
JOB_OUTCOMES = ("succeeded", "failed", "cancelled", "diverged", "rejected", "refused")
# A step takes milliseconds on a tiny model and seconds on a real one on CPU; a checkpoint writes a
# block-level diff (fast) or a whole model (minutes on a slow disk).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def install(model_name: str) -> None:
    """Create the series (labelled `model_name`), at zero; idempotent per process."""
    global _series
    if _series is None:
        try:
            _series = _Series(model_name)
        except Exception as exc:  # e.g. names already registered by something else: serve without them
            _log_once(exc)


def _best_effort(report: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(report)
    def call(*args: Any, **kwargs: Any) -> None:
        if _series is None:
            return
        try:
            report(*args, **kwargs)
        except Exception as exc:
            _log_once(exc)
    return call


@_best_effort
def train_step(seconds: float, loss: float | None, tokens: int) -> None:
    """One optimizer step: the trainer's time, its loss (None: nothing to train on), tokens the loss was on."""
    _series.steps.inc()
    _series.tokens.inc(tokens)
    _series.step_seconds.observe(seconds)
    if loss is not None:
        _series.last_loss.set(loss)


@_best_effort
def job_ended(outcome: str) -> None:
    """A /train request's outcome, one of JOB_OUTCOMES."""
    if outcome not in JOB_OUTCOMES:
        raise ValueError(f"job outcome {outcome!r} is not one of {JOB_OUTCOMES}")
    _series.jobs[outcome].inc()


@_best_effort
def weight_version(version: int | None) -> None:
    if version is not None:
        _series.weight_version.set(version)


@_best_effort
def checkpoint_written(seconds: float, bytes_written: int) -> None:
    _series.checkpoint_seconds.observe(seconds)
    _series.checkpoint_bytes.inc(bytes_written)
    _series.checkpoint_time.set(time.time())


@_best_effort
def checkpoint_failed() -> None:
    _series.checkpoint_failures.inc()


@_best_effort
def completion_request(readout: bool, steered: bool) -> None:
    """A completion request that asked for readout (scores or signals) and/or was steered (its own
    steering or the default)."""
    if readout:
        _series.readout_requests.inc()
    if steered:
        _series.steered_requests.inc()


@_best_effort
def banks_changed(banks: dict[str, dict], limits: dict | None) -> None:
    """The loaded banks (ReadoutService.banks) and the tap's limits (None: no tap): the readout capacity is
    columns of the read table; concept banks hold columns, basis banks none."""
    _series.banks.set(len(banks))
    _series.columns_used.set(sum(b["columns"][1] - b["columns"][0] for b in banks.values() if "columns" in b))
    if limits is not None:
        _series.columns_capacity.set(limits["capacity"])


@_best_effort
def trainer_restarted() -> None:
    _series.trainer_restarts.inc()


# ---- the series -----------------------------------------------------------------------------------

_series: _Series | None = None
_logged = False


def _log_once(exc: Exception) -> None:
    global _logged
    if not _logged:
        _logged = True
        logger.warning("plasticity metrics: %s: %s (further metrics errors are not logged; serving goes on)",
                       type(exc).__name__, exc)


class _Series:
    """Every series, bound to this server's model name."""

    def __init__(self, model_name: str) -> None:
        # Imported here: only the API server needs prometheus_client (a vLLM dependency).
        from prometheus_client import Counter, Gauge, Histogram

        label = {"model_name": model_name}

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Any:
            return Counter(name, doc, ["model_name", *extra])

        def gauge(name: str, doc: str, mode: str) -> Any:
            # "max": values that only move forward; "mostrecent": the value the last process set.
            return Gauge(name, doc, ["model_name"], multiprocess_mode=mode).labels(**label)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, ["model_name"], buckets=buckets).labels(**label)

        jobs = counter("plasticity:train_jobs", "/train requests by outcome (succeeded, failed, cancelled, "
                       "diverged, rejected by the trainer, refused before queueing).", extra=("outcome",))
        self.jobs = {outcome: jobs.labels(outcome=outcome, **label) for outcome in JOB_OUTCOMES}
        self.steps = counter("plasticity:train_steps", "Optimizer steps taken.").labels(**label)
        self.tokens = counter("plasticity:train_tokens", "Tokens the training loss was on, summed over steps.").labels(**label)
        self.last_loss = gauge("plasticity:train_last_loss", "Loss of the last optimizer step.", "mostrecent")
        self.step_seconds = histogram("plasticity:train_step_duration_seconds", "Trainer time per optimizer step "
                                      "(forward, backward, optimizer).", STEP_BUCKETS)
        self.weight_version = gauge("plasticity:weight_version", "Version of the served weights (one per step "
                                    "or rollback; never counts backwards).", "max")
        self.checkpoint_time = gauge("plasticity:checkpoint_last_timestamp_seconds", "Unix time of the last "
                                     "checkpoint written (0: none since the server started).", "max")
        self.checkpoint_seconds = histogram("plasticity:checkpoint_duration_seconds", "Time to write a checkpoint.",
                                            CHECKPOINT_BUCKETS)
        self.checkpoint_bytes = counter("plasticity:checkpoint_bytes_written", "Bytes written by checkpoints.").labels(**label)
        self.checkpoint_failures = counter("plasticity:checkpoint_failures", "Checkpoints refused or failed "
                                           "(nothing written, the previous one kept).").labels(**label)
        self.readout_requests = counter("plasticity:readout_requests", "Completion requests that asked for "
                                        "readout scores or signals.").labels(**label)
        self.steered_requests = counter("plasticity:steered_requests", "Completion requests steered (their own "
                                        "steering or the default).").labels(**label)
        self.banks = gauge("plasticity:readout_banks_loaded", "Readout banks loaded.", "mostrecent")
        self.columns_used = gauge("plasticity:readout_capacity_used", "Concepts loaded (columns of the readout "
                                  "table in use, all banks together).", "mostrecent")
        self.columns_capacity = gauge("plasticity:readout_capacity", "Concepts that can be loaded at once "
                                      "(PLASTICITY_READOUT_CAPACITY).", "mostrecent")
        self.trainer_restarts = counter("plasticity:trainer_restarts", "Trainer processes started again after "
                                        "the first (a crash, a kill).").labels(**label)
