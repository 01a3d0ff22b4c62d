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
true: the bank's calibrated scores (0 = as its corpus on average, 1 = one standard deviation of it along the concept), else raw
dot products. `steer_units` ("natural" | "raw") says what the `steer` coefficients count (steer_spec.py). Streaming responses
carry, in each chunk, the scores computed since the previous chunk. `readout_encoding: "base64"` returns
`scores` as base64 of little-endian float32 with `scores_shape` instead of nested lists (much smaller
and faster for wide banks; `plasticity extract --server` uses it). `signals: true` (architectures that
report per-token signals, e.g. SYNTHE's Kalman confidence and probe gate) adds `signal_names` and
`signals[i][k]` = signal k for the token at `positions[i]` to the same object (with or without a bank;
base64 likewise, with `signals_shape`).

The banks and each request's plan (checks, tag, prefix-cache salt) are readout_service.py's; adding the
scores to vLLM's JSON or server-sent-event response is readout_response.py's.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.routing import APIRoute
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from vllm_plasticity.readout_response import with_readout
from vllm_plasticity.readout_service import READOUT_FIELDS, DefaultSteering, LoadBankRequest, ReadoutService


WRAPPED_COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")


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

    completion, chat = (originals.get((path, "POST")) for path in WRAPPED_COMPLETION_PATHS)
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
    state = getattr(raw_request.app.state, "plasticity", None)
    processes = getattr(state, "processes", None)
    if processes is not None and processes.forwards and (processes.words.default_steering or ReadoutService.asks_for(request)):
        return await processes.forward(raw_request)  # the banks and the default steering are the owner's
    service = getattr(state, "readout", None)
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
