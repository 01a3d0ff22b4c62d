"""Quality-report metrics on constructed cases with known answers (plasticity_training.quality, .report)."""

from __future__ import annotations

import math

import pytest
import torch

from plasticity_training import quality
from plasticity_training.activations import Activations
from plasticity_training.corpus import load_corpus
from plasticity_training.methods import get_method
from plasticity_training.held_out import held_out_accuracy
from plasticity_training.report import build_report, summary_text
from plasticity_training.vectors import Contrasts, extract_vectors
from test_extract_corpus import write_corpus


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def test_first_pc_and_agreement():
    d = torch.randn(16)
    assert quality.first_pc_variance_ratio(torch.stack([d, 2 * d, 0.5 * d])) == pytest.approx(1.0, abs=1e-6)
    assert quality.agreement(torch.stack([d, 2 * d])) == pytest.approx(1.0, abs=1e-6)
    eye = torch.eye(16)[:3]
    assert quality.first_pc_variance_ratio(eye) == pytest.approx(1 / 3, abs=1e-6)
    assert quality.agreement(eye) == pytest.approx(0.0, abs=1e-6)
    assert quality.agreement(torch.stack([d, -d])) == pytest.approx(-1.0, abs=1e-6)  # sign counts
    assert quality.first_pc_variance_ratio(d[None]) is None and quality.agreement(d[None]) is None


def test_alignment_and_nearest():
    e = torch.eye(8)
    cos = quality.alignment_cosines(torch.stack([e[0], e[1], e[0] + e[1]]), e[0])
    assert torch.allclose(cos, torch.tensor([1.0, 0.0, 1 / math.sqrt(2)]), atol=1e-6)
    vectors = torch.stack([e[0], unit(e[0] + 0.1 * e[1]), e[1], -e[0]])
    near = quality.nearest(vectors, 0, k=3)
    assert [j for j, _ in near] == [1, 2, 3] and near[0][1] == pytest.approx(1 / math.sqrt(1.01), abs=1e-6)


def test_neuron_alignment_finds_the_planted_column():
    down = torch.randn(32, 96, generator=torch.Generator().manual_seed(0))  # (H, I)
    assert quality.neuron_alignment(unit(down[:, 7]), down) == (7, pytest.approx(1.0, abs=1e-6))
    j, c = quality.neuron_alignment(unit(-down[:, 41]), down)
    assert j == 41 and c == pytest.approx(-1.0, abs=1e-6)


def test_head_contributions():
    g = torch.Generator().manual_seed(1)
    n_heads, hd, H = 4, 8, 32
    o_proj = torch.randn(H, n_heads * hd, generator=g)
    diff = torch.zeros(n_heads * hd)
    diff[2 * hd : 3 * hd] = torch.randn(hd, generator=g)  # only head 2 differs
    v = unit(o_proj @ diff)
    contrib = quality.head_contributions(diff, o_proj, v, n_heads)
    assert int(contrib.abs().argmax()) == 2 and float(contrib[2]) > 0
    assert torch.allclose(contrib[[0, 1, 3]], torch.zeros(3), atol=1e-5)
    assert quality.head_concentration(contrib) == pytest.approx(1.0)
    # Sum over heads = the whole attention output's contribution along v.
    full = torch.randn(n_heads * hd, generator=g)
    assert float(quality.head_contributions(full, o_proj, v, n_heads).sum()) == pytest.approx(float(v @ (o_proj @ full)), rel=1e-4)
    assert quality.head_concentration(torch.ones(8)) == pytest.approx(2 / 8)  # spread evenly: top quarter


def test_ridge_r2_of_a_combination_is_near_one():
    g = torch.Generator().manual_seed(2)
    others = torch.nn.functional.normalize(torch.randn(10, 64, generator=g), dim=1)
    mix = unit(others[3] + others[6])
    lone = unit(torch.randn(64, generator=g))
    vectors = torch.cat([others, mix[None], lone[None]])  # (12, 64)
    r2, coefs = quality.ridge_r2(vectors, 10)
    assert r2 > 0.99
    top2 = set(torch.argsort(coefs.abs(), descending=True)[:2].tolist())
    assert top2 == {3, 6} and coefs[3] > 0 and coefs[6] > 0 and coefs[10] == 0
    r2_lone, _ = quality.ridge_r2(vectors, 11)
    assert r2_lone < 0.5 and quality.r2_chance(12, 64) == pytest.approx(11 / 64)


