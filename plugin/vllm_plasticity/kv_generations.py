"""Publishing a training step: no request admitted after a step reuses KV computed before it, and the
engine does no work for it.

Every request this API server sends to the engine carries a cache salt naming the weights' generation
(`plasticity-w<N>|` before the request's own salt, if any) once the first step is published. vLLM folds a
request's salt into the hash of its first KV block, and every later block's hash chains from it, so blocks
cached under an earlier generation can never match a later request; they age out of the cache by LRU like
any block nobody asks for. Publishing is `generation += 1` in this process: no engine round trip.

    >>> generations = KVGenerations.install(engine_client)   # once, when training is enabled
    >>> generations.publish()                                 # after each step the trainer applied

Why at `engine_core.add_request_async`: every route (completions, chat, responses, generate, pooling, and
routes the plugin does not wrap) ends there with an `EngineCoreRequest`, so one wrapper covers them all.
Why not vLLM's `reset_prefix_cache` (what this replaced): in vLLM 0.32 it refuses while any request holds a
block, and with `reset_running_requests=True` it preempts every running request (each recomputes its
prompt and everything generated so far) and walks every block in the engine's loop; it cost 3-4 ms per
step of the server's time (an engine-core round trip) on 2 CPU cores with nothing running.
With several API server processes the generation is in memory they share (api_processes.py): every
process salts the requests it admits, only the one that owns the trainer publishes.
Requests admitted before a step keep their salt and their blocks (hogwild, as before: their later tokens
see the new weights over the KV they already have).
"""

from __future__ import annotations

from vllm_plasticity.api_processes import SharedWords
from vllm_plasticity.vllm_patches import hook_add_request

SALT_PREFIX = "plasticity-w"


class KVGenerations:
    """The weights' generation as it salts the prefix cache; `install` wraps the engine client once.

    The number lives in `words` (api_processes.SharedWords): with several API server processes, the one that
    trains publishes and every process salts with what it reads there."""

    def __init__(self, words: SharedWords | None = None) -> None:
        self.words = words or SharedWords.private()  # generation 0 until a step is published

    @classmethod
    def install(cls, engine_client, words: SharedWords | None = None) -> "KVGenerations":
        """Salt every request `engine_client` sends from now on (vllm_patches.hook_add_request: installed
        again, the one wrapper salts with the new generations)."""
        generations = cls(words)
        hook_add_request(engine_client, generations.salt)
        return generations

    @property
    def generation(self) -> int:
        return self.words.generation

    def salt(self, request) -> None:
        """Put the generation in front of `request.cache_salt` (an EngineCoreRequest's); none before the first
        step: requests keep exactly the salt they came with."""
        generation = self.words.generation
        if generation:
            request.cache_salt = f"{SALT_PREFIX}{generation}|{request.cache_salt or ''}"

    def publish(self) -> None:
        self.words.generation += 1
