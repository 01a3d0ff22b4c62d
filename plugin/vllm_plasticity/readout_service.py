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

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from vllm_plasticity.contract.bank import BANK_FILES, capacity_message, free_columns, load_bank
from vllm_plasticity.contract.files import is_inside
from vllm_plasticity.steer_spec import SteeringError, check_steer

READOUT_FIELDS = ("readout", "signals", "steer", "steer_layers")
BANK_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class LoadBankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=BANK_NAME)
    path: str | None = Field(default=None, min_length=1)
    basis: list[int] | None = Field(default=None, min_length=2, max_length=2)
    layers: list[int] | None = Field(default=None, min_length=1)


class DefaultSteering(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Any JSON list/object: check_steer is the one rule for what a term may be (no bool for a number).
    steer: list[Any] | dict[str, Any]
    steer_layers: list[Any] | None = None


def flat_steer(steer: Any) -> Any:
    """Accept {"bank/concept": coef} too (JSON bodies); vllm_xargs can only carry the flat list."""
    if isinstance(steer, dict):
        return [x for target, coef in steer.items() for x in (target, coef)]
    return steer


class ReadoutService:
    """The API server's view of the loaded banks and the default steering; talks to the worker."""

    def __init__(self, state: Any) -> None:
        self.state = state  # endpoints.ServerState: config, rpc, worker_info
        self.limits: dict | None = state.worker_info.get("readout")
        self.banks: dict[str, dict] = {}
        self.default_steer: dict | None = None
        self.enabled = False  # the worker's bookkeeping is installed (by a bank load, or by enable())

    # ---- banks -------------------------------------------------------------------------------------

    def require_enabled(self) -> None:
        if self.state.config.vectors_dir is None:
            raise HTTPException(403, "readout and steering are off on this server: start it with "
                                     "`plasticity serve --vectors-dir DIR` (or PLASTICITY_VECTORS_DIR=DIR)")
        if self.limits is None:
            raise HTTPException(503, "the served model has no residual tap (serve a Llama/Qwen2/Qwen3 or "
                                     "causal-bank model through plasticity serve)")

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
            bank_dir = self.bank_dir(req.path)
            self.check_bank_files(bank_dir, req.layers, req.name)
            args = (req.name, str(bank_dir), None, req.layers)
        try:
            info = await self.state.rpc("plasticity_readout_load", *args)
        except HTTPException:
            raise
        except Exception as exc:  # the worker's ValueError (capacity, shapes) arrives wrapped
            raise HTTPException(400, f"bank {req.name!r} not loaded: {exc}") from None
        self.banks[req.name] = info
        self.enabled = True
        return info

    def check_bank_files(self, bank_dir: Path, layers: list[int] | None, name: str) -> None:
        """Read the bank here first so a bad one gets a precise 400 and never reaches the engine."""
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
        taken = [range(*b["columns"]) for n, b in self.banks.items() if n != name and "columns" in b]
        if free_columns(taken, len(bank.concepts), limits["capacity"]) is None:
            raise HTTPException(400, capacity_message(name, len(bank.concepts), limits["capacity"]))

    async def unload(self, name: str) -> dict:
        self.require_enabled()
        if name not in self.banks:
            raise HTTPException(404, f"no bank {name!r} is loaded (loaded: {sorted(self.banks)})")
        await self.state.rpc("plasticity_readout_unload", name)
        del self.banks[name]
        if self.default_steer and any(t[0] == name for t in self.default_steer["terms"]):
            self.default_steer = None  # it named the bank that is gone
        return {"unloaded": name}

    def available(self) -> dict:
        """Bank directories in the vectors directory (up to two levels down) that a load could name: both
        bank files present and inside it. Read from readout.json only (the vectors stay on disk)."""
        self.require_enabled()
        root = self.state.config.vectors_dir.resolve()
        found = []
        for manifest in sorted([*root.glob(f"*/{BANK_FILES[0]}"), *root.glob(f"*/*/{BANK_FILES[0]}")]):
            bank_dir = manifest.parent
            if not all(is_inside((bank_dir / n).resolve(), root) for n in BANK_FILES):
                continue
            try:
                meta = json.loads(manifest.read_text())
                found.append({"path": str(bank_dir.relative_to(root)), "concepts": len(meta.get("concepts", [])),
                              "layers": meta.get("layers"), "model": meta.get("model"), "method": meta.get("method")})
            except (OSError, ValueError):
                continue  # not readable as a bank manifest: a load would refuse it with the reason
        return {"vectors_dir": str(root), "banks": found}

    def listing(self) -> dict:
        self.require_enabled()
        return {"banks": list(self.banks.values()), "limits": self.limits, "default_steering": self.default_view()}

    def default_view(self) -> dict | None:
        """The default steering as a client set it (`steer`, `steer_layers`), or None."""
        return self.default_steer and {k: self.default_steer[k] for k in ("steer", "steer_layers")}

    def check_steer(self, steer: Any, steer_layers: Any) -> list:
        try:
            return check_steer(flat_steer(steer), steer_layers, self.shapes())
        except SteeringError as exc:
            raise HTTPException(400, str(exc)) from None

    def shapes(self) -> dict[str, tuple[list[str], list[int]]]:
        return {name: (b["concepts"], b["layers"]) for name, b in self.banks.items()}

    def set_default(self, req: DefaultSteering) -> dict:
        self.require_enabled()
        steer = flat_steer(req.steer)
        terms = self.check_steer(steer, req.steer_layers)
        self.default_steer = {"steer": steer, "steer_layers": req.steer_layers, "terms": terms}
        return self.default_view()

    # ---- requests ----------------------------------------------------------------------------------

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
            if len(values) == 2 and flat_steer(values[0]) != flat_steer(values[1]):
                raise HTTPException(400, f"{name} is given both in vllm_xargs and in the body, differently")
            if values and values[0] is not None:
                fields[name] = flat_steer(values[0])
        encodings = [src.pop("readout_encoding") for src in (xargs, extra) if "readout_encoding" in src]
        encoding = encodings[0] if encodings else "json"
        if encoding not in ("json", "base64"):
            raise HTTPException(400, f"readout_encoding must be 'json' or 'base64', got {encoding!r}")
        if "steer" not in fields and "steer_layers" in fields:
            raise HTTPException(400, "steer_layers without steer")
        if "steer" not in fields and self.default_steer is not None:
            fields["steer"] = self.default_steer["steer"]
            if self.default_steer["steer_layers"] is not None:
                fields["steer_layers"] = self.default_steer["steer_layers"]
        if fields.get("steer") == []:  # an explicit "no steering", also against a default
            fields.pop("steer")
            fields.pop("steer_layers", None)
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
        terms = self.check_steer(fields["steer"], fields.get("steer_layers")) if "steer" in fields else []
        key = uuid.uuid4().hex
        xargs.update(fields, plasticity_key=key)
        request.vllm_xargs = xargs
        if readout is not None or signals:
            salt = f"plasticity-readout-{key}"  # every prompt token must be computed to be scored
        else:
            spec = [[b, c, coef, list(layers), self.banks[b]["digest"]] for b, c, coef, layers in terms]
            salt = "plasticity-steer-" + hashlib.sha256(json.dumps(sorted(spec)).encode()).hexdigest()[:32]
        if request.cache_salt:
            salt += "-" + hashlib.sha256(request.cache_salt.encode()).hexdigest()[:16]
        request.cache_salt = salt
        return {"key": key, "readout": readout, "signals": signals, "n": request.n or 1, "encoding": encoding}

    async def enable(self) -> None:
        """Make sure the worker keeps per-step bookkeeping (loading a bank does it; signals alone need it)."""
        if not self.enabled:
            await self.state.rpc("plasticity_readout_enable")
            self.enabled = True

    async def fetch(self, key: str, final: bool) -> dict[str, dict]:
        return await self.state.rpc("plasticity_readout_fetch", key, final)
