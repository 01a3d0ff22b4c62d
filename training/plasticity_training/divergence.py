"""When a job's loss has diverged, and the copy that undoes a diverged job (rollback).

Runs in the trainer process (trainer_core.TrainerCore checks every step with `divergence`, and keeps a
`Rollback` per job).

The rule: a job's starting loss is its first step's loss (computed on the weights as the job found them).
A later step's loss (computed on the weights the job's own steps made) has diverged when it is not finite
or above DIVERGENCE_FACTOR x start + DIVERGENCE_MARGIN (nats; every objective's loss is >= 0). A step
whose gradients or update are not finite, after the job has stepped, counts the same way. The step that
finds it is not taken. 2.83 -> 2561 (lr 1, scale 1000) is far past the bound (6.66); a healthy job's
full-batch loss falls, and one that oscillates at a high learning rate stays under it.

Rollback: at the start of a job, a copy of every tensor the job may change (the parameters its filter
selects, and the whole optimizer state) is kept in host memory; when the job diverges, they are copied
back, so the weights and optimizer state are bitwise those of the job's start. The cost: host memory of the
trained tensors' bytes plus the optimizer state's bytes for as long as the job runs, and one copy at start.
Without `rollback: true` the copy is kept only when it needs at most ROLLBACK_MEMORY_SHARE of the host
memory available (MemAvailable); with it, a job whose copy does not fit is refused.
"""

from __future__ import annotations

import math

import torch

DIVERGENCE_FACTOR = 2.0
DIVERGENCE_MARGIN = 1.0
ROLLBACK_MEMORY_SHARE = 0.5


def divergence_bound(start_loss: float) -> float:
    return DIVERGENCE_FACTOR * start_loss + DIVERGENCE_MARGIN


def divergence(start_loss: float, loss: float, step: int) -> str | None:
    """Why the loss `loss` of the job's step `step` (1-based, > 1) has diverged, or None."""
    if not math.isfinite(loss):
        return f"loss {loss} at step {step} is not finite (it started at {start_loss:.4g})"
    if loss > divergence_bound(start_loss):
        return (f"loss {loss:.4g} at step {step} is above {DIVERGENCE_FACTOR:g} x its start {start_loss:.4g} "
                f"+ {DIVERGENCE_MARGIN:g} = {divergence_bound(start_loss):.4g}")
    return None


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class Rollback:
    """A host-memory copy of named tensors and of an optimizer's named state, to copy back later."""

    def __init__(self, params: dict[str, torch.Tensor], optimizer_state: dict[str, dict[str, torch.Tensor]]) -> None:
        self.params = {name: p.detach().to("cpu", copy=True) for name, p in params.items()}
        self.optimizer_state = {name: {k: v.detach().to("cpu", copy=True) for k, v in st.items()}
                                for name, st in optimizer_state.items()}

    @staticmethod
    def bytes_needed(params: dict[str, torch.Tensor], optimizer_bytes: int) -> int:
        return sum(p.numel() * p.element_size() for p in params.values()) + optimizer_bytes

    @staticmethod
    def fits(nbytes: int) -> tuple[bool, str]:
        """Whether a copy of `nbytes` fits the host memory budget, and the figures that say so."""
        available = available_host_bytes()
        if available is None:
            return True, f"{nbytes / 2**20:.1f} MiB (host memory unknown)"
        budget = int(available * ROLLBACK_MEMORY_SHARE)
        return nbytes <= budget, (f"{nbytes / 2**20:.1f} MiB needed, {budget / 2**20:.1f} MiB allowed "
                                  f"({ROLLBACK_MEMORY_SHARE:.0%} of {available / 2**20:.1f} MiB available)")

    @torch.no_grad()
    def restore(self, params: dict[str, torch.Tensor], optimizer) -> list[str]:
        """Copy everything back (the optimizer's state replaced whole); returns the restored names."""
        for name, saved in self.params.items():
            params[name].detach().copy_(saved)
        if optimizer is not None:
            optimizer.load_named_state_dict(self.optimizer_state)
        return list(self.params)
