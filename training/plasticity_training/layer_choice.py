"""`--layers auto`: the layer, or the few layers read together, whose concept vectors name held-out texts best,
measured on the model at hand.

Runs in the extraction process.

    >>> choice = choose_layers(contrasts, candidate_layers, num_layers)   # contrasts built with whiten=True
    >>> choice.layers, choice.reason, choice.per_layer[choice.layers[0]]["accuracy"], choice.combined

Every candidate layer is scored by the held-out top-1 accuracy (held_out.py: the readout's calibrated
scores on texts left out of everything) of the lda method, whatever method the bank is extracted with: lda
costs a few triangular solves per layer, so scoring all of a model's layers costs little beside the forward
pass that collected them, and it ranks layers as the other methods do (SmolLM2-135M-Instruct: lda and
pooled both peak at layers 15-21 of 30; research/results/concepts_real.md). Ties go to the shallower layer
(cheaper to read, and steering there leaves more layers to act).

Then layers are added while reading them together names held-out texts better: a bank of several layers is
read as the mean of its calibrated scores (they share one scale), so a second layer helps where its errors
differ from the first's. Forward selection among the CANDIDATES best single layers, one at a time, each kept
only if held-out top-1 rises by at least MIN_GAIN and MIN_TEXTS texts, at most MAX_LAYERS (each layer read costs the server a
dot product per token). On SmolLM2-135M-Instruct the best single layer (15) named 32.7% of held-out texts and
layers 15 and 21 together 34.3%; no third layer added more (research/results/concepts_real.md).
A corpus where no concept has two texts cannot be measured: the fallback is the relative depth FALLBACK_DEPTH,
and the reason says so.
"""

from __future__ import annotations

import dataclasses

from plasticity_training.activations import DEFAULT_LAYERS, resolve_layers
from plasticity_training.held_out import accuracy_of, held_out_folds, held_out_scores
from plasticity_training.methods import get_method
from plasticity_training.vectors import Contrasts

AUTO = "auto"
FALLBACK_DEPTH = DEFAULT_LAYERS  # a relative depth, when nothing can be held out
SCORING_METHOD = "lda"
MAX_LAYERS = 3  # a bank read at more layers costs the server more per token
CANDIDATES = 6  # layers added are drawn from the best single layers
MIN_GAIN = 0.005  # held-out top-1 a layer must add (2-3 texts of 500 on SmolLM2's corpus) ...
MIN_TEXTS = 2  # ... and never fewer than 2 more texts named: on a small corpus one text is noise


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    layers: list[int]  # ascending
    reason: str  # one line for the log and the report
    per_layer: dict[int, dict]  # layer -> {"accuracy", "top5"} (empty when nothing could be held out)
    combined: dict | None = None  # {"accuracy", "top5"} of the chosen layers read together (None: nothing measured)

    def record(self) -> dict:
        """What the bank's settings and the report keep."""
        return {"chosen": self.layers, "reason": self.reason, "scored_by": SCORING_METHOD, "combined": self.combined,
                "per_layer": {str(L): v for L, v in self.per_layer.items()}}


def choose_layers(contrasts: Contrasts, layers: list[int], num_layers: int) -> LayerChoice:
    """The candidate layers read best together, by held-out top-1 accuracy (module docstring). `contrasts` must
    have been built with whiten=True (the scoring method is lda)."""
    folds = held_out_folds(contrasts)
    if not folds:
        layer = resolve_layers(FALLBACK_DEPTH, num_layers)[0]
        return LayerChoice([layer], f"no concept has two texts, so no layer can be measured: layer {layer} "
                                    f"(relative depth {FALLBACK_DEPTH})", {})
    method = get_method(SCORING_METHOD)
    scores = {L: held_out_scores(contrasts, method, L, folds) for L in layers}
    figures = lambda fold_scores: {k: round(v, 4) for k, v in accuracy_of(contrasts, fold_scores, folds).items()  # noqa: E731
                                   if k in ("accuracy", "top5", "evaluated")}
    per_layer = {L: figures(scores[L]) for L in layers}
    ranked = sorted(layers, key=lambda L: (-per_layer[L]["accuracy"], -per_layer[L]["top5"], L))
    chosen, summed, combined = [ranked[0]], scores[ranked[0]], per_layer[ranked[0]]
    while len(chosen) < MAX_LAYERS:
        trials = []
        for L in ranked[:CANDIDATES]:
            if L not in chosen:
                trial = [a + b for a, b in zip(summed, scores[L])]
                trials.append(((figures(trial)), L, trial))
        if not trials:
            break
        best, L, trial = max(trials, key=lambda t: (t[0]["accuracy"], t[0]["top5"], -t[1]))
        if best["accuracy"] < combined["accuracy"] + max(MIN_GAIN, MIN_TEXTS / best["evaluated"]) - 1e-9:
            break
        chosen, summed, combined = chosen + [L], trial, best
    single = ranked[0]
    others = ", ".join(f"{L} {per_layer[L]['accuracy']:.1%}" for L in ranked[1:4])
    scope = f"over {len(layers)} layers scored by {SCORING_METHOD} with {len(folds)} folds"
    if len(chosen) == 1:
        reason = (f"layer {single}: held-out top-1 {combined['accuracy']:.1%} (top-5 {combined['top5']:.1%}) {scope}; "
                  f"next best {others}; no second layer read with it named more held-out texts by {MIN_GAIN:.1%} "
                  f"and {MIN_TEXTS} texts")
    else:
        reason = (f"layers {', '.join(map(str, sorted(chosen)))} read together: held-out top-1 {combined['accuracy']:.1%} "
                  f"(top-5 {combined['top5']:.1%}) against {per_layer[single]['accuracy']:.1%} for the best single layer, "
                  f"{single}, {scope}; next best single {others}")
    return LayerChoice(sorted(chosen), reason, per_layer, combined)
