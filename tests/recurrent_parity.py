"""The parity checks every recurrent architecture's served form must pass, through a real server.

Used by the architecture test modules (test_causal_bank.py first). Each check takes the server, the model
name and, where it compares against the architecture's reference, `reference(ids) -> [log p(ids[i] | <i)]`
for i = 1..n-1 (the reference implementation's full-sequence forward, fp32).

    logits_match(server, model, reference, prompts, tol)  served prompt_logprobs = the reference's
    decode_equals_prefill(server, model, prompt, n, tol)  generated tokens' log-probs = scoring the text
    batch_invariant(server, model, prompts, tol, n)       a batch of different prompts = each alone
    causal(server, model, prompt, t, vocab, tol)          tokens after t never change log-probs at <= t
    isolated(server, model, prompts, tol)                 concurrent generations = each one alone
    readout_and_steering(server, width, ids, tol)         scores and steered log-probs = the HF form's
    extraction_matches(server, width, tol)                extract's HF and --server paths read one stream
    train_then_restart(server, servers_restart, ...)      /train halves the loss; the checkpoint serves the same
The last two need a server started with --training and --vectors-dir (attributes model, state_dir,
vectors_dir on the server object).
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import requests
import torch

from tests.conftest import live_view


def _post(server, body: dict, headers: dict | None = None) -> dict:
    r = requests.post(server.url + "/v1/completions", json={"temperature": 0, **body}, headers=headers or {}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def hf_model(path):
    """The architecture's Hugging Face form from a model directory, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    from vllm_plasticity.architectures import register_with_transformers

    register_with_transformers()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def reference(model):
    """`reference(ids)` for the checks below: log p(ids[i] | ids[<i]) from `model`'s full-sequence forward."""
    def run(ids: list[int]) -> list[float]:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        return [logp[i - 1, t].item() for i, t in enumerate(ids) if i > 0]
    return run


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


def batch_invariant(server, model: str, prompts: list[list[int]], tol: float, generate: int = 1) -> None:
    """The prompts sent in one request (prefilled together, those of one length as one batch in the recurrent
    layer) score as each alone; with `generate` > 1 each also continues greedily as it does alone (the state
    a batched prefill wrote into each request's slot is that request's)."""
    out = _post(server, {"model": model, "prompt": prompts, "max_tokens": generate, "prompt_logprobs": 0,
                         "logprobs": 0, "return_token_ids": True, "ignore_eos": True})
    for ids, choice in zip(prompts, sorted(out["choices"], key=lambda c: c["index"])):
        batched = [choice["prompt_logprobs"][i][str(t)]["logprob"] for i, t in enumerate(ids) if i > 0]
        gap = max_gap(batched, served_logprobs(server, model, ids))
        assert gap <= tol, f"prompt of {len(ids)} tokens: in a batch of {len(prompts)} vs alone differ by {gap:.2e}"
        if generate > 1:
            tokens, decoded = greedy(server, model, ids, generate)
            assert choice["token_ids"] == tokens, f"prompt of {len(ids)} tokens: continued otherwise in a batch"
            gap = max_gap(choice["logprobs"]["token_logprobs"], decoded)
            assert gap <= tol, f"prompt of {len(ids)} tokens: continuation in a batch vs alone differs by {gap:.2e}"


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


def readout_and_steering(server, width: int, ids: list[int], tol: float) -> None:
    """Readout of a random two-concept bank at layer 0 (the stream) while steering by 2.0 x concept a:
    the scores and the generated tokens' log-probs equal the HF form on the live weights with the same
    vector added to its stream by a forward hook."""
    from pathlib import Path

    from vllm_plasticity.contract.bank import save_bank

    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(5))
    save_bank(Path(server.vectors_dir) / "m", ["a", "b"], {0: vectors}, model="test", method="random")
    assert requests.post(server.url + "/readout/load", json={"name": "m", "path": "m"}, timeout=60).status_code == 200
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    out = _post(server, {"model": server.model, "prompt": ids, "max_tokens": 4, "return_token_ids": True, "logprobs": 0,
                         "vllm_xargs": {"readout": "m", "steer": ["m/a", 2.0]}})["choices"][0]
    seq, view, captured = ids + out["token_ids"], live_view(server), {}

    def steer(module, args, output):
        hidden, states = output
        captured["h"] = (hidden + 2.0 * unit[0])[0]
        return hidden + 2.0 * unit[0], states
    handle = view.layers[0].register_forward_hook(steer)
    try:
        with torch.no_grad():
            logp = torch.log_softmax(view(input_ids=torch.tensor([seq])).logits[0], -1)
    finally:
        handle.remove()
    scores = torch.tensor(out["readout"]["scores"])[:, 0, :]
    assert (scores - captured["h"][: len(seq) - 1] @ unit.T).abs().max().item() <= tol
    want = [logp[i - 1, t].item() for i, t in enumerate(seq) if i >= len(ids)]
    assert max_gap(out["logprobs"]["token_logprobs"], want) <= tol


def extraction_matches(server, width: int, tol: float) -> None:
    """`plasticity extract`'s two sources (the HF form in-process, and the server's readout of raw
    coordinates) read the same stream, last-token and mean pooled."""
    from plasticity_training.activations import HFSource, ServerSource

    texts = ["The lamp flickered twice.", "A letter arrived on Tuesday, unopened."]
    hf = HFSource.load(server.model).collect(texts, [0], progress=False)
    served = ServerSource(server.url).collect(texts, [0], progress=False)
    assert hf.hidden_size == served.hidden_size == width
    for pooling in ("last", "mean"):
        assert (hf.pooled[pooling][0] - served.pooled[pooling][0]).abs().max().item() <= tol


def train_then_restart(server, servers_restart, samples, steps: int, probe: list[int], args: list[str], state_dir,
                       tol: float) -> None:
    """/train on `samples` at lr 1e-2 at least halves the loss; the served log-probs of `probe` equal the HF
    form on the live weights; a fresh server from the /checkpoint agrees to 1e-6. Stops the server."""
    from vllm_plasticity.launcher import ServerProcess

    body = {"samples": [{"context_ids": s.context, "continuation_ids": s.continuation} for s in samples],
            "steps": steps, "optimizer": {"lr": 1e-2}}
    r = requests.post(server.url + "/train", json=body, timeout=900)
    assert r.status_code == 200, r.text
    losses = r.json()["losses"]
    assert losses[-1] < 0.5 * losses[0]
    served = served_logprobs(server, server.model, probe)
    with torch.no_grad():
        logp = torch.log_softmax(live_view(server)(input_ids=torch.tensor([probe])).logits[0], -1)
    assert max_gap(served, [logp[i - 1, t].item() for i, t in enumerate(probe) if i > 0]) <= tol

    assert requests.post(server.url + "/checkpoint", json={}, timeout=600).status_code == 200
    ckpt = server.state_dir / "checkpoints" / "main"
    servers_restart.stop()
    fresh = servers_restart.start("restored", lambda log_path: ServerProcess.plasticity(
        ckpt, extra_args=[*args, "--state-dir", str(state_dir)], log_path=log_path))
    name = requests.get(fresh.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    assert max_gap(served_logprobs(fresh, name, probe), served) <= 1e-6
    servers_restart.stop()
