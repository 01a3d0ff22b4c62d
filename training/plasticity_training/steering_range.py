"""The steering strengths a bank is good for, measured on the model it was extracted from.

Natural units make one number the same displacement for every concept (its texts' mean offset from the
corpus average, calibration.py), but not what a given model does with that displacement: SmolLM2-135M-
Instruct's tone moved at 4 and its text broke at 8, the built-in model's completion starts to change at 2-4
(research/results/steering_real.md). So the extractor measures it. For a sample of the bank's concepts it
scores neutral text (the corpus's baselines), teacher-forced, plain and steered (the contract's
natural_steering added to the residual stream after the bank's layer, where the server's steering adds it)
for strengths on a grid, and records how much less likely steering makes that text: the perplexity ratio
steered / plain, the median over the sampled concepts.

    low  = the smallest strength whose ratio reaches NOTICEABLE: the model's predictions on text that has
           nothing to do with the concept have started to move
    high = the largest strength whose ratio stays within FLUENT

The thresholds come from the one model where steering was judged independently, SmolLM2-135M-Instruct at
layer 15, in both units the project has had: with each concept's mean offset, angry and afraid moved the
judge by 0.30 and 0.24 at strength 2 (ratio 1.10) and three negative concepts passed at 4 (ratio 1.67, the
generated text still fluent), and at 8 (ratio 4.99) the text broke for most; with one corpus standard deviation along
the lda vector (banks before steer rows), tone moved at 32 (ratio 1.13) and broke at 64 (1.77)
(research/results/steering_real.md, steering_real_lda_std.md). Measuring costs 1 + len(STRENGTHS) *
MAX_CONCEPTS forwards of MAX_TEXTS short texts (49 forwards of 4 x 48 tokens; about 25 s on 2 CPU cores for
a 135M model).

The range is written beside the unit it counts, in the bank's calibration (readout.json's
calibration.steering_range, per layer), logged by the extractor, and shown by the page beside its sliders.

    >>> ids = neutral_ids(tokenize, baseline_texts)
    >>> found = measure_range(hf_nll(model, blocks[layer], vectors[layer], scales[layer], steer[layer]), ids, layer,
    ...                       concepts)
    >>> found.low, found.high, found.reason()
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

# natural units, x sqrt(2) where the measured ranges fall (SmolLM2's perplexity ratio went 1.10 -> 1.67 from 2 to 4:
# one doubling can step over the whole range), then doubling
STRENGTHS = (0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6, 8.0, 16.0, 32.0, 64.0)
NOTICEABLE = 1.1  # perplexity ratio at which steering has started to move the model's predictions
FLUENT = 1.7  # the largest perplexity ratio at which steered text still reads as text (module docstring)
MAX_CONCEPTS = 4  # concepts sampled, evenly spaced over the bank's list
MAX_TEXTS = 4  # neutral texts scored
TEXT_TOKENS = 48  # each text's first tokens (the batch is cut to the shortest, at least MIN_TOKENS)
MIN_TOKENS = 16

# (token ids (B, T), concept index or None for plain, strength in natural units) -> mean negative
# log-likelihood per predicted token, the concept's vector added after the measured layer
SteeredNll = Callable[[Tensor, "int | None", float], float]


@dataclasses.dataclass(frozen=True)
class SteeringRange:
    layer: int
    low: float | None  # None: no strength on the grid moved the predictions that much
    high: float | None  # None: even the smallest strength broke the text
    ratios: dict[float, float]  # strength -> median perplexity ratio over the sampled concepts
    concepts: list[str]
    n_texts: int
    n_tokens: int

    def record(self) -> dict:
        return {"layer": self.layer, "low": self.low, "high": self.high, "noticeable": NOTICEABLE, "fluent": FLUENT,
                "perplexity_ratio": {f"{s:g}": round(r, 4) for s, r in self.ratios.items()},
                "concepts": self.concepts, "n_texts": self.n_texts, "n_tokens": self.n_tokens}

    def reason(self) -> str:
        curve = ", ".join(f"{s:g}: {r:.2f}x" for s, r in self.ratios.items())
        if self.low is None:
            verdict = f"no strength up to {max(self.ratios):g} moved neutral text's perplexity by {NOTICEABLE:g}x"
        elif self.high is None or self.high < self.low:
            verdict = (f"steering breaks the text (perplexity > {FLUENT:g}x) before it moves it: no usable strength "
                       f"on this layer")
        elif self.high == self.low:
            verdict = f"recommended strength {self.low:g} (natural units)"
        else:
            verdict = f"recommended strength {self.low:g} to {self.high:g} (natural units)"
        return (f"layer {self.layer}: {verdict}; perplexity of neutral text steered / plain by strength, median of "
                f"{len(self.concepts)} concepts over {self.n_texts} texts: {curve}")


def choose_range(ratios: dict[float, float], layer: int, concepts: Sequence[str], n_texts: int,
                 n_tokens: int) -> SteeringRange:
    """The range from a measured curve (strength -> median perplexity ratio)."""
    strengths = sorted(ratios)
    low = next((s for s in strengths if ratios[s] >= NOTICEABLE), None)
    fluent = [s for s in strengths if ratios[s] <= FLUENT]
    high = fluent[-1] if fluent else None
    return SteeringRange(layer, low, high, {s: ratios[s] for s in strengths}, list(concepts), n_texts, n_tokens)


def sample_concepts(concepts: Sequence[str], k: int = MAX_CONCEPTS) -> list[int]:
    """Up to k indices evenly spaced over the bank's concepts (deterministic: the same bank, the same sample)."""
    n = len(concepts)
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def measure_range(nll: SteeredNll, ids: Tensor, layer: int, concepts: Sequence[str],
                  strengths: Sequence[float] = STRENGTHS) -> SteeringRange:
    """Measure the curve with `nll` on the texts `ids` (B, T) for a sample of the bank's `concepts` at
    `layer`, then choose the range."""
    picked = sample_concepts(concepts)
    plain = nll(ids, None, 0.0)
    ratios = {}
    for strength in strengths:
        per_concept = [math.exp(min(nll(ids, k, strength) - plain, 50.0)) for k in picked]
        ratios[float(strength)] = float(torch.tensor(per_concept).median())
    return choose_range(ratios, layer, [concepts[k] for k in picked], ids.shape[0], ids.shape[0] * (ids.shape[1] - 1))


