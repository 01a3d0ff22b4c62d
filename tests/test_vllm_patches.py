"""Every change the plugin makes to vLLM's objects and registries is made in vllm_patches.py, and each one
refuses a missing target with how to fix it, keeps the original, does nothing more when applied twice, and
holds on the installed vLLM (real vLLM classes and functions where that needs no engine; the source-level
tripwires are tests/test_vllm_seams.py's). Scores reach the right choice: the request-id parser agrees with
the ids vLLM's own code builds. No server."""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import logging
import types
from pathlib import Path

import pytest
import torch

from vllm_plasticity import vllm_patches
from vllm_plasticity.kv_generations import KVGenerations
from vllm_plasticity.vllm_patches import (PATCHES, VllmChanged, choice_index, hook_add_request, mark_compile_hash,
                                          original, register_config_hook, retype_decoder_layers, wrap_model_forward)
from vllm_plasticity.vllm_seams import SEAMS, check

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "plugin" / "vllm_plasticity"
SEAM = {seam.name: seam for seam in SEAMS}


def engine_client(sent: list):
    async def add_request_async(request):
        sent.append(request.cache_salt)
    return types.SimpleNamespace(engine_core=types.SimpleNamespace(add_request_async=add_request_async))


def send(client, salt=None) -> None:
    asyncio.run(client.engine_core.add_request_async(types.SimpleNamespace(cache_salt=salt)))


# ---- engine core add_request_async -------------------------------------------------------------------------

def test_installing_kv_generations_twice_salts_each_request_once():
    sent = []
    client = engine_client(sent)
    vllm_send = client.engine_core.add_request_async
    first = KVGenerations.install(client)
    first.publish()
    second = KVGenerations.install(client)  # e.g. the training service set up again
    second.publish()
    send(client, "readout-7")
    assert sent == ["plasticity-w1|readout-7"]  # one wrapper: the latest generations, not both
    assert original(client.engine_core, "add_request_async") is vllm_send


def test_an_engine_client_without_the_target_is_refused_with_how_to_fix_it():
    with pytest.raises(VllmChanged, match="no `engine_core`.*vllm 0.32"):
        hook_add_request(types.SimpleNamespace(), lambda request: None)
    core = types.SimpleNamespace(add_request=None)
    with pytest.raises(VllmChanged, match="no callable `add_request_async`.*vllm_seams.py"):
        hook_add_request(types.SimpleNamespace(engine_core=core), lambda request: None)
    assert vars(core) == {"add_request": None}  # nothing was changed


def test_vllms_add_request_async_is_still_awaited_as_the_wrapper_awaits_it():
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.core_client import AsyncMPClient

    assert inspect.iscoroutinefunction(AsyncMPClient.add_request_async)
    assert list(inspect.signature(AsyncMPClient.add_request_async).parameters)[:2] == ["self", "request"]
    assert "self.engine_core" in inspect.getsource(AsyncLLM.__init__)


# ---- runner _model_forward ---------------------------------------------------------------------------------

def test_the_model_forward_wrapper_keeps_vllms_forward_and_never_stacks():
    calls = []

    class Runner:
        def _model_forward(self, x):
            calls.append(("vllm", x))
            return x + 1

    runner = Runner()
    vllm_forward = runner._model_forward
    kept = wrap_model_forward(runner, lambda x: calls.append(("first", x)) or vllm_forward(x))
    assert kept == vllm_forward
    kept_again = wrap_model_forward(runner, lambda x: calls.append(("second", x)) or kept_again(x))
    assert kept_again == vllm_forward and original(runner, "_model_forward") == vllm_forward
    assert runner._model_forward(1) == 2
    assert calls == [("second", 1), ("vllm", 1)]
    with pytest.raises(VllmChanged, match="no callable `_model_forward`"):
        wrap_model_forward(object(), lambda: None)


def test_the_v1_runners_still_have_the_wrapped_model_forward():
    for seam in PATCHES["wrap_model_forward"][1]:
        assert check(SEAM[seam], _vllm_dir()) == [], seam


# ---- decoder layers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module, name", [("qwen2", "Qwen2DecoderLayer"), ("qwen3", "Qwen3DecoderLayer"),
                                          ("qwen3_next", "Qwen3NextDecoderLayer")])
def test_vllms_decoder_layers_take_the_tapped_class_in_place_once(module, name):
    import importlib

    from vllm.model_executor.models.utils import PPMissingLayer

    from vllm_plasticity.residual_tap import ResidualTapMixin, tapped_layer_class

    vllm_class = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), name)
    layer = vllm_class.__new__(vllm_class)  # the real class, not built: the class swap needs its layout only
    torch.nn.Module.__init__(layer)
    layers = torch.nn.ModuleList([PPMissingLayer(), layer])
    assert retype_decoder_layers(layers, ResidualTapMixin, tapped_layer_class) == [(1, layer)]
    tapped = type(layer)
    assert tapped.__bases__ == (ResidualTapMixin, vllm_class)  # the original class is kept as the base
    assert retype_decoder_layers(layers, ResidualTapMixin, tapped_layer_class) == [(1, layer)]
    assert type(layer) is tapped  # applied twice: no second subclass


