"""`plasticity extract --concepts A,B,...`: a bank of only some concepts, from their own texts and the
baselines paired with them (quicker: the demo extracts a few concepts of a real model this way). No model."""

from __future__ import annotations

import pytest

from plasticity_training.corpus import load_corpus
from plasticity_training.extract import REPO_ROOT, ExtractOptions, build_parser, only_concepts, run

CORPUS = REPO_ROOT / "amygdala_stories"


def test_only_the_named_concepts_and_their_texts_are_kept():
    corpus = load_corpus(CORPUS)
    small = only_concepts(corpus, "sad, joyful,angry")
    assert small.concepts == ["angry", "joyful", "sad"]
    for concept in small.concepts:  # every text of a kept concept, no other
        assert [corpus.texts[i].text for i in corpus.positives(concept)] == \
               [small.texts[i].text for i in small.positives(concept)]
    assert all(t.emotions <= {"angry", "joyful", "sad"} for t in small.texts)
    assert all(t.emotions or t.baseline_of for t in small.texts)  # no text left positive of nothing
    for concept in small.concepts:  # a kept framing keeps the baseline it is contrasted with
        assert len(small.contrast(concept)) == len(small.positives(concept))
    assert len(small.texts) < len(corpus.texts) / 10


@pytest.mark.parametrize("names, reason", [("joyful,not_a_feeling", "not_a_feeling not in the corpus"),
                                           ("joyful", "at least two")])
def test_unknown_or_too_few_concepts_fail_before_any_model_loads(tmp_path, names, reason):
    options = ExtractOptions(out=str(tmp_path / "bank"), concepts=names, model=str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match=f"Invalid --concepts: .*{reason}"):
        run(options, log=lambda msg: None)


def test_the_cli_passes_concepts():
    assert build_parser().parse_args(["--out", "b", "--concepts", "calm,sad"]).concepts == "calm,sad"