def test_pc_correlations_recover_valence_and_arousal():
    g = torch.Generator().manual_seed(3)
    C, H = 40, 16
    valence, arousal = torch.rand(C, generator=g) * 2 - 1, torch.rand(C, generator=g)
    arousal = arousal - (arousal - arousal.mean()) @ (valence - valence.mean()) / ((valence - valence.mean()) ** 2).sum() * (valence - valence.mean())  # decorrelate
    e = torch.eye(H)
    vectors = 3 * valence[:, None] * e[0] + 1.5 * (arousal[:, None] - arousal.mean()) * e[1] * 2 + 0.02 * torch.randn(C, H, generator=g)
    rows = quality.pc_correlations(vectors, {"valence": valence, "arousal": arousal})
    assert abs(rows[0]["valence"]) > 0.98 and abs(rows[1]["arousal"]) > 0.98
    assert rows[0]["explained"] > rows[1]["explained"] > rows[2]["explained"]


def test_triage_rules():
    assert quality.triage(3, 0.8, 0.9, 0.95, r2_meaningful=True) == "redundant"
    assert quality.triage(3, 0.8, 0.9, 0.95, r2_meaningful=False) == "clean"
    assert quality.triage(1, None, None, 0.2, True) == "thin"
    assert quality.triage(2, -0.3, 0.65, 0.2, True) == "fragmented"
    assert quality.triage(3, 0.5, 0.4, 0.2, True) == "fragmented"
    assert quality.triage(2, 0.6, 0.8, 0.2, True) == "clean"


