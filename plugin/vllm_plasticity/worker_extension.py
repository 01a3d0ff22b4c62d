"""Engine-side verbs, mixed into vLLM's worker by `--worker-extension-cls` and reached from the API
server with `await engine_client.collective_rpc("plasticity_<verb>")`.

Runs in vLLM's worker process. Verbs are small and pass plain data (str, int, lists, dicts), because
collective_rpc results cross a msgpack boundary; clears are idempotent.
"""

from __future__ import annotations

import torch

from pathlib import Path

from vllm_plasticity import SERVED_ARCHITECTURES
from vllm_plasticity.config import process_config
from vllm_plasticity.readout_worker import ReadoutEngine, read_bank_files
from vllm_plasticity.residual_tap import current_buffers
from vllm_plasticity.contract.weights import export_cuda_parameters


class PlasticityWorkerExtension:
    """Methods vLLM mixes into its Worker class (so `self` is the worker)."""

    def _plasticity_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()

    def plasticity_info(self) -> dict:
        """What the worker serves: architecture, dtype, device and whether weights are shareable."""
        model = self._plasticity_model()
        param = next(model.parameters())
        arch = type(model).__name__
        registered = arch in SERVED_ARCHITECTURES
        shareable = registered and (param.device.type == "cuda" or getattr(model, "plasticity_manifest", None) is not None)
        return {
            "architecture": arch,
            "plasticity_architecture": registered,
            "dtype": str(param.dtype).removeprefix("torch."),
            "device": str(param.device),
            "weights_shareable": shareable,
            # False: vLLM's own (packed) kernels serve; True: weights are kept as tensors other processes write
            "weights_in_place": bool(getattr(model, "plasticity_in_place", False)),
            # True: linear layers multiply with packed copies, packed again when a step is published
            "repacked_after_step": bool(getattr(model, "plasticity_repacked", False)),
            # this worker's tensors: one shard at TP > 1, and packed CPU layers count 0 (the API server
            # reports the checkpoint's count instead when it can read it)
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "readout": self._plasticity_readout_limits(),
        }

    def plasticity_repack(self, trained: list[str] | None = None) -> dict:
        """Pack again the layers a published step wrote (`trained`: the trainer's parameter names; None:
        all), so the served kernels compute with the new weights; {"layers", "seconds"}. A no-op where the
        model multiplies with the weights in place."""
        model = self._plasticity_model()
        if not getattr(model, "plasticity_repacked", False):
            return {"layers": 0, "seconds": 0.0}
        from vllm_plasticity.cpu_repack import repack

        done = repack(model, trained)
        copies = model.plasticity_packed_copies() if hasattr(model, "plasticity_packed_copies") else None
        if copies:  # conv1d / MoE experts served from packed copies (packed_copies.py)
            more = copies.refresh(trained)
            done = {"layers": done["layers"] + more["layers"], "seconds": done["seconds"] + more["seconds"]}
        return done

    def plasticity_weight_manifest(self) -> dict | None:
        """The manifest a trainer maps the live weights with, or None when they are not shareable."""
        model = self._plasticity_model()
        if type(model).__name__ not in SERVED_ARCHITECTURES:
            return None
        if next(model.parameters()).device.type == "cuda":
            if not process_config().share_weights:
                return None
            return export_cuda_parameters(model).to_dict()
        manifest = getattr(model, "plasticity_manifest", None)
        return manifest.to_dict() if manifest is not None else None

    # ---- readout and steering (see readout_worker.py) ----------------------------------------------

    def _plasticity_readout_limits(self) -> dict | None:
        b = current_buffers()
        if b is None:
            return None
        return {"num_layers": b.num_layers, "hidden_size": b.hidden_size, "capacity": b.capacity,
                "capture_layers": b.capture_slots,
                "steer_slots": b.steer_rows - 1, "signals": list(b.signal_names)}

    def _plasticity_readout(self) -> ReadoutEngine:
        engine = getattr(self, "_plasticity_readout_engine", None)
        if engine is None:
            buffers = current_buffers()
            if buffers is None:
                from vllm_plasticity.contract.architectures import served_names

                raise RuntimeError(f"this model has no residual tap (serve one of {served_names()} with "
                                   "PLASTICITY_VECTORS_DIR set)")
            engine = self._plasticity_readout_engine = ReadoutEngine(buffers, self.model_runner)
        return engine

    def plasticity_readout_load(self, name: str, path: str | None = None, basis: list[int] | None = None,
                                layers: list[int] | None = None, calibrated: bool = True) -> dict:
        """Load bank `name` from a bank directory (already checked by the API server to lie inside the
        vectors directory) or, with `basis=[start, stop]`, standard basis rows at `layers`; `calibrated`
        False ignores a bank's calibration (raw scores and raw steering)."""
        engine = self._plasticity_readout()
        if basis is not None:
            return engine.load_basis(name, basis[0], basis[1], list(layers or []))
        concepts, vectors, meta = read_bank_files(Path(path))
        if not calibrated:
            meta["calibration"] = None
        if layers:
            vectors = {L: v for L, v in vectors.items() if L in set(layers)}
        return engine.load(name, concepts, vectors, source=str(path), **meta)

    def plasticity_readout_enable(self) -> bool:
        """Install the per-step bookkeeping without loading a bank (a request asking only for signals)."""
        return self._plasticity_readout() is not None

    def plasticity_readout_unload(self, name: str) -> bool:
        return self._plasticity_readout().unload(name)

    def plasticity_readout_fetch(self, key: str, final: bool = True) -> dict:
        engine = getattr(self, "_plasticity_readout_engine", None)
        return engine.fetch(key, final) if engine is not None else {}

    def plasticity_readout_stats(self) -> dict:
        """Per-step timing of the readout bookkeeping since the last call (benchmarks read it)."""
        engine = getattr(self, "_plasticity_readout_engine", None)
        return engine.take_stats() if engine is not None else {}
