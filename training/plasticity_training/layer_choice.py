"""`--layers auto`: the layer whose concept vectors name held-out texts best, measured on the model at hand.

Runs in the extraction process.

    >>> choice = choose_layer(contrasts, candidate_layers)     # contrasts built with whiten=True
    >>> choice.layer, choice.reason, choice.per_layer[choice.layer]["accuracy"]

Every candidate layer is scored by the held-out top-1 accuracy (held_out.py: the readout's calibrated
scores on texts left out of everything) of the lda method, whatever method the bank is extracted with: lda
costs a few triangular solves per layer, so scoring all of a model's layers costs little beside the forward
pass that collected them, and it ranks layers as the other methods do (SmolLM2-135M-Instruct: lda and
pooled both peak at layers 15-21 of 30; research/results/concepts_real.md). Ties go to the shallower layer
(cheaper to read, and steering there leaves more layers to act). A corpus where no concept has two texts
cannot be measured: the fallback is the relative depth FALLBACK_DEPTH, and the reason says so.
"""

from __future__ import annotations

import dataclasses

from plasticity_training.activations import DEFAULT_LAYERS, resolve_layers
from plasticity_training.held_out import held_out_accuracy, held_out_folds
from plasticity_training.methods import get_method
from plasticity_training.vectors import Contrasts

AUTO = "auto"
FALLBACK_DEPTH = DEFAULT_LAYERS  # a relative depth, when nothing can be held out
SCORING_METHOD = "lda"


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    layer: int
    reason: str  # one line for the log and the report
    per_layer: dict[int, dict]  # layer -> {"accuracy", "top5"} (empty when nothing could be held out)

    def record(self) -> dict:
        """What the bank's settings and the report keep."""
        return {"chosen": self.layer, "reason": self.reason, "scored_by": SCORING_METHOD,
                "per_layer": {str(L): v for L, v in self.per_layer.items()}}


def choose_layer(contrasts: Contrasts, layers: list[int], num_layers: int) -> LayerChoice:
    """The candidate layer with the best held-out top-1 accuracy (module docstring). `contrasts` must have
    been built with whiten=True (the scoring method is lda)."""
    folds = held_out_folds(contrasts)
    if not folds:
        layer = resolve_layers(FALLBACK_DEPTH, num_layers)[0]
        return LayerChoice(layer, f"no concept has two texts, so no layer can be measured: layer {layer} "
                                  f"(relative depth {FALLBACK_DEPTH})", {})
    method = get_method(SCORING_METHOD)
    per_layer = {}
    for L in layers:
        result = held_out_accuracy(contrasts, method, L, folds)
        per_layer[L] = {"accuracy": round(result["accuracy"], 4), "top5": round(result["top5"], 4)}
    best = max(layers, key=lambda L: (per_layer[L]["accuracy"], per_layer[L]["top5"], -L))
    reason = (f"layer {best}: held-out top-1 {per_layer[best]['accuracy']:.1%} (top-5 {per_layer[best]['top5']:.1%}) "
              f"over {len(layers)} layers scored by {SCORING_METHOD} with {len(folds)} folds; next best "
              + ", ".join(f"{L} {per_layer[L]['accuracy']:.1%}" for L in sorted(layers, key=lambda L: -per_layer[L]['accuracy'])[1:4]))
    return LayerChoice(best, reason, per_layer)
