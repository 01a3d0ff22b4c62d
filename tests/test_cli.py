"""`plasticity serve` command construction (pure: no vLLM started)."""

from __future__ import annotations

import json

from vllm_plasticity import WORKER_EXTENSION
from plasticity_training.cli import build_serve_command


def _model_dir(tmp_path, arch="LlamaForCausalLM"):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch]}))
    return str(tmp_path)


def test_serve_enables_plugin_on_cpu(tmp_path):
    model = _model_dir(tmp_path)
    cmd, env = build_serve_command([model, "--port", "9001", "--training", "--state-dir", str(tmp_path / "s"),
                                    "--max-num-seqs", "4"], {}, cuda=False)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == model
    assert cmd[cmd.index("--port") + 1] == "9001"
    assert json.loads(cmd[cmd.index("--hf-overrides") + 1]) == {"architectures": ["PlasticityLlamaForCausalLM"]}
    assert cmd[cmd.index("--worker-extension-cls") + 1] == WORKER_EXTENSION
    assert cmd[-2:] == ["--max-num-seqs", "4"]  # unknown args pass through to vLLM
    assert "plasticity" in env["VLLM_PLUGINS"].split(",")
    assert env["PLASTICITY_TRAINING"] == "1"
    assert env["PLASTICITY_STATE_DIR"] == str((tmp_path / "s").resolve())
    assert env["VLLM_TARGET_DEVICE"] == "cpu"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    _, env = build_serve_command([model], {"VLLM_CPU_KVCACHE_SPACE": "4"}, cuda=False)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"  # the user's own setting wins


def test_serve_with_training_on_cuda_leaves_room_for_the_trainer(tmp_path):
    cmd, _ = build_serve_command([_model_dir(tmp_path), "--training"], {}, cuda=True)
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.6"
    cmd, _ = build_serve_command([_model_dir(tmp_path), "--training", "--gpu-memory-utilization", "0.8"], {}, cuda=True)
    assert cmd.count("--gpu-memory-utilization") == 1 and cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.8"
    cmd, _ = build_serve_command([_model_dir(tmp_path)], {}, cuda=True)
    assert "--gpu-memory-utilization" not in cmd


def test_serve_on_cuda_keeps_user_settings(tmp_path):
    model = _model_dir(tmp_path, "Qwen3ForCausalLM")
    cmd, env = build_serve_command(["--model", model, "--hf-overrides", '{"rope_theta": 5}'],
                                   {"VLLM_PLUGINS": "other"}, cuda=True)
    assert json.loads(cmd[cmd.index("--hf-overrides") + 1]) == {"rope_theta": 5, "architectures": ["PlasticityQwen3ForCausalLM"]}
    assert env["VLLM_PLUGINS"].split(",")[:2] == ["other", "plasticity"]
    assert "VLLM_TARGET_DEVICE" not in env
    assert "PLASTICITY_TRAINING" not in env


def test_serve_unknown_architecture_is_served_stock(tmp_path, capsys):
    model = _model_dir(tmp_path, "GPT2LMHeadModel")
    cmd, _ = build_serve_command([model], {}, cuda=False)
    assert "--hf-overrides" not in cmd
    assert "no plasticity subclass" in capsys.readouterr().err


def test_serve_a_project_architecture_as_it_is_named(tmp_path, capsys):
    cmd, env = build_serve_command([_model_dir(tmp_path, "CausalBankForCausalLM"), "--training"], {}, cuda=False)
    assert "--hf-overrides" not in cmd  # registered under its own name: nothing to override
    assert "no plasticity subclass" not in capsys.readouterr().err
    assert env["PLASTICITY_TRAINING"] == "1"


def test_no_ui_turns_the_page_off(tmp_path):
    _, env = build_serve_command([_model_dir(tmp_path), "--vectors-dir", str(tmp_path), "--no-ui"], {}, cuda=False)
    assert env["PLASTICITY_UI"] == "0"
    _, env = build_serve_command([_model_dir(tmp_path), "--vectors-dir", str(tmp_path)], {}, cuda=False)
    assert "PLASTICITY_UI" not in env


def test_serve_help_explains_plasticity_flags(capsys):
    from plasticity_training.cli import main

    main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--training", "--state-dir", "--checkpoint-dir", "--checkpoint-quiet-seconds", "--vectors-dir", "--port"):
        assert flag in out


def test_training_with_tensor_parallelism_is_passed_to_vllm(tmp_path):
    """One trainer per shard (tests/test_train_tp.py): --training with -tp N starts vLLM as asked."""
    model = _model_dir(tmp_path)
    for tp in (["--tensor-parallel-size", "2"], ["-tp", "4"], ["--tensor-parallel-size=2"]):
        cmd, env = build_serve_command([model, "--training", *tp], {}, cuda=True)
        assert cmd[-len(tp):] == tp and env["PLASTICITY_TRAINING"] == "1"


def test_readout_on_a_gpu_selects_the_v1_model_runner(tmp_path, capsys):
    model = _model_dir(tmp_path)
    _, env = build_serve_command([model, "--vectors-dir", str(tmp_path)], {}, cuda=True)
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0" and "VLLM_USE_V2_MODEL_RUNNER=0" in capsys.readouterr().err
    _, env = build_serve_command([model, "--vectors-dir", str(tmp_path)], {"VLLM_USE_V2_MODEL_RUNNER": "1"}, cuda=True)
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "1"  # the operator's choice stands (the bank load then says why not)
    _, env = build_serve_command([model], {}, cuda=True)
    assert "VLLM_USE_V2_MODEL_RUNNER" not in env  # without readout vLLM's default runner serves


def test_default_model_backbone_is_a_tkc_setting(capsys):
    import pytest

    from plasticity_training.cli import default_model

    with pytest.raises(SystemExit) as exc:
        default_model(["--arch", "llama", "--backbone", "mamba2"])
    assert exc.value.code == 2 and "--backbone is a setting of --arch tkc" in capsys.readouterr().err


def test_several_api_server_processes_run_vllm_serves_mode_not_the_single_process_module(tmp_path):
    """vLLM's single-process server module would run one API server whatever --api-server-count says:
    N > 1 runs `vllm serve`'s own mode (vllm_plasticity.vllm_serve), the option passed through."""
    from plasticity_training.cli import VLLM_SERVER_MODULE, VLLM_SEVERAL_SERVERS_MODULE

    for flag in (["--api-server-count", "2"], ["--api-server-count=4"]):
        cmd, _ = build_serve_command([_model_dir(tmp_path), *flag], {}, cuda=False)
        assert cmd[1:3] == ["-m", VLLM_SEVERAL_SERVERS_MODULE] and cmd[-len(flag):] == flag
        assert cmd[cmd.index("--shutdown-timeout") + 1] == "120"  # vLLM's default 0 SIGKILLs them at once: no exit checkpoint
    cmd, _ = build_serve_command([_model_dir(tmp_path), "--api-server-count", "2", "--shutdown-timeout", "7"], {}, cuda=False)
    assert cmd.count("--shutdown-timeout") == 1 and cmd[-2:] == ["--shutdown-timeout", "7"]
    cmd, _ = build_serve_command([_model_dir(tmp_path), "--api-server-count", "1"], {}, cuda=False)
    assert cmd[1:3] == ["-m", VLLM_SERVER_MODULE] and cmd[-2:] == ["--api-server-count", "1"]
    assert "--shutdown-timeout" not in cmd
