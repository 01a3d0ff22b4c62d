"""PlasticityConfig: the operator's switches, read from the environment in every process.

Environment variables are the one channel that reaches all of vLLM's processes (API server, engine
core, workers) without patching vLLM's argument parser; `plasticity serve` sets them from its flags, and
people who launch `vllm serve` themselves set them directly (see README). Imports no vLLM.

    >>> cfg = process_config()              # PlasticityConfig.from_env(), once per process
    >>> cfg.training, cfg.state_dir
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

ENV_PREFIX = "PLASTICITY_"
# PLASTICITY_* variables read outside this module: the kill switch (register(), before any config), the
# model cache of the CLI (default_model, pretrained) and `make setup`'s choice of vLLM build.
OTHER_VARIABLES = ("DISABLE", "CACHE_DIR", "VLLM")


def _env(name: str, default: str | None = None) -> str | None:
    """The one reader of PLASTICITY_<name>; what it has read is what `from_env` knows."""
    _KNOWN.add(ENV_PREFIX + name)
    return os.environ.get(ENV_PREFIX + name, default)


_KNOWN: set[str] = {ENV_PREFIX + name for name in OTHER_VARIABLES}


def _default_state_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return Path(cache) / "plasticity" / "state"


def _flag(name: str, default: bool = False) -> bool:
    value = _env(name, "").strip().lower()
    if value == "":
        return default
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise RuntimeError(f"{ENV_PREFIX}{name}={value!r}: expected 1/0, true/false, yes/no or on/off")


def _path(name: str) -> Path | None:
    value = _env(name)
    return Path(value).expanduser().resolve() if value else None


def _count(name: str, default: int) -> int:
    value = _env(name)
    if value is None or value == "":
        return default
    if not value.strip().isdigit() or int(value) < 1:
        raise RuntimeError(f"{ENV_PREFIX}{name}={value!r}: expected a whole number >= 1")
    return int(value)


def _choice(name: str, choices: tuple[str, ...]) -> str:
    """One of `choices` (the first when unset)."""
    value = _env(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise RuntimeError(f"{ENV_PREFIX}{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def _seconds(name: str, default: float) -> float:
    value = _env(name)
    if value is None or value == "":
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise RuntimeError(f"{ENV_PREFIX}{name}={value!r}: expected a number of seconds >= 0")
    return seconds


@dataclasses.dataclass(frozen=True)
class TrainLimits:
    """What one /train request may ask for; larger requests are refused with 4xx before they are queued.
    The defaults keep a job's memory and time bounded on a small machine; raise them for a big GPU."""

    max_steps: int = 1000  # PLASTICITY_TRAIN_MAX_STEPS: optimizer steps per request
    max_samples: int = 64  # PLASTICITY_TRAIN_MAX_SAMPLES: samples per request
    max_tokens: int = 8192  # PLASTICITY_TRAIN_MAX_TOKENS: context + continuation tokens, all samples together
    max_queued: int = 32  # PLASTICITY_TRAIN_MAX_QUEUED: jobs waiting at once (more: 429)

    @classmethod
    def from_env(cls) -> "TrainLimits":
        d = cls()
        return cls(max_steps=_count("TRAIN_MAX_STEPS", d.max_steps), max_samples=_count("TRAIN_MAX_SAMPLES", d.max_samples),
                   max_tokens=_count("TRAIN_MAX_TOKENS", d.max_tokens), max_queued=_count("TRAIN_MAX_QUEUED", d.max_queued))