def neutral_ids(tokenize: Callable[[str], list[int]], texts: Sequence[str]) -> Tensor | None:
    """Up to MAX_TEXTS texts' first tokens as one (B, T) batch cut to the shortest (no padding to mask);
    None when fewer than MIN_TOKENS tokens are available."""
    encoded = [tokenize(t)[:TEXT_TOKENS] for t in texts[:MAX_TEXTS]]
    encoded = [e for e in encoded if len(e) >= MIN_TOKENS]
    if not encoded:
        return None
    length = min(len(e) for e in encoded)
    return torch.tensor([e[:length] for e in encoded])


def hf_nll(model: torch.nn.Module, block: torch.nn.Module, vectors: Tensor, scales: Tensor,
           steer: Tensor | None = None) -> SteeredNll:
    """A SteeredNll for a Hugging Face model in process: what `strength` natural units of concept k add
    (the contract's natural_steering: strength * steer[k], or strength * scales[k] * vectors[k] for a bank
    without steer rows) added to `block`'s output stream (vectors (C, H) unit rows, scales (C,), steer
    (C, H): the bank's calibration at that layer)."""
    from vllm_plasticity.contract.bank import natural_steering

    device = next(model.parameters()).device

    def nll(ids: Tensor, concept: int | None, strength: float) -> float:
        handle = None
        if concept is not None:
            vector = natural_steering(strength, vectors[concept].float(), float(scales[concept]),
                                      None if steer is None else steer[concept]).to(device)

            def add(module, args, output):
                if isinstance(output, tuple):
                    return (output[0] + vector.to(output[0].dtype), *output[1:])
                return output + vector.to(output.dtype)

            handle = block.register_forward_hook(add)
        try:
            with torch.no_grad():
                ids_d = ids.to(device)
                logits = model(input_ids=ids_d).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids_d[:, 1:].reshape(-1))
        finally:
            if handle is not None:
                handle.remove()
        return float(loss)

    return nll


