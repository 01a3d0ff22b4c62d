"""What a request may ask of the residual tap, checked the same way in the API server and the worker.

Imports nothing from vLLM or torch: the API server rejects bad settings with a 400 before a request
reaches the engine, and the worker re-checks against the banks it holds when the request runs.

Per request (vLLM's `vllm_xargs` over HTTP, `SamplingParams.extra_args` offline, or top-level JSON fields):
    readout: "<bank>"                          score every token against the bank's concepts
    steer: ["<bank>/<concept>", coef, ...]     add coef * unit vector at each of the bank's layers
    steer_layers: [L, ...]                     only at these of the bank's layers
    steer_units: "natural" | "raw"             what coef counts (default: natural for calibrated banks)

Units: "natural" counts the corpus's standard deviation along the concept at the layer (its calibration scale s, contract
bank.py): strength coef adds coef * s * unit vector, which raises that layer's calibrated score by coef,
so the same number does comparable things across concepts, layers and models; only calibrated banks have
it. "raw" adds coef * unit vector (a norm in the stream's own units). Unset, each term takes natural
units if its bank is calibrated, raw otherwise (banks extracted before calibration steer as they did).

Coefficients are JSON numbers (not booleans) with |coef| <= MAX_STEER_COEFFICIENT (in the units given);
at most MAX_STEER_TERMS terms and MAX_STEER_LAYERS layer indices per request.
"""

from __future__ import annotations

import math

# The largest |coefficient| a steering term may have, in the units the request gives. Concept vectors are
# unit vectors, so in raw units this is the norm added to the residual stream (natural units multiply it
# by the concept's scale, itself a typical distance between states of the stream); real models' streams
# have norms in the tens to thousands, so 1e6 is far beyond any useful strength while the sum of many such
# terms over many layers stays many orders of magnitude inside the float32 steering buffer and a bf16/fp32
# stream (the tap also clamps what it adds, see residual_tap.py).
MAX_STEER_COEFFICIENT = 1e6

# The most terms one request may steer with. The page sends one term per slider (a bank has at most the
# readout capacity, 256 by default, of concepts), so 1024 is generous; without a bound, one 45 MB body of
# 3,000,000 terms held the API server's event loop and the engine's step for a minute.
MAX_STEER_TERMS = 1024
# The most entries `steer_layers` may have: more than any model has layers (duplicates are allowed).
MAX_STEER_LAYERS = 1024


def is_number(value: object) -> bool:
    """A JSON number: int or float, never a bool (JSON `true` must not be read as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class SteeringError(ValueError):
    """A request's readout/steering settings do not fit the loaded banks; the message says why."""


def check_steer_size(steer: object, steer_layers: object = None) -> None:
    """Refuse more than MAX_STEER_TERMS terms (a flat list of pairs, or {"bank/concept": coef}) or more than
    MAX_STEER_LAYERS steer_layers, before anything looks at the terms: a refusal costs the same whatever the
    size of the body."""
    if isinstance(steer, (list, tuple, dict)):
        terms = len(steer) if isinstance(steer, dict) else len(steer) // 2
        if terms > MAX_STEER_TERMS:
            raise SteeringError(f"steer has {terms} terms; at most {MAX_STEER_TERMS} are allowed per request")
    if isinstance(steer_layers, (list, tuple)) and len(steer_layers) > MAX_STEER_LAYERS:
        raise SteeringError(f"steer_layers has {len(steer_layers)} entries; at most {MAX_STEER_LAYERS} are allowed")


STEER_UNITS = ("natural", "raw")

SteerTerm = tuple[str, str, float, tuple[int, ...], bool]  # (bank, concept, coef, layers, natural units)


def check_steer(steer: object, steer_layers: object, banks: dict[str, tuple[list[str], list[int]]],
                steer_units: object = None, calibrated: frozenset[str] | set[str] = frozenset()) -> list[SteerTerm]:
    """Check a request's `steer` / `steer_layers` / `steer_units` against the loaded banks ({name:
    (concepts, layers)}; `calibrated`: the names of those that carry a calibration).

    `steer` is a flat list [bank/concept, coef, bank/concept, coef, ...]; each coef times the concept's
    unit vector (times its scale at the layer, in natural units) is added at each of the bank's layers
    (those also in `steer_layers`, when given). Pure Python: the API server answers 400 with this
    message before a request reaches the engine.

        >>> check_steer(["emotions/joy", 4.0], None, {"emotions": (["joy", "fear"], [2])})
        [('emotions', 'joy', 4.0, (2,), False)]
    """
    check_steer_size(steer, steer_layers)
    if steer_units is not None and steer_units not in STEER_UNITS:
        raise SteeringError(f"steer_units must be one of {list(STEER_UNITS)} (or unset: natural for calibrated "
                            f"banks, raw otherwise), got {steer_units!r}")
    if not isinstance(steer, (list, tuple)) or len(steer) % 2:
        raise SteeringError('steer must be a flat list of pairs: ["bank/concept", coef, ...]')
    if steer_layers is not None and (not isinstance(steer_layers, (list, tuple)) or not all(
            isinstance(L, int) and not isinstance(L, bool) for L in steer_layers)):
        raise SteeringError("steer_layers must be a list of layer indices")
    wanted = set(steer_layers) if steer_layers is not None else None
    known: dict[str, set[str]] = {}  # concept names of the banks named so far (a basis bank has thousands)
    terms = []
    for target, coef in zip(steer[::2], steer[1::2]):
        if not isinstance(target, str) or "/" not in target:
            raise SteeringError(f'steer target {target!r} is not "bank/concept"')
        if not is_number(coef) or not math.isfinite(coef) or abs(coef) > MAX_STEER_COEFFICIENT:
            raise SteeringError(f"steer coefficient for {target} must be a finite number with "
                                f"|coef| <= {MAX_STEER_COEFFICIENT:g}, got {coef!r}")
        bank_name, concept = target.split("/", 1)
        if bank_name not in banks:
            raise SteeringError(f"steer: no bank {bank_name!r} is loaded (loaded: {sorted(banks)})")
        concepts, bank_layers = banks[bank_name]
        if bank_name not in known:
            known[bank_name] = set(concepts)
        if concept not in known[bank_name]:
            raise SteeringError(f"steer: bank {bank_name!r} has no concept {concept!r}")
        layers = tuple(L for L in bank_layers if wanted is None or L in wanted)
        if not layers:
            raise SteeringError(f"steer: bank {bank_name!r} has none of steer_layers {sorted(wanted)} "
                                f"(its layers: {bank_layers})")
        natural = steer_units == "natural" or (steer_units is None and bank_name in calibrated)
        if natural and bank_name not in calibrated:
            raise SteeringError(f"steer_units natural: bank {bank_name!r} carries no calibration, so it has no "
                                "natural unit (extract it again with calibration, or steer it with steer_units raw)")
        terms.append((bank_name, concept, float(coef), layers, natural))
    return terms
