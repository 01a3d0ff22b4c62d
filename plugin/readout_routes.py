"""Readout and steering over HTTP: bank routes, and vLLM's completion routes with scores added.

Runs in the API server process (the endpoint plugin attaches these routes).

    POST   /readout/load        {"name": "emotions", "path": "<bank dir inside --vectors-dir>", "layers": [..]?}
                                or {"name": "dims", "basis": [start, stop], "layers": [..]} (raw coordinates)
    GET    /readout             loaded banks: concepts, layers, digest, source
    DELETE /readout/{name}
    POST   /steering/default    {"steer": ["emotions/joy", 4.0], "steer_layers": [..]?}: for requests setting none
    GET    /steering/default
    DELETE /steering/default

/v1/completions and /v1/chat/completions are vLLM's own handlers behind a thin wrapper: it reads
`readout` / `steer` / `steer_layers` from `vllm_xargs` (or the same names as top-level JSON fields),
answers 400 when they do not fit the loaded banks, tags the request (`plasticity_key` in its extra
args) and salts its prefix cache, then calls vLLM's handler and adds each choice's scores, fetched from
the worker by that tag: `choice["readout"] = {"bank", "layers", "concepts", "positions", "scores"}` with
`scores[i][j][k]` = concept k at layer j for the token at `positions[i]` (prompt tokens from 0, then the
generated ones; the last generated token is never fed back, so it has no state). Streaming responses
carry, in each chunk, the scores computed since the previous chunk. `readout_encoding: "base64"` returns
`scores` as base64 of little-endian float32 with `scores_shape` instead of nested lists (much smaller
and faster for wide banks; `plasticity extract --server` uses it).

Prefix cache: KV computed without steering must never serve a steered request (and the reverse), and a
readout request needs every prompt token computed to score it. Steered requests get a cache salt
derived from their settings and the banks' digests (requests steered alike still share cache); readout
requests get a salt of their own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from vllm_plasticity.steer_spec import SteeringError, check_steer

READOUT_FIELDS = ("readout", "steer", "steer_layers")
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

    # ---- banks -------------------------------------------------------------------------------------

    def require_enabled(self) -> None:
        if self.state.config.vectors_dir is None:
            raise HTTPException(403, "readout and steering are off on this server: start it with "
                                     "`plasticity serve --vectors-dir DIR` (or PLASTICITY_VECTORS_DIR=DIR)")
        if self.limits is None:
            raise HTTPException(503, "the served model has no residual tap (serve a Llama/Qwen2/Qwen3 model "
                                     "through plasticity serve)")

    def bank_dir(self, path: str) -> Path:
        """`path` (relative to the vectors directory, or absolute) resolved; 400 unless it and every file
        a bank is read from (symlinks followed) lie inside the vectors directory."""
        from plasticity_training.bank import BANK_FILES

        root = self.state.config.vectors_dir.resolve()
        try:
            target = (root / path).resolve()
            if target != root and root not in target.parents:
                raise HTTPException(400, f"path {path!r} is outside the vectors directory {root}")
            if not target.is_dir():
                raise HTTPException(400, f"path {path!r}: no such bank directory inside {root}")
            for name in BANK_FILES:
                file = (target / name).resolve()
                if root not in file.parents:
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
        return info

    def check_bank_files(self, bank_dir: Path, layers: list[int] | None, name: str) -> None:
        """Read the bank here first so a bad one gets a precise 400 and never reaches the engine."""
        from plasticity_training.bank import load_bank

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
        free = limits["capacity"] - sum(len(b["concepts"]) for n, b in self.banks.items() if n != name)
        if len(bank.concepts) > free:
            raise HTTPException(400, f"bank has {len(bank.concepts)} concepts; {free} of the readout capacity "
                                     f"{limits['capacity']} are free (unload a bank, or raise PLASTICITY_READOUT_CAPACITY)")

    async def unload(self, name: str) -> dict:
        self.require_enabled()
        if name not in self.banks:
            raise HTTPException(404, f"no bank {name!r} is loaded (loaded: {sorted(self.banks)})")
        await self.state.rpc("plasticity_readout_unload", name)
        del self.banks[name]
        if self.default_steer and any(t[0] == name for t in self.default_steer["terms"]):
            self.default_steer = None  # it named the bank that is gone
        return {"unloaded": name}

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
        if not fields:
            request.vllm_xargs = xargs or None
            return None
        self.require_enabled()
        readout = fields.get("readout")
        if readout is not None and (not isinstance(readout, str) or readout not in self.banks):
            raise HTTPException(400, f"readout: no bank {readout!r} is loaded (loaded: {sorted(self.banks)})")
        terms = self.check_steer(fields["steer"], fields.get("steer_layers")) if "steer" in fields else []
        key = uuid.uuid4().hex
        xargs.update(fields, plasticity_key=key)
        request.vllm_xargs = xargs
        if readout is not None:
            salt = f"plasticity-readout-{key}"  # every prompt token must be computed to be scored
        else:
            spec = [[b, c, coef, list(layers), self.banks[b]["digest"]] for b, c, coef, layers in terms]
            salt = "plasticity-steer-" + hashlib.sha256(json.dumps(sorted(spec)).encode()).hexdigest()[:32]
        if request.cache_salt:
            salt += "-" + hashlib.sha256(request.cache_salt.encode()).hexdigest()[:16]
        request.cache_salt = salt
        return {"key": key, "readout": readout, "n": request.n or 1, "encoding": encoding}

    async def fetch(self, key: str, final: bool) -> dict[str, dict]:
        return await self.state.rpc("plasticity_readout_fetch", key, final)


def choice_index(req_id: str, n: int, completions: bool) -> int:
    """The response choice an internal request id belongs to.

    vLLM names a completion prompt's request `<id>-<prompt index>`, a parallel-sampling child
    `<child index>_<parent id>`, and may append `-<8 hex>`; choices are numbered prompt * n + child.
    """
    child = re.match(r"^(\d+)_", req_id)
    stem = re.sub(r"-[0-9a-f]{8}$", "", req_id[child.end():] if child else req_id)
    prompt = re.search(r"-(\d+)$", stem) if completions else None
    return (int(prompt.group(1)) if prompt else 0) * n + (int(child.group(1)) if child else 0)


def scores_array(result: dict) -> np.ndarray:
    return np.frombuffer(result["scores"], dtype="<f4").reshape(result["shape"])


def readout_field(result: dict | None, encoding: str, scores: np.ndarray | None = None) -> dict:
    """The `readout` object of one choice: scores as nested lists, or base64 of float32 when asked."""
    if result is None:
        return {"error": "no scores were collected for this choice"}
    scores = scores_array(result) if scores is None else scores
    out = {k: result[k] for k in ("bank", "layers", "concepts", "positions")}
    if encoding == "base64":
        out.update(scores=base64.b64encode(scores.astype("<f4").tobytes()).decode(), scores_shape=list(scores.shape),
                   scores_dtype="float32")
    else:
        out["scores"] = scores.tolist()
    if "error" in result:
        out["error"] = result["error"]
    return out


async def with_readout(service: ReadoutService, plan: dict, response: Any, completions: bool) -> Any:
    """Add each choice's scores to vLLM's response (JSON or server-sent events)."""
    if isinstance(response, StreamingResponse):
        return StreamingResponse(stream_with_readout(service, plan, response.body_iterator, completions),
                                 media_type=response.media_type, status_code=response.status_code)
    if not isinstance(response, JSONResponse) or response.status_code != 200:
        await service.fetch(plan["key"], True)
        return response
    body = json.loads(response.body)
    results = await service.fetch(plan["key"], True)
    by_choice = {choice_index(rid, plan["n"], completions): r for rid, r in results.items()}
    for choice in body.get("choices", []):
        choice["readout"] = readout_field(by_choice.get(choice.get("index", 0)), plan["encoding"])
    headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
    return JSONResponse(body, status_code=200, headers=headers)


async def stream_with_readout(service: ReadoutService, plan: dict, events: Any, completions: bool):
    pending: dict[int, dict] = {}  # scores fetched but not yet sent, by choice
    try:
        async for chunk in events:
            text = chunk.decode() if isinstance(chunk, bytes) else chunk
            parts = []
            for event in text.split("\n\n"):
                if event.startswith("data: {"):
                    data = json.loads(event[len("data: "):])
                    if data.get("choices"):
                        for rid, result in (await service.fetch(plan["key"], False)).items():
                            index = choice_index(rid, plan["n"], completions)
                            held = pending.setdefault(index, {**result, "positions": [], "arrays": []})
                            held["positions"] += result["positions"]
                            held["arrays"].append(scores_array(result))
                            if "error" in result:
                                held["error"] = result["error"]
                        for choice in data["choices"]:
                            held = pending.pop(choice.get("index", 0), None)
                            if held is not None and (held["positions"] or "error" in held):
                                choice["readout"] = readout_field(held, plan["encoding"],
                                                                  np.concatenate(held["arrays"]))
                        event = "data: " + json.dumps(data)
                parts.append(event)
            yield "\n\n".join(parts)
    finally:
        await service.fetch(plan["key"], True)


def get_readout(request: Request) -> ReadoutService:
    state = getattr(request.app.state, "plasticity", None)
    service = getattr(state, "readout", None)
    if service is None:
        raise HTTPException(503, "plasticity is not initialised yet")
    return service


def attach_readout_routes(app: FastAPI, router: APIRouter, guard: Any) -> None:
    """Add the bank routes to `router` and wrap vLLM's completion routes (if the app has them).

    `guard` is the API-key dependency of the other plasticity routes. The wrapped routes keep vLLM's own
    API-key middleware, request models, validation and error format.
    """
    originals = {(r.path, m): r.endpoint for r in app.routes if isinstance(r, APIRoute) for m in r.methods}

    @router.post("/readout/load", dependencies=[Depends(guard)])
    async def load_bank(req: LoadBankRequest, service: ReadoutService = Depends(get_readout)) -> dict:
        """Load (or replace) a bank: a directory inside --vectors-dir, or a slice of the standard basis."""
        return await service.load(req)

    @router.get("/readout", dependencies=[Depends(guard)])
    async def list_banks(service: ReadoutService = Depends(get_readout)) -> dict:
        """The loaded banks, the tap's limits and the default steering."""
        return service.listing()

    @router.delete("/readout/{name}", dependencies=[Depends(guard)])
    async def unload_bank(name: str, service: ReadoutService = Depends(get_readout)) -> dict:
        return await service.unload(name)

    @router.post("/steering/default", dependencies=[Depends(guard)])
    async def set_default_steering(req: DefaultSteering, service: ReadoutService = Depends(get_readout)) -> dict:
        """Steering for every completion request that sets none ("steer": [] opts out)."""
        return service.set_default(req)

    @router.get("/steering/default", dependencies=[Depends(guard)])
    async def get_default_steering(service: ReadoutService = Depends(get_readout)) -> dict | None:
        service.require_enabled()
        return service.default_view()

    @router.delete("/steering/default", dependencies=[Depends(guard)])
    async def clear_default_steering(service: ReadoutService = Depends(get_readout)) -> dict:
        service.require_enabled()
        service.default_steer = None
        return {"default_steering": None}

    completion = originals.get(("/v1/completions", "POST"))
    chat = originals.get(("/v1/chat/completions", "POST"))
    route_args = {}
    try:  # vLLM's content-type check, as on its own routes
        from vllm.entrypoints.serve.utils.api_utils import validate_json_request
        route_args["dependencies"] = [Depends(validate_json_request)]
    except ImportError:
        pass

    # Two routes, because FastAPI reads each one's request model from its signature.
    if completion is not None:
        @router.post("/v1/completions", **route_args)
        async def create_completion(request: CompletionRequest, raw_request: Request):
            return await call_with_readout(completion, request, raw_request, completions=True)

    if chat is not None:
        @router.post("/v1/chat/completions", **route_args)
        async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
            return await call_with_readout(chat, request, raw_request, completions=False)


async def call_with_readout(handler: Any, request: Any, raw_request: Request, completions: bool) -> Any:
    """vLLM's own `handler` on the request with its readout/steering settings checked and applied."""
    service = getattr(getattr(raw_request.app.state, "plasticity", None), "readout", None)
    plan = None
    if service is not None:
        body = await raw_request.json()  # already read and parsed by FastAPI: served from its cache
        plan = service.plan(request, body.get("vllm_xargs") if isinstance(body, dict) else None)
    response = await handler(request, raw_request)
    if plan is None or plan["readout"] is None:
        return response
    return await with_readout(service, plan, response, completions=completions)