@dataclasses.dataclass(frozen=True)
class PlasticityConfig:
    training: bool = False  # PLASTICITY_TRAINING: enables /train and /checkpoint (they change weights)
    share_weights: bool = False  # PLASTICITY_SHARE_WEIGHTS: keep weights in shareable memory (implied by training)
    state_dir: Path = dataclasses.field(default_factory=_default_state_dir)  # PLASTICITY_STATE_DIR
    checkpoint_dir: Path | None = None  # PLASTICITY_CHECKPOINT_DIR (default: <state_dir>/checkpoints)
    vectors_dir: Path | None = None  # PLASTICITY_VECTORS_DIR: enables /readout/load, paths resolved inside it
    ui: bool = True  # PLASTICITY_UI=0 turns the page (GET /plasticity/ui) off; it exists only with a vectors dir
    checkpoint_quiet_seconds: float = 600.0  # PLASTICITY_CHECKPOINT_QUIET_SECONDS: sync after this long without training
    checkpoint_into_model_dir: bool = False  # PLASTICITY_CHECKPOINT_INTO_MODEL_DIR: allow targets inside the served model's dir
    # PLASTICITY_CHECKPOINT_MAX_NAMES: checkpoints the checkpoint directory may hold (two model copies each); a
    # new name beyond it is refused (507), existing names are still written
    checkpoint_max_names: int = 16
    readout_capacity: int = 256  # PLASTICITY_READOUT_CAPACITY: concepts loaded at once, all banks together
    steer_slots: int = 32  # PLASTICITY_STEER_SLOTS: distinct steering settings in one batch
    # PLASTICITY_CPU_KERNELS, training on CPU: "repacked" (vLLM's oneDNN kernels, the layers a step wrote packed
    # again when it is published) or "in-place" (F.linear on the shared weights: every write seen at once)
    cpu_kernels: str = "repacked"
    # PLASTICITY_CAPTURE_LAYERS: layers whose raw hidden states (basis banks) are read at once; None: as many
    # as CAPTURE_BUDGET_BYTES of capture buffer holds, at least one (residual_tap.capture_slots)
    capture_layers: int | None = None
    train_limits: TrainLimits = TrainLimits()  # PLASTICITY_TRAIN_MAX_*: what one /train request may ask

    @classmethod
    def from_env(cls) -> "PlasticityConfig":
        """The configuration the environment sets; an unknown PLASTICITY_* variable (a typo would otherwise
        be ignored silently) or a bad value raises RuntimeError naming it."""
        d = cls()  # the defaults, written once above
        training = _flag("TRAINING")
        config = cls(
            training=training,
            share_weights=training or _flag("SHARE_WEIGHTS"),
            state_dir=_path("STATE_DIR") or _default_state_dir(),
            checkpoint_dir=_path("CHECKPOINT_DIR"),
            vectors_dir=_path("VECTORS_DIR"),
            ui=_flag("UI", default=d.ui),
            checkpoint_quiet_seconds=_seconds("CHECKPOINT_QUIET_SECONDS", d.checkpoint_quiet_seconds),
            checkpoint_into_model_dir=_flag("CHECKPOINT_INTO_MODEL_DIR"),
            checkpoint_max_names=_count("CHECKPOINT_MAX_NAMES", d.checkpoint_max_names),
            readout_capacity=_count("READOUT_CAPACITY", d.readout_capacity),
            steer_slots=_count("STEER_SLOTS", d.steer_slots),
            capture_layers=_count("CAPTURE_LAYERS", 0) or None,
            cpu_kernels=_choice("CPU_KERNELS", ("repacked", "in-place")),
            train_limits=TrainLimits.from_env(),
        )
        _refuse_unknown_variables()  # after every field is read: what was read is what is known
        return config

    def as_json(self) -> dict:
        """Every setting as JSON values (paths as strings): what a checkpoint records beside the weights it
        holds (plasticity_state/plasticity_config.json), so the switches a model was trained under are known."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @property
    def resolved_checkpoint_dir(self) -> Path:
        return self.checkpoint_dir or self.state_dir / "checkpoints"

    def features(self) -> dict[str, bool]:
        return {
            "training": self.training,
            "checkpoints": self.training,
            "weight_sharing": self.share_weights,
            "readout": self.vectors_dir is not None,
            "steering": self.vectors_dir is not None,
            "ui": self.vectors_dir is not None and self.ui,
        }


@functools.cache
def process_config() -> PlasticityConfig:
    """This process's configuration, read from the environment once (the environment of a process does not
    change under it; a bad variable raises here, at the first use)."""
    return PlasticityConfig.from_env()


def _refuse_unknown_variables() -> None:
    unknown = sorted(k for k in os.environ if k.startswith(ENV_PREFIX) and k not in _KNOWN)
    if unknown:
        raise RuntimeError(f"unknown variable{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: the known ones "
                           f"are {', '.join(sorted(_KNOWN))}")