def server_nll(call: Callable[..., dict], served_name: str, bank: str, concepts: Sequence[str],
               layer: int) -> SteeredNll:
    """A SteeredNll through a running server: the bank (loaded as `bank`) steers the prompts with the
    server's own steering, in natural units, at `layer`; `call(method, path, body)` sends one request."""

    def nll(ids: Tensor, concept: int | None, strength: float) -> float:
        body = {"model": served_name, "prompt": ids.tolist(), "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
        if concept is not None:
            body["vllm_xargs"] = {"steer": [f"{bank}/{concepts[concept]}", strength], "steer_layers": [layer],
                                  "steer_units": "natural"}
        choices = sorted(call("post", "/v1/completions", body)["choices"], key=lambda c: c["index"])
        total, count = 0.0, 0
        for row, choice in zip(ids.tolist(), choices, strict=True):
            entries = choice["prompt_logprobs"]  # per position: {token id: {"logprob": ...}}; None at 0
            for i in range(1, len(row)):
                total -= entries[i][str(row[i])]["logprob"]
                count += 1
        return total / count

    return nll


def neutral_texts(corpus) -> list[str]:
    """The texts steering is measured on: the corpus's baselines (scenes told without an emotion), else all."""
    return [corpus.texts[i].text for i in corpus.baselines()] or [t.text for t in corpus.texts]


def measure_bank(source, bank_dir: Path, concepts: Sequence[str], vectors: dict[int, Tensor],
                 calibration, corpus, log) -> dict[int, SteeringRange]:
    """The range at each of the bank's layers, measured through `source` (an HFSource in process, or a
    ServerSource: then the bank, already saved at `bank_dir`, must lie in the server's vectors directory,
    where it is loaded under a temporary name and unloaded after; `calibration` is the bank's). Empty, with
    the reason logged, when it cannot be measured."""
    from plasticity_training.activations import HFSource

    texts = neutral_texts(corpus)
    if isinstance(source, HFSource):
        ids = neutral_ids(lambda t: source.tokenizer(t)["input_ids"], texts)
        if ids is None:
            log(f"[extract] steering range not measured: no neutral text of at least {MIN_TOKENS} tokens")
            return {}
        steer = calibration.steer or {}
        return {L: measure_range(hf_nll(source.model, source.blocks[L], vectors[L], calibration.scale[L], steer.get(L)),
                                 ids, L, concepts)
                for L in vectors}
    root = Path(source.call("get", "/readout/available")["vectors_dir"])
    try:
        relative = bank_dir.resolve().relative_to(root)
    except ValueError:
        log(f"[extract] steering range not measured: the bank is outside the server's vectors directory {root} "
            "(extract into it, --out DIR/NAME, to measure it through the server)")
        return {}
    ids = neutral_ids(lambda t: source.call("post", "/tokenize", {"model": source.served_name, "prompt": t})["tokens"],
                      texts)
    if ids is None:
        log(f"[extract] steering range not measured: no neutral text of at least {MIN_TOKENS} tokens")
        return {}
    name = f"steering-range-{os.getpid()}"
    source.call("post", "/readout/load", {"name": name, "path": str(relative)})
    try:
        return {L: measure_range(server_nll(source.call, source.served_name, name, concepts, L), ids, L, concepts)
                for L in vectors}
    finally:
        source.call("delete", f"/readout/{name}")