def synthetic(corpus, directions: dict[str, torch.Tensor], H: int, noise: float = 0.05, seed: int = 0) -> Activations:
    """Each text's activation: an offset + 3 * the sum of its emotions' directions + noise."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(H, generator=g)
    X = torch.stack([offset + sum((3 * directions[e] for e in t.emotions), torch.zeros(H))
                     + noise * torch.randn(H, generator=g) for t in corpus.texts])
    return Activations(layers=[0], hidden_size=H, pooled={"mean": {0: X}, "last": {0: X}},
                       n_tokens=[10] * len(corpus.texts))


def test_report_on_a_constructed_corpus(tmp_path):
    corpus = load_corpus(write_corpus(tmp_path / "corpus"))
    H = 24
    e = torch.eye(H)
    directions = {"joyful": e[0], "afraid": e[1], "calm": e[2], "angry": e[3],
                  "sad": unit(e[1] + e[2])}  # sad = afraid + calm: redundant by construction
    acts = synthetic(corpus, directions, H)
    # The paired mean method: a framing's partner is its baseline, so the vectors carry no share of the
    # other concepts (the pooled method subtracts the negatives' mean, which with 5 concepts mixes them all).
    method = get_method("mean")
    contrasts = Contrasts(corpus, acts, pooling="mean", device="cpu")
    extraction = extract_vectors(contrasts, method)
    report = build_report(contrasts, extraction, method, settings={"method": "mean", "pooling": "mean"})
    layer = report["layers"]["0"]
    assert layer["loso"]["accuracy"] == 1.0 and layer["loso"]["evaluated"] == 11  # 3 + 2 + 2 + 2 + 2 positives
    sad = report["concepts"]["sad"]["layers"]["0"]
    assert sad["ridge"]["r2"] > 0.95
    assert {n for n, _ in sad["ridge"]["top"][:2]} == {"afraid", "calm"}
    assert all(x > 0 for n, x in sad["ridge"]["top"][:2])
    # sad, afraid and calm are each a combination of the other two; joyful and angry stand alone.
    assert layer["triage"]["redundant"] == ["afraid", "calm", "sad"]
    assert layer["triage"]["clean"] == ["angry", "joyful"]
    joy = report["concepts"]["joyful"]["layers"]["0"]
    assert joy["agreement"] > 0.9 and joy["first_pc_variance_ratio"] > 0.9
    assert min(joy["alignment"].values()) > 0.9 and len(joy["outliers"]) == 2
    assert joy["nearest"][0][1] < 0.5 and report["concepts"]["joyful"]["n_positives"] == 3
    assert len(layer["valence_arousal"]) == 3
    text = summary_text(report)
    assert "held-out (leave-one-story-out, 3 folds, calibrated readout): 100.0% top-1" in text
    assert "redundant sad" in text

    # Control: give sad a direction of its own and nothing is redundant any more.
    directions["sad"] = e[4]
    contrasts = Contrasts(corpus, synthetic(corpus, directions, H), pooling="mean", device="cpu")
    report = build_report(contrasts, extract_vectors(contrasts, method), method, loso=False)
    assert report["layers"]["0"]["triage"]["clean"] == corpus.concepts
    assert report["concepts"]["sad"]["layers"]["0"]["ridge"]["r2"] < 0.5


@pytest.mark.parametrize("name", ["pooled", "lda"])
def test_held_out_accuracy_fails_on_scrambled_labels(tmp_path, name):
    corpus = load_corpus(write_corpus(tmp_path / "corpus"))
    H = 24
    g = torch.Generator().manual_seed(7)
    directions = {c: unit(torch.randn(H, generator=g)) for c in corpus.concepts}
    acts = synthetic(corpus, directions, H, noise=0.05)
    # Each text's activation replaced by a random one: no concept signal is left to find.
    acts.pooled["mean"][0] = torch.randn(len(corpus.texts), H, generator=g)
    # A held-out text stays out of every concept's fit: a discriminative method (lda) cannot learn to score it
    # low for the other concepts (what leaving it among their negatives allowed).
    method = get_method(name)
    contrasts = Contrasts(corpus, acts, device="cpu", whiten=name == "lda")
    assert held_out_accuracy(contrasts, method, 0)["accuracy"] < 0.7


def test_layers_auto_picks_the_layer_that_names_held_out_texts_and_says_why(tmp_path):
    from plasticity_training.layer_choice import choose_layers

    corpus = load_corpus(write_corpus(tmp_path / "corpus"))
    H = 24
    g = torch.Generator().manual_seed(5)
    directions = {c: unit(torch.randn(H, generator=g)) for c in corpus.concepts}
    signal = synthetic(corpus, directions, H, noise=0.05).pooled["mean"][0]
    noise = torch.randn(len(corpus.texts), H, generator=g)
    # Layer 2 carries the concepts; layers 0 and 1 are noise.
    acts = Activations(layers=[0, 1, 2], hidden_size=H, pooled={"mean": {0: noise, 1: noise.flip(0), 2: signal}},
                       n_tokens=[10] * len(corpus.texts))
    choice = choose_layers(Contrasts(corpus, acts, device="cpu", whiten=True), [0, 1, 2], num_layers=3)
    assert choice.layers == [2]  # the noise layers add nothing read with it
    assert choice.per_layer[2]["accuracy"] == 1.0 and choice.per_layer[0]["accuracy"] < 0.7
    assert choice.reason.startswith("layer 2: held-out top-1 100.0%")
    assert choice.record()["per_layer"]["0"] == choice.per_layer[0]


def test_layers_auto_reads_two_layers_together_when_their_errors_differ_and_says_why(tmp_path):
    """Layers 1 and 2 carry the same concepts under independent noise: each alone names few held-out texts,
    the mean of their calibrated scores names more (by more than the two-text minimum); layer 0 is noise."""
    from plasticity_training.held_out import accuracy_of, held_out_folds, held_out_scores
    from plasticity_training.layer_choice import MIN_TEXTS, choose_layers

    corpus = load_corpus(write_corpus(tmp_path / "corpus"))
    H = 24
    g = torch.Generator().manual_seed(0)
    directions = {c: unit(torch.randn(H, generator=g)) for c in corpus.concepts}
    one, two = (synthetic(corpus, directions, H, noise=1.5, seed=s).pooled["mean"][0] for s in (100, 200))
    acts = Activations(layers=[0, 1, 2], hidden_size=H, n_tokens=[10] * len(corpus.texts),
                       pooled={"mean": {0: torch.randn(len(corpus.texts), H, generator=g), 1: one, 2: two}})
    contrasts = Contrasts(corpus, acts, device="cpu", whiten=True)
    choice = choose_layers(contrasts, [0, 1, 2], num_layers=3)
    assert choice.layers == [1, 2]
    folds, lda = held_out_folds(contrasts), get_method("lda")
    together = accuracy_of(contrasts, [a + b for a, b in zip(*(held_out_scores(contrasts, lda, L, folds) for L in (1, 2)))], folds)
    assert choice.combined["accuracy"] == round(together["accuracy"], 4)
    best_single = max(choice.per_layer[L]["accuracy"] for L in (0, 1, 2))
    assert (choice.combined["accuracy"] - best_single) * together["evaluated"] >= MIN_TEXTS - 1e-6
    assert choice.reason.startswith("layers 1, 2 read together: held-out top-1")
    assert choice.record()["chosen"] == [1, 2]


def test_layers_auto_without_two_texts_per_concept_falls_back_to_a_depth_and_says_so(tmp_path):
    from plasticity_training.corpus import Corpus, Text
    from plasticity_training.layer_choice import choose_layers

    concepts = ["afraid", "calm", "joyful"]
    one_each = [Text(c, (f"stories/{c}.txt",), frozenset({c}), frozenset(), ()) for c in concepts]
    thin = Corpus(tmp_path, one_each, concepts, {}, [])
    H = 8
    acts = Activations(layers=list(range(4)), hidden_size=H,
                       pooled={"mean": {L: torch.randn(len(one_each), H) for L in range(4)}}, n_tokens=[3] * len(one_each))
    choice = choose_layers(Contrasts(thin, acts, device="cpu", whiten=True), list(range(4)), num_layers=4)
    assert choice.layers == [2] and "no concept has two texts" in choice.reason and choice.per_layer == {}
