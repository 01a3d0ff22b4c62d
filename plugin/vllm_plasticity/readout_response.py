"""Each choice's readout added to vLLM's completion response: a JSON body, or a stream of server-sent
events whose chunks each carry the scores computed since the previous one.

Runs in the API server process (readout_routes.py calls `with_readout` after vLLM's own handler). Scores
come from the worker through ReadoutService.fetch, keyed by internal request id; vllm_patches.choice_index
maps each id to its choice. The `readout` object's fields are described in readout_routes.py.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse, StreamingResponse

from vllm_plasticity.readout_service import ReadoutService
from vllm_plasticity.vllm_patches import choice_index


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
    """vLLM's server-sent `events`, each chunk's choices carrying the scores computed since the last chunk."""
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
                            held = pending.setdefault(index, {**result, "positions": [], "arrays": [],
                                                              "signal_rows": []})
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
