"""One table lists every architecture (contract/architectures.py): each row is registered with vLLM and
transformers, its built-in model is offered by `plasticity default-model --arch` and lands in that row, the
trainer views it, and /train's filter finds its embedding tables, with nothing else to edit (DESIGN.md,
"Adding an architecture")."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from vllm_plasticity.contract.architectures import REGISTRY, load
from vllm_plasticity.contract.settings import param_kind

BUILTIN = [arch for arch in REGISTRY if arch.builtin]
REGISTERED = """
import json, vllm_plasticity
from vllm import ModelRegistry
from vllm.model_executor.models.config import MODELS_CONFIG_MAP
vllm_plasticity.register()
print(json.dumps({name: [f"{m.module_name}:{m.class_name}", getattr(MODELS_CONFIG_MAP.get(name), "__name__", None)]
                  for name, m in ModelRegistry.models.items() if hasattr(m, "module_name")}))
"""


def test_register_gives_vllm_every_row_and_the_project_rows_their_config_hook():
    env = {k: v for k, v in __import__("os").environ.items() if k != "PLASTICITY_DISABLE"}
    out = subprocess.run([sys.executable, "-c", REGISTERED], capture_output=True, text=True, check=True, env=env)
    registered = json.loads(out.stdout.strip().splitlines()[-1])
    for arch in REGISTRY:
        assert registered[arch.name][0] == arch.vllm_class
        assert (registered[arch.name][1] == "RecurrentModelConfig") == bool(arch.hf_form), arch.name


@pytest.mark.parametrize("arch", REGISTRY, ids=lambda a: a.name)
def test_each_vllm_class_is_defined_where_its_row_says(arch):
    module, _, name = arch.vllm_class.partition(":")
    tree = ast.parse(open(importlib.util.find_spec(module).origin).read())
    assert name in {node.name for node in tree.body if isinstance(node, ast.ClassDef)}


def test_transformers_knows_every_project_model_type():
    from transformers import AutoConfig

    from vllm_plasticity.architectures import register_with_transformers

    register_with_transformers()
    for arch in REGISTRY:
        if arch.hf_form:
            assert type(AutoConfig.for_model(arch.model_type)) is load(arch.hf_form).config_class


def test_default_model_offers_every_built_in(capsys):
    from plasticity_training.cli import default_model

    with pytest.raises(SystemExit):
        default_model(["--help"])
    choices = capsys.readouterr().out.split("--arch {", 1)[1].split("}", 1)[0].split(",")
    assert choices == [load(arch.builtin)().name for arch in BUILTIN]


@pytest.mark.parametrize("arch", BUILTIN, ids=lambda a: a.name)
def test_a_built_in_model_lands_in_its_row_and_the_trainer_views_it(arch, tmp_path):
    from plasticity_training.default_model import build_model
    from plasticity_training.hf_view import build_hf_view

    spec = dataclasses.replace(load(arch.builtin)(), train_steps=0)
    path = build_model(spec, tmp_path / "m", text="The door of the old house was open. " * 20, log=lambda m: None)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == arch.model_type and config["architectures"] == [arch.extends or arch.name]
    weights = load_file(str(path / "model.safetensors"))
    embeddings = [name for name in weights if param_kind(name) == "embeddings"]
    for prefix in arch.embeddings:  # each registered table is a parameter of this architecture
        assert any(name == prefix or name.startswith(prefix + ".") for name in embeddings), prefix
    if arch.hf_form:  # served under the HF form's own names: the trainer's view is built on them directly
        view = build_hf_view(path, weights)
        assert type(view) is load(arch.hf_form)
