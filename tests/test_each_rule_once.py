"""Issue #31 item 4, "each rule once", without a vLLM server: the step limit, the operator's defaults, the
temporary-file name of every atomic write, and the process config saved with every checkpoint; and
(item 6) a refusal to train that names every architecture the server could train.
(APOLLO's defaults and bounds: tests/test_apollo.py, test_defaults_and_bounds_are_the_settings_models.)"""

from __future__ import annotations

import asyncio
import json
import os
import types

import pytest
from fastapi import HTTPException

from plasticity_training import checkpoint as ckpt
from plasticity_training.trainer_core import TrainerCore
from test_trainer_recovery import InProcessTrainer, train_once
from tiny_models import tiny, vllm_layout  # noqa: F401 (tiny is a fixture)
from vllm_plasticity.config import PlasticityConfig, TrainLimits
from vllm_plasticity.contract import files
from vllm_plasticity.training_service import TrainingService, TrainRequest

SAMPLE = {"context_ids": [5, 6, 7], "continuation_ids": [8, 9, 10]}


def service(trainer, tmp_path, **kwargs) -> TrainingService:
    engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(add_request_async=lambda *a, **k: None))
    return TrainingService(engine, trainer, vocab_size=300, max_model_len=512, checkpoint_dir=tmp_path / "ckpts",
                           **kwargs)


def test_the_step_limit_is_the_servers_alone(tmp_path):
    """PLASTICITY_TRAIN_MAX_STEPS decides, above 1000 too (the request schema had a ceiling of its own)."""
    request = TrainRequest(**SAMPLE, steps=2000)  # was: refused by the schema (le=1000) whatever the server allows
    service(None, tmp_path, limits=TrainLimits(max_steps=5000)).validate(request)
    with pytest.raises(HTTPException) as refused:
        service(None, tmp_path).validate(request)  # the default limit
    assert refused.value.status_code == 400 and "PLASTICITY_TRAIN_MAX_STEPS" in refused.value.detail


def test_the_training_services_defaults_are_the_process_configs(tmp_path):
    svc, config = service(None, tmp_path), PlasticityConfig()
    assert svc.quiet_seconds == config.checkpoint_quiet_seconds
    assert svc.allow_model_dir == config.checkpoint_into_model_dir
    assert svc.limits == config.train_limits
    assert svc.checkpoint_max_names == config.checkpoint_max_names  # was None (no limit) here, 16 in the config


def test_every_atomic_write_uses_one_temporary_name(tiny, tmp_path, monkeypatch):
    """Checkpoint files, the `current` flip, state files and banks: one temporary suffix, so a leftover of
    any killed write is recognisable as ours (and removed by the next write of that file)."""
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(os.fspath(src)), real_replace(src, dst))[1])
    core = TrainerCore(tiny, vllm_layout(tiny), tmp_path / "state")
    train_once(core)
    core.checkpoint(str(tmp_path / "ckpts" / "main"), str(tmp_path / "ckpts"))
    temporaries = [name for name in renamed if not name.endswith(".before-restore")]
    assert any(name.endswith("current" + files.TMP_SUFFIX) for name in temporaries)  # the flip
    assert any(name.endswith("model.safetensors" + files.TMP_SUFFIX) for name in temporaries)  # weights, seeding copy
    assert any(name.endswith("trainer_state.json" + files.TMP_SUFFIX) for name in temporaries)  # state files
    assert [n for n in temporaries if not n.endswith(files.TMP_SUFFIX)] == []  # was: ".plasticity-tmp" beside ".tmp"


def test_a_checkpoint_records_the_servers_process_config(tiny, tmp_path):
    config = PlasticityConfig(training=True, share_weights=True, state_dir=tmp_path / "state", checkpoint_max_names=3)
    svc = service(InProcessTrainer(TrainerCore(tiny, vllm_layout(tiny), tmp_path / "state")), tmp_path,
                  process_config=config.as_json())
    svc.weight_version = 0
    asyncio.run(svc.checkpoint())
    saved = json.loads(ckpt.load_checkpoint_state(tmp_path / "ckpts" / "main")["plasticity_config.json"])
    assert saved == config.as_json()
    assert saved["training"] is True and saved["checkpoint_max_names"] == 3 and saved["state_dir"] == str(tmp_path / "state")
    assert saved["train_limits"]["max_steps"] == config.train_limits.max_steps


def test_a_training_refusal_names_the_projects_own_architectures_too():
    """Item 6: a server that cannot train its model says which architectures it can train, from the
    architecture table (the message listed Llama/Qwen2/Qwen3 and the causal bank only)."""
    from argparse import Namespace

    from vllm_plasticity.contract.architectures import REGISTRY
    from vllm_plasticity.endpoints import ServerState

    state = ServerState(None, Namespace(model="gpt2", tensor_parallel_size=1), PlasticityConfig(training=True))
    state.worker_info = {"architecture": "GPT2LMHeadModel"}
    state._start_training()
    assert state.training is None and "GPT2LMHeadModel does not share them" in state.training_unavailable
    for arch in REGISTRY:
        assert (arch.extends or arch.name) in state.training_unavailable
    assert "TKCForCausalLM" in state.training_unavailable and "SyntheForCausalLM" in state.training_unavailable
