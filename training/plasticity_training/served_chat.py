"""The served model's chat template, through the server's own routes: the ids a chat request would give
the model.

Client side (`plasticity train`); imports no vLLM. vLLM's `POST /tokenize` takes chat `messages` and
renders them with the template the server itself uses for /v1/chat/completions (the model's, or the one
given with `--chat-template`), so samples built here match what chat requests see, for any served model.
The one thing no default route tells is which token ends a generation: it is read from the served
model's directory (`root` in GET /v1/models) when this machine can see it.

    >>> template = ServedChatTemplate("http://localhost:8000", api_key="KEY")
    >>> template.render([{"role": "user", "content": "Hi"}], None, add_generation_prompt=True)
"""

from __future__ import annotations

import json
import sys

import requests

from vllm_plasticity.contract import chat_samples

TIMEOUT_SECONDS = 120


class ServerError(RuntimeError):
    """The server answered an error (or not at all); the message carries its reason."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status; None when the server did not answer


class ServedChatTemplate:
    """chat_samples.ChatTemplate backed by a running server (over HTTP)."""

    def __init__(self, server: str, api_key: str | None = None, session: requests.Session | None = None) -> None:
        self.url = server.rstrip("/")
        self.session = session or requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        card = self.get("/v1/models")["data"][0]
        self.model: str = card["id"]
        self.model_path: str = card.get("root") or card["id"]
        self.max_model_len: int | None = card.get("max_model_len")
        self.eos_token_id, self.stop_token_ids = stop_tokens(self.model_path)

    def render(self, messages: list[dict], tools: list | None, add_generation_prompt: bool) -> list[int]:
        body = {"model": self.model, "messages": messages, "add_generation_prompt": add_generation_prompt}
        if tools is not None:
            body["tools"] = tools
        try:
            return self.post("/tokenize", body)["tokens"]
        except ServerError as exc:
            if exc.status == 400:  # the template or the message format refused these messages
                raise ValueError(str(exc)) from None
            raise

    def decode(self, ids: list[int]) -> str:
        return self.post("/detokenize", {"model": self.model, "tokens": ids})["prompt"]

    def get(self, path: str) -> dict:
        return self._answer(lambda: self.session.get(self.url + path, timeout=TIMEOUT_SECONDS), path)

    def post(self, path: str, body: dict) -> dict:
        return self._answer(lambda: self.session.post(self.url + path, json=body, timeout=TIMEOUT_SECONDS), path)

    def _answer(self, call, path: str) -> dict:
        try:
            r = call()
        except requests.RequestException as exc:
            raise ServerError(f"{self.url}{path}: no answer ({exc})", status=None) from None
        if r.status_code >= 400:
            raise ServerError(f"{path}: {r.status_code} {_reason(r)}", status=r.status_code)
        return r.json()


def stop_tokens(model_path: str) -> tuple[int | None, frozenset[int]]:
    """chat_samples.stop_tokens of the served model's directory; unknown (None, empty) when the directory is
    not on this machine: turns are then trained as the template renders them, which for most chat templates
    includes their end-of-turn token (said once on stderr)."""
    found = chat_samples.stop_tokens(model_path)
    if found is None:
        print(f"plasticity train: the served model's directory {model_path!r} is not on this machine; its "
              "end-of-generation token is unknown, so assistant turns are trained as the chat template renders "
              "them (most templates end a turn with their own end token)", file=sys.stderr)
        return None, frozenset()
    return found


def _reason(r: requests.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:500]
    detail = body.get("detail") if isinstance(body, dict) else None
    if detail is None and isinstance(body, dict) and isinstance(body.get("error"), dict):
        detail = body["error"].get("message")  # vLLM's OpenAI-style error body
    return detail if isinstance(detail, str) else json.dumps(detail if detail is not None else body)[:500]
