"""vLLM's config hook for the project's recurrent architectures (registered in MODELS_CONFIG_MAP by
`vllm_plasticity.register`, which runs in every vLLM process, so this module stays light).

Prefix caching is turned off: a cached block would need the recurrent state at the block's boundary, which
RecurrentStateLayer does not save (vLLM's "align" mode would, at a cost per block). Each request gets one
state block as long as the context (`mamba_block_size` = max_model_len), as vLLM does for Mamba.
"""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

logger = init_logger(__name__)


class RecurrentModelConfig(VerifyAndUpdateConfig):
    """vLLM's config hook for the project's recurrent architectures."""

    @classmethod
    def verify_and_update_config(cls, vllm_config: VllmConfig) -> None:
        cache, model = vllm_config.cache_config, vllm_config.model_config
        if cache.enable_prefix_caching:
            logger.info("prefix caching is off for %s: its per-request state is not saved per block",
                        model.architecture)
            cache.enable_prefix_caching = False
        cache.mamba_cache_mode = "none"
        if cache.mamba_block_size is None:
            cache.mamba_block_size = model.max_model_len