def test_a_layer_class_whose_layout_forbids_the_swap_is_refused_with_how_to_fix_it():
    class Mixin:
        pass

    class Slotted:  # instances without __dict__: a subclass with one cannot take them over
        __slots__ = ("x",)

    with pytest.raises(VllmChanged, match="cannot tap .*Slotted in place"):
        retype_decoder_layers([Slotted()], Mixin, lambda cls: type("T", (Mixin, cls), {}))


# ---- MODELS_CONFIG_MAP ---------------------------------------------------------------------------------------

def test_the_config_hook_is_registered_once_and_an_entry_that_is_there_is_kept():
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    class Hook(VerifyAndUpdateConfig):
        pass

    class Other(VerifyAndUpdateConfig):
        pass

    try:
        register_config_hook("PlasticityTestArch", Hook)
        register_config_hook("PlasticityTestArch", Hook)
        register_config_hook("PlasticityTestArch", Other)
        assert MODELS_CONFIG_MAP["PlasticityTestArch"] is Hook
    finally:
        MODELS_CONFIG_MAP.pop("PlasticityTestArch", None)


# ---- additional_config ----------------------------------------------------------------------------------------

def test_the_compile_hash_mark_changes_vllms_compile_hash_once():
    from vllm.config import VllmConfig

    config = VllmConfig()
    before = config.compute_hash()
    mark_compile_hash(config, "plasticity_residual_tap")
    marked = config.compute_hash()
    mark_compile_hash(config, "plasticity_residual_tap")
    assert marked != before and config.compute_hash() == marked
    assert config.additional_config == {"plasticity_residual_tap": 1}


def test_a_config_without_a_dict_to_mark_is_refused_or_warned_about(caplog):
    with pytest.raises(VllmChanged, match="no `additional_config`"):
        mark_compile_hash(types.SimpleNamespace(), "k")
    with caplog.at_level(logging.WARNING, logger="vllm_plasticity.vllm_patches"):
        mark_compile_hash(types.SimpleNamespace(additional_config=object()), "k")  # a user's SupportsHash
    assert "VLLM_DISABLE_COMPILE_CACHE=1" in caplog.text


# ---- the compile-cache key ------------------------------------------------------------------------------------

