"""What a request may ask of the residual tap, checked the same way in the API server and the worker.

Imports nothing from vLLM or torch: the API server rejects bad settings with a 400 before a request
reaches the engine, and the worker re-checks against the banks it holds when the request runs.

Per request (vLLM's `vllm_xargs` over HTTP, `SamplingParams.extra_args` offline, or top-level JSON fields):
    readout: "<bank>"                          score every token against the bank's concepts
    steer: ["<bank>/<concept>", coef, ...]     add coef * unit vector at each of the bank's layers
    steer_layers: [L, ...]                     only at these of the bank's layers

Coefficients are JSON numbers (not booleans) with |coef| <= MAX_STEER_COEFFICIENT.
"""

from __future__ import annotations

import math

# The largest |coefficient| a steering term may have. Concept vectors are unit vectors, so this is the
# norm added to the residual stream; real models' streams have norms in the tens to thousands, so 1e6
# is far beyond any useful strength while the sum of many such terms over many layers stays many orders
# of magnitude inside the float32 steering buffer and a bf16/fp32 stream (the tap also clamps what it
# adds, see residual_tap.py).
MAX_STEER_COEFFICIENT = 1e6


def is_number(value: object) -> bool:
    """A JSON number: int or float, never a bool (JSON `true` must not be read as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class SteeringError(ValueError):
    """A request's readout/steering settings do not fit the loaded banks; the message says why."""


SteerTerm = tuple[str, str, float, tuple[int, ...]]  # (bank, concept, coef, layers)


def check_steer(steer: object, steer_layers: object, banks: dict[str, tuple[list[str], list[int]]]) -> list[SteerTerm]:
    """Check a request's `steer` / `steer_layers` against the loaded banks ({name: (concepts, layers)}).

    `steer` is a flat list [bank/concept, coef, bank/concept, coef, ...]; each coef times the concept's
    unit vector is added at each of the bank's layers (those also in `steer_layers`, when given).
    Pure Python: the API server answers 400 with this message before a request reaches the engine.

        >>> check_steer(["emotions/joy", 4.0], None, {"emotions": (["joy", "fear"], [2])})
        [('emotions', 'joy', 4.0, (2,))]
    """
    if not isinstance(steer, (list, tuple)) or len(steer) % 2:
        raise SteeringError('steer must be a flat list of pairs: ["bank/concept", coef, ...]')
    if steer_layers is not None and (not isinstance(steer_layers, (list, tuple)) or not all(
            isinstance(L, int) and not isinstance(L, bool) for L in steer_layers)):
        raise SteeringError("steer_layers must be a list of layer indices")
    wanted = set(steer_layers) if steer_layers is not None else None
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
        if concept not in concepts:
            raise SteeringError(f"steer: bank {bank_name!r} has no concept {concept!r}")
        layers = tuple(L for L in bank_layers if wanted is None or L in wanted)
        if not layers:
            raise SteeringError(f"steer: bank {bank_name!r} has none of steer_layers {sorted(wanted)} "
                                f"(its layers: {bank_layers})")
        terms.append((bank_name, concept, float(coef), layers))
    return terms
