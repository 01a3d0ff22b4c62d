"""Readout and steering as the API server sees them: the loaded banks, the default steering, and each
completion request's plan (its settings checked, tagged, and its prefix cache salted).

Runs in the API server process; talks to the worker (readout_worker.py) through ServerState.rpc. The
routes and the completion wrappers that use it are in readout_routes.py.

Prefix cache: KV computed without steering must never serve a steered request (and the reverse), and a
readout request needs every prompt token computed to score it. Steered requests get a cache salt
derived from their settings and the banks' digests (requests steered alike still share cache); readout
requests get a salt of their own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from vllm_plasticity.contract.bank import (BANK_FILES, CALIBRATION_KEY, MANIFEST_FILE, VECTORS_FILE, BankError,
                                           capacity_message, free_columns, load_bank, read_manifest)
from vllm_plasticity import metrics
from vllm_plasticity.contract.files import is_inside
from vllm_plasticity.steer_spec import SteeringError, check_steer, check_steer_size

READOUT_FIELDS = ("readout", "signals", "steer", "steer_layers", "steer_units")
# Every name a completion request may set for the plugin (the reserved one too: it is refused by name).
PLASTICITY_FIELDS = (*READOUT_FIELDS, "readout_encoding", "plasticity_key")
BANK_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class LoadBankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=BANK_NAME)
    path: str | None = Field(default=None, min_length=1)
    basis: list[int] | None = Field(default=None, min_length=2, max_length=2)
    layers: list[int] | None = Field(default=None, min_length=1)
    # False: ignore a calibrated bank's centre and scales (raw dot products, raw steering coefficients)
    calibrated: bool = True


class DefaultSteering(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Any JSON list/object: check_steer is the one rule for what a term may be (no bool for a number).
    steer: list[Any] | dict[str, Any]
    steer_layers: list[Any] | None = None
    steer_units: Any = None  # "natural" | "raw" | None (steer_spec: natural for calibrated banks)


def flat_steer(steer: Any) -> Any:
    """Accept {"bank/concept": coef} too (JSON bodies); vllm_xargs can only carry the flat list."""
    if isinstance(steer, dict):
        return [x for target, coef in steer.items() for x in (target, coef)]
    return steer


def scan_vectors_dir(vectors_dir: Path) -> dict:
    """Bank directories in the vectors directory (up to two levels down) that a load could name, read from
    their manifests only (the vectors stay on disk). A directory a load would refuse for its manifest, a
    missing vectors file or files outside the vectors directory is listed under `unreadable` with the
    reason; the others still list. Blocking file I/O: the route runs it in a thread, and read_manifest
    reads regular files only (a FIFO named readout.json is refused, not waited on)."""
    root = vectors_dir.resolve()
    banks, unreadable = [], []
    for manifest in sorted([*root.glob(f"*/{MANIFEST_FILE}"), *root.glob(f"*/*/{MANIFEST_FILE}")]):
        bank_dir = manifest.parent
        path = str(bank_dir.relative_to(root))
        try:
            if not all(is_inside((bank_dir / n).resolve(), root) for n in BANK_FILES):
                raise BankError("its files resolve outside the vectors directory")
            meta = read_manifest(bank_dir)
            if not (bank_dir / VECTORS_FILE).is_file():
                raise BankError(f"{bank_dir / VECTORS_FILE}: missing or not a regular file")
        except (OSError, ValueError) as exc:  # BankError is a ValueError
            unreadable.append({"path": path, "error": str(exc)})
            continue
        banks.append({"path": path, "concepts": len(meta["concepts"]), "layers": meta["layers"],
                      "model": meta["model"], "method": meta["method"], "calibrated": CALIBRATION_KEY in meta})
    return {"vectors_dir": str(root), "banks": banks, "unreadable": unreadable}


class ReadoutService:
    """The API server's view of the loaded banks and the default steering; talks to the worker."""

    def __init__(self, state: Any) -> None:
        self.state = state  # endpoints.ServerState: config, rpc, worker_info
        self.limits: dict | None = state.worker_info.get("readout")
        self.banks: dict[str, dict] = {}
        self._default_steer: dict | None = None
        self.enabled = False  # the worker's bookkeeping is installed (by a bank load, or by enable())
        metrics.banks_changed(self.banks, self.limits)

    @property
    def default_steer(self) -> dict | None:
        """Steering for completion requests that set none (POST /steering/default), with its checked terms."""
        return self._default_steer

    @default_steer.setter
    def default_steer(self, value: dict | None) -> None:
        self._default_steer = value
        # Other API server processes send every completion request here while one is set (api_processes.py).
        self.state.processes.words.default_steering = value is not None

    # ---- banks -------------------------------------------------------------------------------------

    def require_enabled(self) -> None:
        if self.state.config.vectors_dir is None:
            raise HTTPException(403, "readout and steering are off on this server: start it with "
                                     "`plasticity serve --vectors-dir DIR` (or PLASTICITY_VECTORS_DIR=DIR)")
        if self.limits is None:
            from vllm_plasticity.contract.architectures import served_names

            raise HTTPException(503, f"the served model has no residual tap (serve one of {served_names()} "
                                     "through plasticity serve)")

    def bank_dir(self, path: str) -> Path:
        """`path` (relative to the vectors directory, or absolute) resolved; 400 unless it and every file
        a bank is read from (symlinks followed) lie inside the vectors directory."""
        root = self.state.config.vectors_dir.resolve()
        try:
            target = (root / path).resolve()
            if not is_inside(target, root, allow_root=True):
                raise HTTPException(400, f"path {path!r} is outside the vectors directory {root}")
            if not target.is_dir():
                raise HTTPException(400, f"path {path!r}: no such bank directory inside {root}")
            for name in BANK_FILES:
                file = (target / name).resolve()
                if not is_inside(file, root):
                    raise HTTPException(400, f"{path}/{name} resolves to {file}, outside the vectors directory {root}")
        except (OSError, ValueError) as exc:  # a name longer than the filesystem allows, a NUL byte
            raise HTTPException(400, f"path {path[:80]!r}: {getattr(exc, 'strerror', None) or exc}") from None
        return target

    async def load(self, req: LoadBankRequest) -> dict:
        self.require_enabled()
        if (req.path is None) == (req.basis is None):
            raise HTTPException(400, "give exactly one of path (a bank directory) or basis ([start, stop])")
        limits = self.limits
        if req.layers is not None:
            bad = [L for L in req.layers if not 0 <= L < limits["num_layers"]]
            if bad:
                raise HTTPException(400, f"layers {bad} are outside the model's 0..{limits['num_layers'] - 1}")
        if req.basis is not None:
            if req.layers is None:
                raise HTTPException(400, "a basis bank needs layers")
            args = (req.name, None, req.basis, req.layers)
        else:
            taken = [range(*b["columns"]) for n, b in self.banks.items() if n != req.name and "columns" in b]
            # Reads the bank's files (megabytes, on any filesystem): off the event loop.
            bank_dir = await asyncio.to_thread(self.checked_bank_dir, req.path, req.layers, taken, req.name)
            args = (req.name, str(bank_dir), None, req.layers, req.calibrated)
        try:
            info = await self.state.rpc("plasticity_readout_load", *args)
        except HTTPException:
            raise
        except Exception as exc:  # the worker's ValueError (capacity, shapes) arrives wrapped
            raise HTTPException(400, f"bank {req.name!r} not loaded: {exc}") from None
        self.banks[req.name] = info
        metrics.banks_changed(self.banks, self.limits)
        self.enabled = True
        return info

    def checked_bank_dir(self, path: str, layers: list[int] | None, taken: list[range], name: str) -> Path:
        """The bank directory `path` names, its files read here first so a bad one gets a precise 400 and
        never reaches the engine (`taken`: the read-table columns other banks hold)."""
        bank_dir = self.bank_dir(path)
        self.check_bank_files(bank_dir, layers, taken, name)
        return bank_dir

    def check_bank_files(self, bank_dir: Path, layers: list[int] | None, taken: list[range], name: str) -> None:
        try:
            bank = load_bank(bank_dir)
        except Exception as exc:  # BankError, OSError, and whatever a corrupt file makes safetensors raise
            raise HTTPException(400, f"not a readout bank: {type(exc).__name__}: {exc}") from None
        limits = self.limits
        if bank.hidden_size != limits["hidden_size"]:
            raise HTTPException(400, f"bank hidden size {bank.hidden_size} does not match the model's "
                                     f"{limits['hidden_size']}")
        bad = [L for L in bank.layers if not 0 <= L < limits["num_layers"]]
        if bad:
            raise HTTPException(400, f"bank layers {bad} are outside the model's 0..{limits['num_layers'] - 1}")
        if layers is not None and not set(layers) <= set(bank.layers):
            raise HTTPException(400, f"layers {sorted(set(layers) - set(bank.layers))} are not in the bank "
                                     f"(it has {bank.layers})")
        if not all(bool(v.isfinite().all()) for v in bank.vectors.values()):
            raise HTTPException(400, "bank has values that are not finite")
        if free_columns(taken, len(bank.concepts), limits["capacity"]) is None:
            raise HTTPException(400, capacity_message(name, len(bank.concepts), limits["capacity"]))

    async def unload(self, name: str) -> dict:
        self.require_enabled()
        if name not in self.banks:
            raise HTTPException(404, f"no bank {name!r} is loaded (loaded: {sorted(self.banks)})")
        await self.state.rpc("plasticity_readout_unload", name)
        del self.banks[name]
        metrics.banks_changed(self.banks, self.limits)
        if self.default_steer and any(t[0] == name for t in self.default_steer["terms"]):
            self.default_steer = None  # it named the bank that is gone
        return {"unloaded": name}

    async def available(self) -> dict:
        """Bank directories a load could name, and those it would refuse, with the reason (scan_vectors_dir,
        in a thread: no file read holds the event loop)."""
        self.require_enabled()
        return await asyncio.to_thread(scan_vectors_dir, self.state.config.vectors_dir)

    def listing(self) -> dict:
        self.require_enabled()
        return {"banks": list(self.banks.values()), "limits": self.limits, "default_steering": self.default_view()}

    def default_view(self) -> dict | None:
        """The default steering as a client set it (`steer`, `steer_layers`), or None."""
        return self.default_steer and {k: self.default_steer[k] for k in ("steer", "steer_layers", "steer_units")}

    def check_steer(self, steer: Any, steer_layers: Any, steer_units: Any = None) -> list:
        try:
            check_steer_size(steer, steer_layers)  # before flat_steer copies a dict of any size
            return check_steer(flat_steer(steer), steer_layers, self.shapes(), steer_units, self.calibrated())
        except SteeringError as exc:
            raise HTTPException(400, str(exc)) from None

    def shapes(self) -> dict[str, tuple[list[str], list[int]]]:
        return {name: (b["concepts"], b["layers"]) for name, b in self.banks.items()}

    def calibrated(self) -> frozenset[str]:
        """The loaded banks that read calibrated scores and steer in natural units by default."""
        return frozenset(name for name, b in self.banks.items() if b.get("calibrated"))

    def set_default(self, req: DefaultSteering) -> dict:
        self.require_enabled()
        terms = self.check_steer(req.steer, req.steer_layers, req.steer_units)
        self.default_steer = {"steer": flat_steer(req.steer), "steer_layers": req.steer_layers,
                              "steer_units": req.steer_units, "terms": terms}
        return self.default_view()

    # ---- requests ----------------------------------------------------------------------------------

    @staticmethod
    def asks_for(request: CompletionRequest | ChatCompletionRequest) -> bool:
        """Whether a completion request sets any of the plugin's fields (in `vllm_xargs` or the body)."""
        xargs, extra = request.vllm_xargs or {}, request.model_extra or {}
        return any(name in xargs or name in extra for name in PLASTICITY_FIELDS)

    def plan(self, request: CompletionRequest | ChatCompletionRequest, raw_xargs: Any = None) -> dict | None:
        """Check and rewrite a completion request's readout/steering settings in place.

        `raw_xargs` is `vllm_xargs` as the client sent it: vLLM's model coerces JSON `true` to 1, and a
        boolean must never pass for a steering coefficient. Returns None for a request with neither (it
        goes to vLLM untouched), else {"key", "readout", "n"}; raises HTTPException(400) with the reason
        for bad settings.
        """
        xargs = dict(request.vllm_xargs or {})
        if isinstance(raw_xargs, dict):
            xargs.update({k: raw_xargs[k] for k in READOUT_FIELDS if k in raw_xargs and k in xargs})
        extra = request.model_extra if request.model_extra is not None else {}
        if "plasticity_key" in xargs:
            raise HTTPException(400, "vllm_xargs.plasticity_key is reserved for the server")
        fields = {}
        for name in READOUT_FIELDS:
            values = [src.pop(name) for src in (xargs, extra) if name in src]
            if name in ("steer", "steer_layers"):
                for value in values:  # the size first: nothing below may walk 3,000,000 terms
                    try:
                        check_steer_size(*((value, None) if name == "steer" else (None, value)))
                    except SteeringError as exc:
                        raise HTTPException(400, str(exc)) from None
            if len(values) == 2 and flat_steer(values[0]) != flat_steer(values[1]):
                raise HTTPException(400, f"{name} is given both in vllm_xargs and in the body, differently")
            if values and values[0] is not None:
                fields[name] = flat_steer(values[0])
        encodings = [src.pop("readout_encoding") for src in (xargs, extra) if "readout_encoding" in src]
        encoding = encodings[0] if encodings else "json"
        if encoding not in ("json", "base64"):
            raise HTTPException(400, f"readout_encoding must be 'json' or 'base64', got {encoding!r}")
        for name in ("steer_layers", "steer_units"):
            if "steer" not in fields and name in fields:
                raise HTTPException(400, f"{name} without steer")
        if "steer" not in fields and self.default_steer is not None:
            fields["steer"] = self.default_steer["steer"]
            for name in ("steer_layers", "steer_units"):
                if self.default_steer[name] is not None:
                    fields[name] = self.default_steer[name]
        if fields.get("steer") == []:  # an explicit "no steering", also against a default
            fields.pop("steer")
            fields.pop("steer_layers", None)
            fields.pop("steer_units", None)
        signals = fields.pop("signals", False)
        if not isinstance(signals, bool):
            raise HTTPException(400, f"signals must be true or false, got {signals!r}")
        if not fields and not signals:
            request.vllm_xargs = xargs or None
            return None
        self.require_enabled()
        if signals and not self.limits.get("signals"):
            raise HTTPException(400, "signals: the served architecture reports no per-token signals "
                                     "(SYNTHE does; see GET /plasticity/info readout.signals)")
        if signals:
            fields["signals"] = True
        readout = fields.get("readout")
        if readout is not None and (not isinstance(readout, str) or readout not in self.banks):
            raise HTTPException(400, f"readout: no bank {readout!r} is loaded (loaded: {sorted(self.banks)})")
        terms = (self.check_steer(fields["steer"], fields.get("steer_layers"), fields.get("steer_units"))
                 if "steer" in fields else [])
        key = uuid.uuid4().hex
        xargs.update(fields, plasticity_key=key)
        request.vllm_xargs = xargs
        if readout is not None or signals:
            salt = f"plasticity-readout-{key}"  # every prompt token must be computed to be scored
        else:
            spec = [[b, c, coef, list(layers), natural, self.banks[b]["digest"]]
                    for b, c, coef, layers, natural in terms]
            salt = "plasticity-steer-" + hashlib.sha256(json.dumps(sorted(spec)).encode()).hexdigest()[:32]
        if request.cache_salt:
            salt += "-" + hashlib.sha256(request.cache_salt.encode()).hexdigest()[:16]
        request.cache_salt = salt
        metrics.completion_request(readout=readout is not None or signals, steered=bool(terms))
        return {"key": key, "readout": readout, "signals": signals, "n": request.n or 1, "encoding": encoding}

    async def enable(self) -> None:
        """Make sure the worker keeps per-step bookkeeping (loading a bank does it; signals alone need it)."""
        if not self.enabled:
            await self.state.rpc("plasticity_readout_enable")
            self.enabled = True

    async def fetch(self, key: str, final: bool) -> dict[str, dict]:
        return await self.state.rpc("plasticity_readout_fetch", key, final)
