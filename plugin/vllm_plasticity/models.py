"""The registered architectures: vLLM's Llama, Qwen2 and Qwen3, whose weights can stay real, shareable
tensors, and whose decoder layers can be tapped for readout and steering.

Runs in vLLM's worker process (loaded by "module:Class" string from `register()`).

Stock vLLM on CPU repacks every linear weight for oneDNN after loading and drops `layer.weight` (shape
[0]); `lm_head` keeps its tensor but multiplies with a packed copy. Either way a write to the weight
tensor from another process changes nothing. These subclasses keep vLLM's signatures, parameter names
and `packed_modules_mapping` (the trainer's view builder relies on them). Only when weights are shared
(PLASTICITY_TRAINING or PLASTICITY_SHARE_WEIGHTS) do they keep every weight in place (weights_in_place.py:
linear layers and the lm_head multiply with `F.linear` on their own weight), because the packed kernels are
faster (a 105M-parameter Llama on 2 cores, research/serving_results.md: 0.67 of stock with every layer kept
in place, 0.95 with vLLM's packed kernels, 1.01 on a training server that packs them again after each step);
except on a CPU training server where vLLM would use oneDNN (PLASTICITY_CPU_KERNELS=repacked, the
default): there the linear layers and lm_head keep their weight *and* a oneDNN handle of their own,
packed again after each published step (cpu_repack.py);
and, when PLASTICITY_SHARE_WEIGHTS (or PLASTICITY_TRAINING) is set, `load_weights` moves the loaded
weights into a shared-memory arena on CPU (see contract/weights.py). On CUDA weights are left where they
are and exported as IPC handles by the worker extension.

When PLASTICITY_VECTORS_DIR is set, every decoder layer is also tapped (residual_tap.py): one custom op
after the layer reads and steers the residual stream for readout and steering.

Outputs equal the stock classes' (tests/test_foundation.py checks prompt_logprobs within 1e-5 in fp32,
on the tests' tapped server).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.qwen3_next import Qwen3NextForCausalLM
from vllm.platforms import current_platform

from vllm_plasticity.vllm_patches import qwen3_5_importable

qwen3_5_importable()  # before vLLM's qwen3_5 module is imported (vllm_patches.py says why)
from vllm.model_executor.models.qwen3_5 import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM  # noqa: E402
from vllm.model_executor.models.utils import WeightsMapper  # noqa: E402

from vllm_plasticity.config import process_config
from vllm_plasticity.cpu_repack import use_repacked_kernels
from vllm_plasticity.packed_copies import PackedCopies, may_pack_a_copy
from vllm_plasticity.residual_tap import install_buffers_for, tap_layers, tapped_layer_class
from vllm_plasticity.weights_in_place import keep_weights_in_place
from vllm_plasticity.contract.weights import WeightManifest, share_cpu_parameters


class SharedWeightsMixin:
    """Mixed in front of a vLLM causal LM: weights stay in place and, if enabled, become shareable;
    when banks can be loaded (PLASTICITY_VECTORS_DIR), every decoder layer taps the residual stream."""

    plasticity_manifest: WeightManifest | None = None
    plasticity_in_place = False
    plasticity_repacked = False  # linear layers multiply with oneDNN handles packed again after each step
    plasticity_tapped_layer_arg: dict = {}  # the constructor's own layer-type argument, where it has one
    plasticity_shared_views: dict | None = None  # CPU sharing: {vLLM name: its arena view} as loaded
    _plasticity_packed_copies: PackedCopies | None = None

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        config = process_config()
        tap = config.vectors_dir is not None
        super().__init__(vllm_config=vllm_config, prefix=prefix, **(self.plasticity_tapped_layer_arg if tap else {}))
        self.plasticity_in_place = config.share_weights  # readout and steering need no in-place weights
        if config.training and config.cpu_kernels == "repacked" and current_platform.is_cpu():
            # before keep_weights_in_place: the lm_head must still carry vLLM's own method to be replaced
            self.plasticity_repacked = use_repacked_kernels(self)
        if self.plasticity_in_place:
            keep_weights_in_place(self)
        if tap:
            tap_layers(self.model.layers)
            hf_config = vllm_config.model_config.hf_config.get_text_config()
            install_buffers_for(vllm_config, hf_config.num_hidden_layers, hf_config.hidden_size,
                                config.readout_capacity, config.steer_slots, capture_layers=config.capture_layers)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        if process_config().share_weights and current_platform.is_cpu():
            self.plasticity_manifest = share_cpu_parameters(self)
            # kept before vLLM's process_weights_after_loading may serve some of them from packed copies
            self.plasticity_shared_views = {name: p.data for name, p in self.named_parameters()}
            if any(may_pack_a_copy(m) for m in self.modules()):
                self.plasticity_repacked = True  # each published step goes through `plasticity_repack`
        return loaded

    def plasticity_packed_copies(self) -> PackedCopies | None:
        """The weights served from packed copies (found once, after loading), or None without sharing."""
        if self._plasticity_packed_copies is None and self.plasticity_shared_views is not None:
            self._plasticity_packed_copies = PackedCopies(self, self.plasticity_shared_views)
        return self._plasticity_packed_copies


class PlasticityLlamaForCausalLM(SharedWeightsMixin, LlamaForCausalLM):
    plasticity_tapped_layer_arg = {"layer_type": tapped_layer_class(LlamaDecoderLayer)}


class PlasticityQwen2ForCausalLM(SharedWeightsMixin, Qwen2ForCausalLM):
    pass


class PlasticityQwen3ForCausalLM(SharedWeightsMixin, Qwen3ForCausalLM):
    pass


class PlasticityQwen3NextForCausalLM(SharedWeightsMixin, Qwen3NextForCausalLM):
    """Gated DeltaNet + attention hybrid with MoE. On CPU vLLM serves its conv1d (AVX512-BF16) and its
    experts from packed copies; with sharing on they are packed again after each step (packed_copies.py)."""


class PlasticityQwen3_5ForCausalLM(SharedWeightsMixin, Qwen3_5ForCausalLM):
    """Qwen 3.5 (dense): Gated DeltaNet + gated attention, as Qwen3-Next without experts. vLLM fuses the
    checkpoint's in_proj_qkv + in_proj_z into in_proj_qkvz and in_proj_b + in_proj_a into in_proj_ba (row
    blocks in that order; hf_view.py views them back)."""


class PlasticityQwen3_5MoeForCausalLM(SharedWeightsMixin, Qwen3_5MoeForCausalLM):
    """Qwen 3.5 with mixture-of-experts MLPs (the 35B-A3B .. 397B-A17B releases' language model): Qwen 3.5's
    GDN and attention layers with Qwen3-Next's experts (packed copies on CPU, packed again per step)."""


class PlasticityQwen3_5ForConditionalGeneration(PlasticityQwen3_5ForCausalLM):
    """The language model of a Qwen 3.5 image-text release (`Qwen3_5ForConditionalGeneration`, how Qwen 3.5
    is published), served text only: vLLM's text class already reads `model.language_model.*` as `model.*`
    and drops the multi-token-prediction head; the vision tower's tensors are skipped here too. They stay in
    the release's files, and trainer checkpoints carry them over (plasticity_training/checkpoint_form.py)."""

    hf_to_vllm_mapper = Qwen3_5ForCausalLM.hf_to_vllm_mapper | WeightsMapper(orig_to_new_prefix={"model.visual.": None})


class PlasticityQwen3_5MoeForConditionalGeneration(PlasticityQwen3_5MoeForCausalLM):
    """The language model of a Qwen 3.5 MoE image-text release (`Qwen3_5MoeForConditionalGeneration`), served
    text only as PlasticityQwen3_5ForConditionalGeneration serves the dense one."""

    hf_to_vllm_mapper = PlasticityQwen3_5ForConditionalGeneration.hf_to_vllm_mapper
