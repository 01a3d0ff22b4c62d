"""Publishing a step salts every later request's prefix-cache key with the weights' generation, below every
route (the engine client's add_request_async), and leaves requests untouched until the first step.
(tests/test_training.py checks the effect through a real server: no stale KV after a step.)"""

from __future__ import annotations

import asyncio
import types

from vllm_plasticity.kv_generations import KVGenerations


def test_requests_after_a_step_carry_the_new_generation_in_their_cache_salt():
    sent = []

    async def add_request_async(request):
        sent.append(request.cache_salt)
    client = types.SimpleNamespace(engine_core=types.SimpleNamespace(add_request_async=add_request_async))
    generations = KVGenerations.install(client)
    send = lambda salt: asyncio.run(client.engine_core.add_request_async(types.SimpleNamespace(cache_salt=salt)))

    send(None)
    send("readout-7")
    generations.publish()
    send(None)
    send("readout-7")
    generations.publish()
    send(None)
    assert sent == [None, "readout-7", "plasticity-w1|", "plasticity-w1|readout-7", "plasticity-w2|"]
