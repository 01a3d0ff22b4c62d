"""Engine-side verbs, mixed into vLLM's worker by `--worker-extension-cls` and reached from the API
server with `await engine_client.collective_rpc("plasticity_<verb>")`.

Runs in vLLM's worker process. Verbs are small and pass plain data (str, int, lists, dicts), because
collective_rpc results cross a msgpack boundary; clears are idempotent.
"""

from __future__ import annotations

import torch

from vllm_plasticity import ARCHITECTURES
from vllm_plasticity.config import PlasticityConfig
from vllm_plasticity.weight_sharing import export_cuda_parameters


class PlasticityWorkerExtension:
    """Methods vLLM mixes into its Worker class (so `self` is the worker)."""

    def _plasticity_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()

    def plasticity_info(self) -> dict:
        """What the worker serves: architecture, dtype, device and whether weights are shareable."""
        model = self._plasticity_model()
        param = next(model.parameters())
        arch = type(model).__name__
        registered = arch in ARCHITECTURES.values()
        shareable = registered and (param.device.type == "cuda" or getattr(model, "plasticity_manifest", None) is not None)
        return {
            "architecture": arch,
            "plasticity_architecture": registered,
            "dtype": str(param.dtype).removeprefix("torch."),
            "device": str(param.device),
            "weights_shareable": shareable,
            "num_parameters": sum(p.numel() for p in model.parameters()),
        }

    def plasticity_weight_manifest(self) -> dict | None:
        """The manifest a trainer maps the live weights with, or None when they are not shareable."""
        model = self._plasticity_model()
        if type(model).__name__ not in ARCHITECTURES.values():
            return None
        if next(model.parameters()).device.type == "cuda":
            if not PlasticityConfig.from_env().share_weights:
                return None
            return export_cuda_parameters(model).to_dict()
        manifest = getattr(model, "plasticity_manifest", None)
        return manifest.to_dict() if manifest is not None else None
