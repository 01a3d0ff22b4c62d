"""vLLM's config hook for the project's recurrent architectures (registered in MODELS_CONFIG_MAP by
`vllm_plasticity.register`, which runs in every vLLM process, so this module stays light).

It runs in the API server while vLLM builds its config, before any process builds the model, so a
configuration that cannot be served stops the server here with one clear message:
  * every field was checked for type and range when transformers read config.json (the architecture's
    config module: `from_fields`, naming the field, the value and the valid range);
  * the memory: weights in the served dtype plus per-request state for `max_num_seqs` requests must fit
    the device (footprint.py: the figure and the largest weight when they do not).

Prefix caching is turned off: a cached block would need the recurrent state at the block's boundary, which
RecurrentStateLayer does not save (vLLM's "align" mode would, at a cost per block). Each request gets one
state block as long as the context (`mamba_block_size` = max_model_len), as vLLM does for Mamba.
"""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.platforms import current_platform

logger = init_logger(__name__)


class RecurrentModelConfig(VerifyAndUpdateConfig):
    """vLLM's config hook for the project's recurrent architectures."""

    @classmethod
    def verify_and_update_config(cls, vllm_config: VllmConfig) -> None:
        cache, model = vllm_config.cache_config, vllm_config.model_config
        require_memory(vllm_config)
        if cache.enable_prefix_caching:
            logger.info("prefix caching is off for %s: its per-request state is not saved per block",
                        model.architecture)
            cache.enable_prefix_caching = False
        cache.mamba_cache_mode = "none"
        if cache.mamba_block_size is None:
            cache.mamba_block_size = model.max_model_len


def require_memory(vllm_config: VllmConfig) -> None:
    """ConfigTooLarge (a ValueError: vLLM stops with its message) when the served model's weights and the
    state of max_num_seqs requests exceed the device: on a GPU, vLLM's share of it
    (--gpu-memory-utilization); on CPU, the memory of the NUMA node vLLM reads."""
    from vllm_plasticity.architectures.footprint import require_fits, size

    model = vllm_config.model_config
    try:
        total = current_platform.get_device_total_memory()
    except Exception as exc:  # a platform without the query: vLLM's own profiling is the check there
        logger.info("no device memory figure (%s): the configuration's size is not checked before loading", exc)
        return
    where = "the CPU memory vLLM counts (NUMA node 0)"
    if not current_platform.is_cpu():
        total = int(total * vllm_config.cache_config.gpu_memory_utilization)
        where = f"the device's share for vLLM (--gpu-memory-utilization {vllm_config.cache_config.gpu_memory_utilization})"
    need = require_fits(model.hf_config.shape, model.dtype, vllm_config.scheduler_config.max_num_seqs, total, where)
    logger.info("%s: weights %s, per-request state %s (x %d sequences); %s: %s", model.architecture,
                size(need.weight_bytes), size(need.state_bytes_per_request), need.sequences, where, size(total))
