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
the worker by that tag: `choice["readout"] = {"bank", "layers", "concepts", "calibrated", "positions",
"scores"}` with `scores[i][j][k]` = concept k at layer j for the token at `positions[i]` (prompt tokens from
0, then the generated ones; the last generated token is never fed back, so it has no state); `calibrated`
true: the bank's calibrated scores (0 = as its corpus on average, 1 = as the concept's own texts), else raw
dot products. `steer_units` ("natural" | "raw") says what the `steer` coefficients count (steer_spec.py). Streaming responses
carry, in each chunk, the scores computed since the previous chunk. `readout_encoding: "base64"` returns
`scores` as base64 of little-endian float32 with `scores_shape` instead of nested lists (much smaller
and faster for wide banks; `plasticity extract --server` uses it). `signals: true` (architectures that
report per-token signals, e.g. SYNTHE's Kalman confidence and probe gate) adds `signal_names` and
`signals[i][k]` = signal k for the token at `positions[i]` to the same object (with or without a bank;
base64 likewise, with `signals_shape`).

The banks and each request's plan (checks, tag, prefix-cache salt) are readout_service.py's.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from vllm_plasticity.readout_service import READOUT_FIELDS, DefaultSteering, LoadBankRequest, ReadoutService


def choice_index(req_id: str, n: int, completions: bool) -> int:
    """The response choice an internal request id belongs to.

    vLLM offers no mapping, so this is the one place that reads its private request-id format (vLLM 0.32:
    a completion prompt's request is `<id>-<prompt index>`, a parallel-sampling child `<child index>_<parent
    id>`, and the engine appends `-<8 hex>`; tests/test_readout_choices.py fails when vLLM's format strings
    change). Choices are numbered prompt * n + child. An id that does not fit raises ValueError.
    """
    child = re.match(r"^(\d+)_", req_id)
    stem = re.sub(r"-[0-9a-f]{8}$", "", req_id[child.end():] if child else req_id)
    prompt = re.search(r"-(\d+)$", stem) if completions else None
    if completions and prompt is None:
        raise ValueError(f"internal request id {req_id!r} has no prompt index: vLLM's request-id format changed "
                         "(see choice_index)")
    return (int(prompt.group(1)) if prompt else 0) * n + (int(child.group(1)) if child else 0)


def scores_array(result: dict) -> np.ndarray:
    return np.frombuffer(result["scores"], dtype="<f4").reshape(result["shape"])


def signals_array(result: dict) -> np.ndarray | None:
    if "signal_names" not in result:
        return None
    return np.frombuffer(result["signals"], dtype="<f4").reshape(len(result["positions"]), len(result["signal_names"]))


def readout_field(result: dict | None, encoding: str, scores: np.ndarray | None = None,
                  signals: np.ndarray | None = None) -> dict:
    """The `readout` object of one choice: scores (and signals, when asked for) as nested lists, or base64
    of float32 when asked."""
    if result is None:
        return {"error": "no scores were collected for this choice"}
    scores = scores_array(result) if scores is None else scores
    signals = signals_array(result) if signals is None else signals
    out = {k: result[k] for k in ("bank", "layers", "concepts", "positions")}
    out["calibrated"] = bool(result.get("calibrated"))  # scores are (h - c) . v / s, not raw dot products
    arrays = {"scores": scores, **({"signals": signals} if signals is not None else {})}
    if signals is not None:
        out["signal_names"] = result["signal_names"]
    for name, array in arrays.items():
        if encoding == "base64":
            out.update({name: base64.b64encode(array.astype("<f4").tobytes()).decode(),
                        f"{name}_shape": list(array.shape), f"{name}_dtype": "float32"})
        else:
            out[name] = array.tolist()
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
                            held = pending.setdefault(index, {**result, "positions": [], "arrays": [], "signal_rows": []})
                            held["signal_rows"].append(signals_array(result))
                            held["positions"] += result["positions"]
                            held["arrays"].append(scores_array(result))
                            if "error" in result:
                                held["error"] = result["error"]
                        for choice in data["choices"]:
                            held = pending.pop(choice.get("index", 0), None)
                            if held is not None and (held["positions"] or "error" in held):
                                rows = held["signal_rows"]
                                choice["readout"] = readout_field(
                                    held, plan["encoding"], np.concatenate(held["arrays"]),
                                    None if rows[0] is None else np.concatenate(rows))
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

    @router.get("/readout/available", dependencies=[Depends(guard)])
    async def available_banks(service: ReadoutService = Depends(get_readout)) -> dict:
        """Bank directories in the vectors directory that POST /readout/load can name, and those it would
        refuse (`unreadable`, with the reason)."""
        return await service.available()

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
        raw_xargs = None
        if any(name in (request.vllm_xargs or {}) for name in READOUT_FIELDS):
            # Only then: vLLM's model coerced a JSON `true` to 1, so read the client's own values (one more
            # parse of the body, for requests that ask for readout or steering through vllm_xargs alone).
            body = await raw_request.json()
            raw_xargs = body.get("vllm_xargs") if isinstance(body, dict) else None
        plan = service.plan(request, raw_xargs)
        if plan is not None and plan["signals"]:
            await service.enable()
    response = await handler(request, raw_request)
    if plan is None or (plan["readout"] is None and not plan["signals"]):
        return response
    return await with_readout(service, plan, response, completions=completions)
