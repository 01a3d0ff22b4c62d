"""The type and valid range of every field a project architecture reads from its config.json, checked before
anything is built. Standard library only (the config modules that use it are read by vLLM's config hook,
the trainer and the importer alike).

A config.json is input like any request body: a negative width, a boolean where a count goes or a width of
10**12 must be refused naming the field, the value and the valid range, not reach a tensor allocation.
Each architecture's config module lists its fields once (FIELDS) and calls `check_fields`; its relational
rules (divisibility, one field needing another) come after, on values known to be in range.

    >>> check_fields("tkc", {"d_model": -4}, {"d_model": Int(2, 65536)})
    UnsupportedConfig: tkc.d_model=-4 is out of range: needs an integer in [2, 65536]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

# Shared bounds. Widths are per-token vector sizes; counts are numbers of layers, heads, experts, bands
# (each one a module built in Python, so a count also bounds the time to build); lengths are positions.
MAX_WIDTH = 65536
MAX_COUNT = 1024
MAX_LENGTH = 1 << 24  # 16,777,216 positions
MAX_VOCAB = 1 << 24


class UnsupportedConfig(ValueError):
    """A project architecture's configuration the project cannot serve; the message names the field and why.
    Every architecture raises this one class (its config module, vLLM's config hook, `plasticity import`)."""


@dataclasses.dataclass(frozen=True)
class Int:
    """An integer (not a boolean) in [lo, hi]."""

    lo: int
    hi: int

    def needs(self, value: object) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and self.lo <= value <= self.hi
        return None if ok else f"an integer in [{self.lo}, {self.hi}]"


@dataclasses.dataclass(frozen=True)
class Real:
    """A finite number (an integer is fine, a boolean is not) between lo and hi, each end included unless
    `open_lo` / `open_hi`."""

    lo: float
    hi: float
    open_lo: bool = False
    open_hi: bool = False

    def needs(self, value: object) -> str | None:
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = (number and (self.lo < value if self.open_lo else self.lo <= value)
              and (value < self.hi if self.open_hi else value <= self.hi))
        interval = f"{'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}{')' if self.open_hi else ']'}"
        return None if ok else f"a finite number in {interval}"


@dataclasses.dataclass(frozen=True)
class Flag:
    def needs(self, value: object) -> str | None:
        return None if isinstance(value, bool) else "true or false"


@dataclasses.dataclass(frozen=True)
class OneOf:
    options: tuple[str, ...]
    refusal: str = "is not supported"  # what the message says of a value outside the options

    def needs(self, value: object) -> str | None:
        return None if isinstance(value, str) and value in self.options else f"one of {list(self.options)}"


@dataclasses.dataclass(frozen=True)
class Ints:
    """A list of integers, each in [lo, hi], at most `longest` of them."""

    lo: int
    hi: int
    longest: int

    def needs(self, value: object) -> str | None:
        each = Int(self.lo, self.hi)
        ok = isinstance(value, (list, tuple)) and len(value) <= self.longest and all(each.needs(v) is None for v in value)
        return None if ok else f"a list of at most {self.longest} integers, each in [{self.lo}, {self.hi}]"


Rule = Int | Real | Flag | OneOf | Ints


def check_fields(prefix: str, fields: Mapping[str, object], rules: Mapping[str, Rule]) -> None:
    """Raise UnsupportedConfig for the first field present in `fields` that its rule refuses (absent fields take the
    architecture's defaults, which are in range)."""
    for name, rule in rules.items():
        if name in fields:
            need = rule.needs(fields[name])
            if need is not None:
                refusal = rule.refusal if isinstance(rule, OneOf) else "is out of range"
                raise UnsupportedConfig(f"{prefix}.{name}={_shown(fields[name])} {refusal}: needs {need}")


def check_vocab_size(prefix: str, vocab_size: object) -> None:
    """config.json's top-level vocab_size sizes the embedding and the head of every architecture."""
    need = Int(1, MAX_VOCAB).needs(vocab_size)
    if need is not None:
        raise UnsupportedConfig(f"{prefix}: vocab_size={_shown(vocab_size)} is out of range: needs {need}")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
