"""The quality report: quality.json, summary.txt and PNG plots beside the bank.

Runs in the extraction process (`plasticity extract --report`).

    >>> report = build_report(contrasts, extraction, method, settings={"method": "pooled"})
    >>> paths = write_report(report, extraction, contrasts.corpus, "bank/")   # quality.json, summary.txt, *.png

Per concept and layer (quality.py has the definitions): first-PC variance ratio and agreement of the
positives' deltas, per-text alignment cosines with the two worst outliers, nearest concepts, best
single-neuron alignment against the MLP down-projection columns, per-head decomposition of the token
mixer's write (attention heads, or a Gated DeltaNet layer's value heads: top heads, concentration), ridge R^2 against all other concepts with the top contributors, the subspace
method's eigenvalue spectrum, leave-one-out hits, and a triage label. Per layer: leave-one-story-out
accuracy, triage lists, and the correlation of the vectors' first principal components with the
manifest's valence and arousal when it has them.

Held-out accuracy ("loso" in quality.json): held_out.py, leave-one-story-out in folds, every concept's
vector, the centre and the scales refitted without the held-out texts, scored as the readout scores them.
With `--layers auto` the report also keeps every layer's score and why the layers were chosen. A bank of several
layers also gets "loso_combined": held-out accuracy of the mean of its layers' calibrated scores (how the
readout of all its layers names a text).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from plasticity_training import quality
from plasticity_training.corpus import Corpus
from plasticity_training.held_out import accuracy_of, held_out_folds, held_out_scores
from plasticity_training.methods import Method
from plasticity_training.vectors import Contrasts, Extraction

TOP = 5  # nearest concepts, ridge contributors, top heads


def build_report(contrasts: Contrasts, extraction: Extraction, method: Method, settings: dict | None = None,
                 loso: bool = True) -> dict:
    corpus, acts = contrasts.corpus, contrasts.acts
    concepts, C, H = extraction.concepts, len(extraction.concepts), acts.hidden_size
    r2_chance = quality.r2_chance(C, H)
    r2_meaningful = r2_chance < 0.5
    report = {
        "settings": settings or {},
        "hidden_size": H,
        "corpus": {"root": str(corpus.root), "texts": len(corpus.texts), "concepts": C,
                   "baselines": len(corpus.baselines()), "warnings": corpus.warnings},
        "layers": {},
        "concepts": {c: {"n_positives": len(contrasts.pos[c]), "cluster": corpus.manifest.get(c, {}).get("cluster"),
                         "layers": {}} for c in concepts},
    }
    attributes = {k: v for k in ("valence", "arousal") if (v := corpus.attribute(k)) is not None}
    folds = held_out_folds(contrasts) if loso else []
    summed = None  # the layers' held-out scores added up, per fold
    for L in extraction.layers:
        V = extraction.vectors[L]  # (C, H)
        per_layer = {"r2_chance": r2_chance, "saturated_texts": acts.saturated(L) if acts.bases else None}
        if acts.parts is not None and L in acts.parts:
            per_layer["mixer"] = acts.parts[L].mixer
            per_layer["not_decomposed"] = list(acts.parts[L].not_decomposed)
        for i, c in enumerate(concepts):
            report["concepts"][c]["layers"][str(L)] = _concept_metrics(contrasts, extraction, i, L, r2_meaningful)
        if loso:
            fold_scores = held_out_scores(contrasts, method, L, folds)
            summed = fold_scores if summed is None else [a + b for a, b in zip(summed, fold_scores)]
            result = accuracy_of(contrasts, fold_scores, folds)
            for c, hits in result.pop("per_concept").items():
                report["concepts"][c]["layers"][str(L)]["loso"] = hits
            per_layer["loso"] = result
        if attributes:
            per_layer["valence_arousal"] = quality.pc_correlations(
                V, {k: torch.tensor([a[c] for c in concepts]) for k, a in attributes.items()})
        per_layer["triage"] = {label: [c for c in concepts if report["concepts"][c]["layers"][str(L)]["triage"] == label]
                               for label in ("clean", "fragmented", "redundant", "thin")}
        report["layers"][str(L)] = per_layer
    if loso and len(extraction.layers) > 1:
        combined = accuracy_of(contrasts, summed, folds)
        combined.pop("per_concept")
        report["loso_combined"] = {"layers": list(extraction.layers), **combined}
    return report


def _concept_metrics(contrasts: Contrasts, extraction: Extraction, i: int, L: int, r2_meaningful: bool) -> dict:
    corpus, acts, concepts = contrasts.corpus, contrasts.acts, extraction.concepts
    c, V = concepts[i], extraction.vectors[L]
    v = V[i]
    data = contrasts.data(c, L)
    deltas = data.pos - data.contrast  # (P, H)
    names = [corpus.texts[t].name for t in contrasts.pos[c]]
    cos = quality.alignment_cosines(deltas, v)
    order = torch.argsort(cos)
    pc, agree = quality.first_pc_variance_ratio(deltas), quality.agreement(deltas)
    r2, coefs = quality.ridge_r2(V, i)
    top = torch.argsort(coefs.abs(), descending=True)[:TOP]
    m = {
        "first_pc_variance_ratio": _round(pc),
        "agreement": _round(agree),
        "alignment": {n: _round(float(x)) for n, x in zip(names, cos)},
        "outliers": [[names[j], _round(float(cos[j]))] for j in order[:2].tolist()] if len(names) >= 2 else [],
        "nearest": [[concepts[j], _round(x)] for j, x in quality.nearest(V, i, TOP)],
        "ridge": {"r2": _round(r2), "top": [[concepts[j], _round(float(coefs[j]))] for j in top.tolist()]},
    }
    weights = (acts.weights or {}).get(L, {})
    if "down_proj" in weights:
        j, cj = quality.neuron_alignment(v, weights["down_proj"])
        m["neuron"] = {"index": j, "cosine": _round(cj)}
    heads = (acts.heads or {}).get(contrasts.pooling, {}).get(L)
    parts = (acts.parts or {}).get(L)
    if heads is not None and "heads_out" in weights and parts is not None and parts.n_heads:
        n_heads = parts.n_heads
        pos_h, neg_h = heads[contrasts.pos[c]], heads[contrasts.neg[c]]  # (P, nh*hd), (N, nh*hd)
        diff = pos_h.mean(0) - neg_h.mean(0)
        contrib = quality.head_contributions(diff, weights["heads_out"], v, n_heads)
        norms = diff.reshape(n_heads, -1).norm(dim=1)
        spread = neg_h.reshape(len(neg_h), n_heads, -1).std(0).mean(1).clamp(min=1e-12)  # (n_heads,)
        order_h = torch.argsort(contrib.abs(), descending=True)[:TOP]
        a = contrib.abs().double()
        m["heads"] = {
            "mixer": parts.mixer,
            "top": [[h, _round(float(contrib[h])), _round(float(norms[h])), _round(float(norms[h] / spread[h]))]
                    for h in order_h.tolist()],
            "concentration": _round(quality.head_concentration(contrib)),
            "effective_heads": _round(float(a.sum() ** 2 / (a**2).sum())) if float(a.sum()) > 0 else None,
        }
    if extraction.eigenvalues is not None:
        ev = extraction.eigenvalues[L][i]
        m["eigenvalues"] = [_round(float(x)) for x in ev if not math.isnan(float(x))]
    m["triage"] = quality.triage(len(names), agree, pc, r2, r2_meaningful)
    return m


def summary_text(report: dict) -> str:
    s, corpus = report["settings"], report["corpus"]
    lines = [
        f"concept-vector quality report: method {s.get('method')}, pooling {s.get('pooling')}, model {s.get('model')}",
        f"corpus {corpus['root']}: {corpus['concepts']} concepts, {corpus['texts']} distinct texts "
        f"({corpus['baselines']} baselines), {len(corpus['warnings'])} warning(s)",
        "",
        "triage: clean = its texts agree; fragmented = its texts disagree (agreement < "
        f"{quality.FRAGMENTED_AGREEMENT} or first-PC share < {quality.FRAGMENTED_PC}); redundant = ridge R^2 >= "
        f"{quality.REDUNDANT_R2} against the other concepts; thin = one positive text (cannot be checked)",
    ]
    if s.get("layer_choice"):
        lines += ["", f"--layers auto: {s['layer_choice']['reason']}"]
    for reason in s.get("steering", []):  # measured at extraction (steering_range.py)
        lines += ["", f"steering: {reason}"]
    combined = report.get("loso_combined")
    if combined and combined["evaluated"]:
        lines += ["", f"held-out, layers {', '.join(map(str, combined['layers']))} read together (mean of calibrated "
                      f"scores): {combined['accuracy']:.1%} top-1, {combined['top5']:.1%} top-5 over {combined['evaluated']} "
                      f"held-out texts"]
    for L, layer in report["layers"].items():
        lines += ["", f"== layer {L} ==" + (f" ({layer['mixer']})" if layer.get("mixer") else "")]
        lines += [f"not decomposed: {why}" for why in layer.get("not_decomposed", [])]
        if layer.get("saturated_texts"):
            lines.append(f"subspace: {layer['saturated_texts']} text(s) span the whole hidden space at full rank "
                         "(their projector is the identity and carries no contrast)")
        loso = layer.get("loso")
        if loso and loso["evaluated"]:
            lines.append(f"held-out (leave-one-story-out, {loso['folds']} folds, calibrated readout): "
                         f"{loso['accuracy']:.1%} top-1, {loso['top5']:.1%} top-5 over {loso['evaluated']} held-out "
                         f"texts (chance {loso['chance']:.1%})")
        elif loso:
            lines.append("held-out accuracy: no concept has two positive texts")
        if layer["r2_chance"] >= 0.5:
            lines.append(f"ridge R^2: {report['corpus']['concepts']} concepts in {report['hidden_size']} dimensions, so "
                         f"any vector is near a mix of the others (chance R^2 {layer['r2_chance']:.2f}): redundancy "
                         "not judged")
        for row in layer.get("valence_arousal") or []:
            lines.append(f"PC{row['pc']} ({row['explained']:.1%} of variance): r(valence) = {row.get('valence', 0):+.2f}, "
                         f"r(arousal) = {row.get('arousal', 0):+.2f}")
        counts = ", ".join(f"{k} {len(v)}" for k, v in layer["triage"].items())
        lines.append(f"triage: {counts}")
        for label in ("fragmented", "redundant"):
            for c in layer["triage"][label]:
                m = report["concepts"][c]["layers"][L]
                if label == "fragmented":
                    worst = ", ".join(f"{n} ({x:+.2f})" for n, x in m["outliers"])
                    lines.append(f"  fragmented {c}: agreement {m['agreement']}, first PC {m['first_pc_variance_ratio']}; "
                                 f"worst: {worst}")
                else:
                    mix = ", ".join(f"{n} {x:+.2f}" for n, x in m["ridge"]["top"][:3])
                    lines.append(f"  redundant {c}: R^2 {m['ridge']['r2']} from {mix}")
        sparse = [(c, m["layers"][L]["heads"]["concentration"]) for c, m in report["concepts"].items()
                  if "heads" in m["layers"][L]]
        if sparse:
            top = sorted(sparse, key=lambda x: -x[1])[:5]
            lines.append("most head-concentrated: " + ", ".join(f"{c} {x:.2f}" for c, x in top))
        neurons = [(c, m["layers"][L]["neuron"]) for c, m in report["concepts"].items() if "neuron" in m["layers"][L]]
        if neurons:
            top = sorted(neurons, key=lambda x: -abs(x[1]["cosine"]))[:5]
            lines.append("best single-neuron alignment: " + ", ".join(f"{c} #{n['index']} {n['cosine']:+.2f}" for c, n in top))
    if corpus["warnings"]:
        lines += ["", "corpus warnings:"] + [f"  {w}" for w in corpus["warnings"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, extraction: Extraction, corpus: Corpus, out_dir: str | Path) -> list[Path]:
    """quality.json, summary.txt and per layer cosine_L<idx>.png and spectrum_L<idx>.png."""
    from plasticity_training import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "quality.json", out_dir / "summary.txt"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(summary_text(report))
    clusters = [corpus.manifest.get(c, {}).get("cluster") or "" for c in extraction.concepts]
    for L in extraction.layers:
        V = extraction.vectors[L]
        paths.append(plots.cosine_heatmap(quality.cosine_matrix(V), extraction.concepts, clusters,
                                          out_dir / f"cosine_L{L}.png", title=f"concept cosines, layer {L}"))
        eig = extraction.eigenvalues[L] if extraction.eigenvalues is not None else None
        paths.append(plots.spectra(V, eig, out_dir / f"spectrum_L{L}.png", layer=L))
    return paths


def _round(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)
