"""POST /train/convert: OpenAI fine-tuning lines turned into /train samples by the served model's own chat
template, inside the server, for callers that hold chat text rather than token ids (the page's teach panel).

The conversion is the one `plasticity train` runs on the client (contract/chat_samples.py: which turns
train, context = everything before the turn with the generation prompt, continuation = the turn through
its end token). Only the rendering differs: here it goes through this server's own `POST /tokenize`,
called in-process on the ASGI app (no socket), so the ids are the ones a chat request would give the
model, from vLLM's public route rather than its internals. The conversion itself is synchronous (one
render per turn); it runs in a thread that hands each render to the event loop and waits for it.

    POST /train/convert {"lines": [{"messages": [...]}, ...], "objective": "sft"}
    -> {"samples": [{"context_ids": [...], "continuation_ids": [...]}, ...], "sources": [{"line": 1, "field": "messages[1]"}]}

A line with an error answers 400 naming every bad line and field, and no samples (as `plasticity train`
sends nothing for a file with errors).
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import httpx
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from vllm_plasticity.contract.chat_samples import OBJECTIVES, convert_lines, stop_tokens

RENDER_TIMEOUT_SECONDS = 120
MAX_LINES = 1024  # one request's lines: a page or a small batch; `plasticity train` handles files


class ConvertRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lines: list[dict] = Field(min_length=1, max_length=MAX_LINES,
                              description="OpenAI fine-tuning lines as JSON objects (chat or preference lines)")
    objective: Literal[OBJECTIVES] = "sft"


async def convert(app: FastAPI, req: ConvertRequest, model_dir: str, max_model_len: int, max_request_tokens: int,
                  authorization: str | None) -> dict:
    """The samples of REQ's lines, or HTTPException(400) naming each bad line."""
    template = AppChatTemplate(app, asyncio.get_running_loop(), model_dir, authorization)
    lines = [json.dumps(line) for line in req.lines]
    items, errors = await asyncio.to_thread(convert_lines, lines, template, req.objective, max_model_len,
                                            max_request_tokens)
    if errors:
        raise HTTPException(400, "; ".join(str(e) for e in errors))
    return {"objective": req.objective, "samples": [item.body() for item in items],
            "sources": [{"line": item.line, "field": item.field} for item in items]}


class AppChatTemplate:
    """chat_samples.ChatTemplate on this server's /tokenize, called in-process from a worker thread."""

    def __init__(self, app: FastAPI, loop: asyncio.AbstractEventLoop, model_dir: str, authorization: str | None) -> None:
        self.app, self.loop = app, loop
        self.headers = {"authorization": authorization} if authorization else {}
        # Which token ends a generation, as vLLM reads it from the served directory (a hub name: unknown,
        # and turns train as the template renders them, as `plasticity train` does off the machine).
        self.eos_token_id, self.stop_token_ids = stop_tokens(model_dir) or (None, frozenset())

    def render(self, messages: list[dict], tools: list | None, add_generation_prompt: bool) -> list[int]:
        body = {"messages": messages, "add_generation_prompt": add_generation_prompt,
                **({"tools": tools} if tools is not None else {})}
        future = asyncio.run_coroutine_threadsafe(self._tokenize(body), self.loop)
        return future.result(timeout=RENDER_TIMEOUT_SECONDS)

    async def _tokenize(self, body: dict) -> list[int]:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://plasticity.internal") as client:
            r = await client.post("/tokenize", json=body, headers=self.headers, timeout=RENDER_TIMEOUT_SECONDS)
        if r.status_code == 400:  # the template or the message format refused these messages
            raise ValueError(_reason(r))
        if r.status_code != 200:
            raise HTTPException(502, f"this server's /tokenize answered {r.status_code}: {_reason(r)}")
        return r.json()["tokens"]


def _reason(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:300]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):  # vLLM's OpenAI-style error body
        return str(error.get("message"))[:300]
    return str(body.get("detail", body) if isinstance(body, dict) else body)[:300]
