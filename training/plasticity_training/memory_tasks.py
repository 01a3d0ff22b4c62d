"""The four synthetic memory tasks of Transformer Killer Core's seed (copy_memory, assoc_recall,
selective_copy, induction), as token-id sequences any served model can be scored on.

Format (every task): token ids in a 16-token vocabulary, 0 = blank (padding / noise), 15 = delimiter;
content tokens are 1..14 as each task says. A sample is `Sample(ids, scored)`: `scored` are the positions
whose token the model must predict from the tokens before it (next-token prediction, as a causal LM is
trained and served); everything else only conditions. Accuracy = the fraction of scored tokens that are the
model's top-1 prediction.

    copy_memory(n=8, delay)      n content tokens (1..8), `delay` blanks, 15, the same n tokens   (scored: last n)
    assoc_recall(pairs)          k1 v1 ... kP vP (keys 1..7 distinct, values 8..14), 15, kq vq   (scored: vq)
    selective_copy(n=6, length)  `length` positions of blanks with n content tokens (1..8) at random
                                 places, 15, the n tokens in order                                   (scored: last n)
    induction(length)            random tokens 1..14 with a bigram A B placed once, 15, A B          (scored: B)

    >>> rng = random.Random(0)
    >>> s = copy_memory(rng, delay=32)
    >>> s.ids[:8], s.scored                  # context, and the positions a model must get right
"""

from __future__ import annotations

import dataclasses
import random

VOCAB = 16
BLANK, DELIMITER = 0, 15
TASKS = ("copy_memory", "assoc_recall", "selective_copy", "induction")


@dataclasses.dataclass(frozen=True)
class Sample:
    ids: list[int]
    scored: list[int]  # positions (indices into ids) to predict from what comes before

    @property
    def context(self) -> list[int]:
        """The tokens before the first scored position (a /train context)."""
        return self.ids[: self.scored[0]]

    @property
    def continuation(self) -> list[int]:
        """The scored tokens and what follows them (a /train continuation)."""
        return self.ids[self.scored[0]:]


def copy_memory(rng: random.Random, delay: int, n: int = 8) -> Sample:
    content = [rng.randint(1, 8) for _ in range(n)]
    ids = content + [BLANK] * delay + [DELIMITER] + content
    return Sample(ids, list(range(len(ids) - n, len(ids))))


def assoc_recall(rng: random.Random, pairs: int = 6) -> Sample:
    keys = rng.sample(range(1, 8), pairs)
    values = [rng.randint(8, 14) for _ in keys]
    q = rng.randrange(pairs)
    ids = [t for kv in zip(keys, values) for t in kv] + [DELIMITER, keys[q], values[q]]
    return Sample(ids, [len(ids) - 1])


def selective_copy(rng: random.Random, length: int, n: int = 6) -> Sample:
    body = [BLANK] * length
    places = sorted(rng.sample(range(length), n))
    content = [rng.randint(1, 8) for _ in range(n)]
    for p, c in zip(places, content):
        body[p] = c
    ids = body + [DELIMITER] + content
    return Sample(ids, list(range(len(ids) - n, len(ids))))


def induction(rng: random.Random, length: int) -> Sample:
    a, b = rng.sample(range(1, 15), 2)
    body = [rng.choice([t for t in range(1, 15) if t != a]) for _ in range(length)]
    at = rng.randrange(0, max(1, length - 1))
    body[at], body[at + 1] = a, b
    ids = body + [DELIMITER, a, b]
    return Sample(ids, [len(ids) - 1])


def make(task: str, rng: random.Random, span: int) -> Sample:
    """One sample of `task` whose memory span (delay or length) is `span`."""
    if task == "copy_memory":
        return copy_memory(rng, delay=span)
    if task == "assoc_recall":
        return assoc_recall(rng, pairs=max(2, min(7, span // 4)))
    if task == "selective_copy":
        return selective_copy(rng, length=max(8, span))
    if task == "induction":
        return induction(rng, length=max(4, span))
    raise ValueError(f"Invalid task {task!r} (expected one of {TASKS})")