def test_a_served_model_keeps_its_compile_key_wherever_it_lies_and_a_stock_one_keeps_vllms(default_model, tmp_path):
    """A checkpoint or a copy of a model the plugin serves reuses its compiled graph (the same key); a changed
    config is another key; a stock model's key is vLLM's own (its path in it)."""
    import shutil

    from vllm.config import ModelConfig

    import vllm_plasticity

    copy, changed = tmp_path / "copy", tmp_path / "changed"
    shutil.copytree(default_model, copy)
    shutil.copytree(default_model, changed)
    config = json.loads((changed / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (changed / "config.json").write_text(json.dumps(config))
    served = {"architectures": [vllm_plasticity.ARCHITECTURES[config["architectures"][0]]]}  # as `plasticity serve`

    def key(path, **kwargs) -> str:
        return ModelConfig(model=str(path), dtype="float32", **kwargs).compute_hash()

    from vllm import ModelRegistry

    from vllm_plasticity.contract.architectures import REGISTRY

    arch = next(arch for arch in REGISTRY if arch.name == served["architectures"][0])
    ModelRegistry.register_model(arch.name, arch.vllm_class)  # as register() does, which applies the patch too
    vllm_patches.compile_key_without_local_path(vllm_plasticity.serves_itself)
    vllm_patches.compile_key_without_local_path(vllm_plasticity.serves_itself)  # applied twice: one wrapper
    from vllm.config import utils as config_utils
    assert original(config_utils, "get_hash_factors").__module__ == "vllm.config.utils"
    assert key(default_model, hf_overrides=served) == key(copy, hf_overrides=served)
    assert key(changed, hf_overrides=served) != key(copy, hf_overrides=served)
    assert key(default_model) != key(copy)  # stock: vLLM's key, the path in it


# ---- request ids ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompts, n", [(1, 1), (3, 1), (1, 3), (2, 2)])
def test_choice_index_reads_the_ids_vllms_own_code_builds(prompts, n):
    """A completion's internal ids as vLLM 0.32 makes them: `<id>-<prompt>` (openai/completion/serving.py,
    checked as text: it runs only inside a request), then the engine's real `assign_request_id` and, for
    n > 1, its real `ParentRequest.get_child_info`."""
    from vllm import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.parallel_sampling import ParentRequest

    from vllm.entrypoints.openai.completion import serving
    assert 'request_id_item = f"{request_id}-{i}"' in inspect.getsource(serving)
    labels = {}
    for prompt in range(prompts):
        request = types.SimpleNamespace(request_id=f"cmpl-9f2c-{prompt}", external_req_id=None,
                                        params=SamplingParams(n=n))
        InputProcessor.assign_request_id(request)
        if n == 1:
            labels[request.request_id] = prompt
        else:
            parent = ParentRequest(request)
            labels |= {parent.get_child_info(child)[0]: prompt * n + child for child in range(n)}
    assert {rid: choice_index(rid, n, completions=True) for rid in labels} == labels


@pytest.mark.parametrize("req_id, n, completions, choice", [
    ("cmpl-9f2c-0-1a2b3c4d", 1, True, 0),
    ("cmpl-9f2c-1-1a2b3c4d", 1, True, 1),
    ("1_cmpl-9f2c-0-1a2b3c4d", 2, True, 1),
    ("1_cmpl-9f2c-2-1a2b3c4d", 2, True, 5),
    ("chatcmpl-77aa-1a2b3c4d", 1, False, 0),
    ("2_chatcmpl-77aa-1a2b3c4d", 3, False, 2),
])
def test_choice_index(req_id, n, completions, choice):
    assert choice_index(req_id, n, completions) == choice


def test_an_id_in_another_format_is_refused_loudly():
    with pytest.raises(ValueError, match="format changed"):
        choice_index("cmpl-9f2c", 1, completions=True)


# ---- the list ---------------------------------------------------------------------------------------------------

def test_every_patch_names_seams_that_hold_and_every_replacement_is_a_patch():
    patched = {seam for _, seams in PATCHES.values() for seam in seams}
    assert patched <= set(SEAM)
    assert {s.name for s in SEAMS if s.touch == "replaces"} <= patched
    for name in PATCHES:
        assert callable(getattr(vllm_patches, name)), name
        assert any("vllm_patches.py" in SEAM[seam].used_by for seam in PATCHES[name][1]), name
    for seam in patched:
        assert check(SEAM[seam], _vllm_dir()) == [], seam


def test_no_other_plugin_file_changes_vllms_objects():
    """The changes vllm_patches.py makes are made nowhere else (a new one belongs there, with its seam)."""
    offenders = []
    for path in sorted(PLUGIN.rglob("*.py")):
        if path.name == "vllm_patches.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in (
                        "__class__", "_model_forward", "add_request_async"):
                    offenders.append(f"{path.relative_to(PLUGIN)}:{node.lineno} sets .{target.attr}")
            if isinstance(node, (ast.Name, ast.Attribute)) and "MODELS_CONFIG_MAP" in (
                    getattr(node, "id", None), getattr(node, "attr", None)):
                offenders.append(f"{path.relative_to(PLUGIN)}:{node.lineno} uses MODELS_CONFIG_MAP")
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "additional_config" and isinstance(node.ctx, ast.Store):
                offenders.append(f"{path.relative_to(PLUGIN)}:{node.lineno} writes additional_config")
    assert offenders == []


def test_design_md_lists_the_patches_as_vllm_patches_renders_them():
    design = (REPO / "DESIGN.md").read_text()
    assert vllm_patches.render_markdown() in design, (
        "DESIGN.md's list of what the plugin changes in vLLM differs from vllm_patches.render_markdown(): "
        "paste its output over the list")


def _vllm_dir() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("vllm").submodule_search_locations[0])


def test_qwen3_5_stand_in_is_transformers_own_smart_resize():
    """The stand-in for transformers' torchvision image processor module holds the PIL processor's
    `smart_resize`, which must be the same function as the one it stands in for (compared as code, since the
    torchvision module cannot be imported here), and vLLM's qwen3_5 module then imports."""
    import ast
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    from vllm_plasticity.vllm_patches import TORCHVISION_IMAGE_PROCESSOR, qwen3_5_importable

    def smart_resize_code(module: str) -> str:
        path = Path(importlib.util.find_spec(module).origin)
        tree = ast.parse(path.read_text())
        return next(ast.dump(n) for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "smart_resize")

    assert smart_resize_code(TORCHVISION_IMAGE_PROCESSOR) == smart_resize_code(
        "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    if importlib.util.find_spec("torchvision") is None:
        qwen3_5_importable()
        assert sys.modules[TORCHVISION_IMAGE_PROCESSOR].smart_resize.__module__.endswith("image_processing_pil_qwen2_vl")
    assert hasattr(importlib.import_module("vllm.model_executor.models.qwen3_5"), "Qwen3_5ForCausalLM")
