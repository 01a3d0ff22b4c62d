"""The parity checks every recurrent architecture's served form must pass, through a real server.

Used by the architecture test modules (test_causal_bank.py first). Each check takes the server, the model
name and, where it compares against the architecture's reference, `reference(ids) -> [log p(ids[i] | <i)]`
for i = 1..n-1 (the reference implementation's full-sequence forward, fp32).

    logits_match(server, model, reference, prompts, tol)  served prompt_logprobs = the reference's
    decode_equals_prefill(server, model, prompt, n, tol)  generated tokens' log-probs = scoring the text
    batch_invariant(server, model, prompts, tol)          a batch of different prompts = each alone
    causal(server, model, prompt, t, vocab, tol)          tokens after t never change log-probs at <= t
    isolated(server, model, prompts, tol)                 concurrent generations = each one alone
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import requests


def _post(server, body: dict, headers: dict | None = None) -> dict:
    r = requests.post(server.url + "/v1/completions", json={"temperature": 0, **body}, headers=headers or {}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def served_logprobs(server, model: str, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[<i]) for i = 1..n-1, from the server's prompt_logprobs."""
    entries = _post(server, {"model": model, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0})["choices"][0]["prompt_logprobs"]
    return [entries[i][str(t)]["logprob"] for i, t in enumerate(ids) if i > 0]


def max_gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def logits_match(server, model: str, reference, prompts: list[list[int]], tol: float) -> None:
    for ids in prompts:
        gap = max_gap(served_logprobs(server, model, ids), reference(ids))
        assert gap <= tol, f"prompt of {len(ids)} tokens: served vs reference log-probs differ by {gap:.2e}"


def greedy(server, model: str, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy continuation of `ids`: the tokens and each one's log-prob as decode computed it."""
    choice = _post(server, {"model": model, "prompt": ids, "max_tokens": n, "logprobs": 0,
                            "return_token_ids": True, "ignore_eos": True})["choices"][0]
    return choice["token_ids"], choice["logprobs"]["token_logprobs"]


def decode_equals_prefill(server, model: str, prompt: list[int], n: int, tol: float) -> list[int]:
    tokens, decoded = greedy(server, model, prompt, n)
    assert len(tokens) == n
    prefilled = served_logprobs(server, model, prompt + tokens)[len(prompt) - 1:]
    gap = max_gap(decoded, prefilled)
    assert gap <= tol, f"decode vs prefill log-probs differ by {gap:.2e}"
    return tokens


def batch_invariant(server, model: str, prompts: list[list[int]], tol: float) -> None:
    out = _post(server, {"model": model, "prompt": prompts, "max_tokens": 1, "prompt_logprobs": 0})
    for ids, choice in zip(prompts, sorted(out["choices"], key=lambda c: c["index"])):
        batched = [choice["prompt_logprobs"][i][str(t)]["logprob"] for i, t in enumerate(ids) if i > 0]
        gap = max_gap(batched, served_logprobs(server, model, ids))
        assert gap <= tol, f"prompt of {len(ids)} tokens: in a batch of {len(prompts)} vs alone differ by {gap:.2e}"


def causal(server, model: str, prompt: list[int], t: int, vocab: int, tol: float, seed: int = 0) -> None:
    rng = random.Random(seed)
    changed = prompt[: t + 1] + [rng.randrange(vocab) for _ in prompt[t + 1:]]
    assert changed[t + 1:] != prompt[t + 1:]
    a, b = served_logprobs(server, model, prompt), served_logprobs(server, model, changed)
    gap = max_gap(a[:t], b[:t])  # log-probs of tokens 1..t: computed from positions <= t - 1
    assert gap <= tol, f"tokens after position {t} changed earlier log-probs by {gap:.2e}"
    assert max_gap(a[t:], b[t:]) > tol, "changing the later tokens changed nothing at all (the check is vacuous)"


def isolated(server, model: str, prompts: list[list[int]], n: int, tol: float) -> None:
    alone = [greedy(server, model, ids, n) for ids in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda ids: greedy(server, model, ids, n), prompts))
    for (ta, la), (tb, lb) in zip(alone, together):
        assert ta == tb, "a request's generation changed when other requests ran beside it"
        assert max_gap(la, lb) <= tol
