"""Corpus loader and preflight (plasticity_training.corpus): roles, dedup, warnings, errors.

`write_corpus` builds the small fixture corpus the other test_extract_* files use too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plasticity_training.corpus import CorpusError, load_corpus

REPO = Path(__file__).resolve().parent.parent

EMOTIONS = {  # name: (valence, arousal, story)
    "joyful": (0.8, 0.7, "The kite climbed and she laughed out loud, running barefoot across the warm sand "
                         "while her brother cheered and the gulls wheeled over the bright water."),
    "afraid": (-0.7, 0.8, "Footsteps behind him on the dark stair; his breath stopped, his hand shook on the "
                          "cold rail, and he did not dare to turn around and look."),
    "calm": (0.6, 0.1, "The lake lay flat and grey at dawn. She sat with her tea on the jetty and let the slow "
                       "minutes pass, one after another, without counting them."),
    "angry": (-0.7, 0.9, "He slammed the drawer so hard the cups rattled, jaw tight, and shouted at the empty "
                         "kitchen until his throat hurt and the dog hid under the table."),
    "sad": (-0.6, 0.2, "The chair by the window stayed empty. She folded his scarf twice, held it a while, "
                       "and could not bring herself to put it away in the drawer."),
}
SCENARIOS = {
    "the_letter": ("A letter arrives in the morning post. She opens it at the kitchen table and reads it twice.",
                   {"joyful": "A letter arrives in the morning post! She tears it open at the kitchen table, reads "
                              "it twice, and cannot stop grinning.",
                    "afraid": "A letter arrives in the morning post. Her fingers tremble as she opens it at the "
                              "kitchen table and reads it twice, heart pounding.",
                    "sad": "A letter arrives in the morning post. She opens it slowly at the kitchen table and "
                           "reads it twice, her eyes wet."}),
    "the_train": ("The train is late. He waits on the platform with his bag and checks the departure board.",
                  {"angry": "The train is late again. He paces the platform with his bag, glaring at the departure "
                            "board and muttering.",
                   "calm": "The train is late. He waits on the platform with his bag, easy and unhurried, and "
                           "glances at the departure board.",
                   "joyful": "The train is late, and he hums on the platform with his bag, smiling up at the "
                             "departure board."}),
}


def write_corpus(root: Path, manifest: bool = True) -> Path:
    """The fixture corpus: 5 emotions, 2 scenarios, 13 distinct texts (2 baselines)."""
    (root / "stories").mkdir(parents=True)
    for name, (_, _, story) in EMOTIONS.items():
        (root / "stories" / f"{name}.txt").write_text(story + "\n")
    for scenario, (baseline, framings) in SCENARIOS.items():
        d = root / "paired" / scenario
        d.mkdir(parents=True)
        (d / "baseline.txt").write_text(baseline + "\n")
        for name, text in framings.items():
            (d / f"{name}.txt").write_text(text + "\n")
    if manifest:
        m = {"emotions": {n: {"cluster": "pos" if v > 0 else "neg", "valence": v, "arousal": a}
                          for n, (v, a, _) in EMOTIONS.items()},
             "scenarios": {s: {"description": s, "framings": sorted(f)} for s, (_, f) in SCENARIOS.items()}}
        (root / "manifest.json").write_text(json.dumps(m, indent=1))
    return root


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus")


def test_roles(corpus_dir):
    corpus = load_corpus(corpus_dir)
    assert corpus.concepts == sorted(EMOTIONS)
    assert len(corpus.texts) == 13 and len(corpus.baselines()) == 2
    names = [t.name for t in corpus.texts]
    pos = [names[i] for i in corpus.positives("joyful")]
    assert pos == ["paired/the_letter/joyful.txt", "paired/the_train/joyful.txt", "stories/joyful.txt"]
    neg = {names[i] for i in corpus.negatives("joyful")}
    assert neg == set(names) - set(pos)
    assert {"paired/the_letter/baseline.txt", "paired/the_train/baseline.txt"} <= neg
    partners = [names[i] if i is not None else None for i in corpus.contrast("joyful")]
    assert partners == ["paired/the_letter/baseline.txt", "paired/the_train/baseline.txt", None]
    for c in corpus.concepts:  # baselines are never positive
        assert not set(corpus.positives(c)) & set(corpus.baselines())
    assert corpus.attribute("valence")["calm"] == 0.6
    assert corpus.warnings == []


def test_duplicate_text_is_forwarded_once(corpus_dir):
    (corpus_dir / "stories" / "cheerful.txt").write_text((corpus_dir / "stories" / "joyful.txt").read_text())
    corpus = load_corpus(corpus_dir)
    assert len(corpus.texts) == 13  # the copy adds no text
    shared = [t for t in corpus.texts if len(t.sources) == 2]
    assert len(shared) == 1 and shared[0].emotions == {"cheerful", "joyful"}
    i = corpus.texts.index(shared[0])
    assert i in corpus.positives("cheerful") and i not in corpus.negatives("joyful")
    assert any("forwarded once" in w for w in corpus.warnings)
    assert corpus.attribute("valence") is None  # "cheerful" is not in the manifest


def test_empty_file_warned_and_skipped(corpus_dir):
    (corpus_dir / "stories" / "sad.txt").write_text("  \n")
    log = []
    corpus = load_corpus(corpus_dir, log=log.append)
    assert "sad" in corpus.concepts and len(corpus.positives("sad")) == 1  # its framing remains
    assert len(corpus.texts) == 12
    assert any("stories/sad.txt: empty file, skipped" in w for w in corpus.warnings)
    assert any("empty file" in line for line in log)


def test_preflight_errors(tmp_path, corpus_dir):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "nope")
    (tmp_path / "bare").mkdir()
    with pytest.raises(CorpusError, match="neither stories/ nor paired/"):
        load_corpus(tmp_path / "bare")
    with pytest.raises(CorpusError, match=r"fewer than 3 .*afraid \(2\), angry \(2\), calm \(2\), sad \(2\)"):
        load_corpus(corpus_dir, min_positives=3)
    with pytest.raises(ValueError, match="min_positives"):
        load_corpus(corpus_dir, min_positives=0)


def test_preflight_emotion_with_only_an_empty_file(corpus_dir):
    (corpus_dir / "stories" / "bored.txt").write_text("")
    with pytest.raises(CorpusError, match=r"bored \(0\)"):
        load_corpus(corpus_dir)


def test_preflight_scenario_without_baseline_and_bad_utf8(corpus_dir):
    (corpus_dir / "paired" / "the_train" / "baseline.txt").unlink()
    with pytest.raises(CorpusError, match="the_train/ has no baseline.txt"):
        load_corpus(corpus_dir)
    (corpus_dir / "paired" / "the_train" / "baseline.txt").write_text("fine")
    (corpus_dir / "stories" / "calm.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(CorpusError, match="stories/calm.txt: not valid UTF-8"):
        load_corpus(corpus_dir)


def test_needs_two_concepts(tmp_path):
    (tmp_path / "c" / "stories").mkdir(parents=True)
    (tmp_path / "c" / "stories" / "joyful.txt").write_text("one story")
    with pytest.raises(CorpusError, match="at least two"):
        load_corpus(tmp_path / "c")


def test_project_corpus_loads():
    corpus = load_corpus(REPO / "amygdala_stories")
    assert len(corpus.concepts) == 167 and len(corpus.baselines()) == 17
    assert len(corpus.texts) == len({t.text for t in corpus.texts})
    assert corpus.attribute("valence") is not None and corpus.attribute("arousal") is not None


def test_more_stories_of_an_emotion_are_its_positives_and_held_out_texts_are_never_read(corpus_dir):
    more = corpus_dir / "stories" / "calm" / "02.txt"
    more.parent.mkdir()
    more.write_text("The snow fell without a sound and the old dog slept by the stove while she mended the net.")
    held = corpus_dir / "heldout" / "calm" / "01.txt"
    held.parent.mkdir(parents=True)
    held.write_text("A held-out text that extraction must never see.")
    corpus = load_corpus(corpus_dir)
    names = [corpus.texts[i].name for i in corpus.positives("calm")]
    assert "stories/calm/02.txt" in names and "stories/calm.txt" in names
    assert not any("heldout" in s for t in corpus.texts for s in t.sources)
