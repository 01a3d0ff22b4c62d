"""Tests for the amygdala_stories corpus lint: the real corpus is clean, and each
check fires on a small corpus built in tmp_path that breaks exactly that rule."""
from __future__ import annotations

import json
import pathlib
import random
import shutil

import pytest

from plasticity_training.corpus_lint import CORE, CORE_MIN_TEXTS, MIN_TEXTS, lint_corpus, main

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# Neutral filler vocabulary: no word here is an emotion name, synonym or inflection
# of the fixture's emotions, and random 100-word draws share no 5-grams in practice.
VOCAB = ("the a kettle window table street lamp chair door road coat river stone "
         "bread paper clock train field wall garden bus market roof step hand "
         "cup spoon shelf floor corner light rain wind tree morning evening bell "
         "box book pen glass plate bridge yard fence path hill gate car boat "
         "was and then of on under beside near with from into past over").split()

EMOTIONS = {
    "calm": ["tranquil", "unruffled"],
    "joyful": ["joy", "happy"],
    "curious": ["curiosity", "inquisitive"],
    "stuck": ["stymied", "impasse"],
    "left_out": ["excluded", "shut out"],
}
SCENARIO = "the_kettle"
FRAMINGS = ["calm", "joyful", "curious", "stuck"]


def filler(seed: str, n: int = 100) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(n)) + "."


def write(root: pathlib.Path, rel: str, text: str | bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")


def write_manifest(root: pathlib.Path, emotions: dict = EMOTIONS,
                   framings: list[str] = FRAMINGS, **overrides: object) -> None:
    entries = {name: {"cluster": "test", "definition": f"Test {name}.", "valence": 0.0,
                      "arousal": 0.5, "synonyms": syn} for name, syn in emotions.items()}
    for name, fields in overrides.items():
        entries[name].update(fields)
    manifest = {"scale": {"valence": "-1..1", "arousal": "0..1"}, "emotions": entries,
                "scenarios": {SCENARIO: {"description": "A kettle boils.", "framings": framings}}}
    write(root, "manifest.json", json.dumps(manifest, indent=1))


@pytest.fixture
def corpus(tmp_path: pathlib.Path) -> pathlib.Path:
    """A small corpus that lints clean; each test then breaks one rule."""
    write_manifest(tmp_path)
    for name in EMOTIONS:
        write(tmp_path, f"stories/{name}.txt", filler(f"story-{name}"))
    write(tmp_path, f"paired/{SCENARIO}/baseline.txt", filler("baseline"))
    for name in FRAMINGS:
        write(tmp_path, f"paired/{SCENARIO}/{name}.txt", filler(f"framing-{name}"))
    for name in EMOTIONS:  # deep enough: more stories up to the emotion's minimum
        have = 1 + (name in FRAMINGS)
        for n in range(2, 2 + (CORE_MIN_TEXTS if name in CORE else MIN_TEXTS) - have):
            write(tmp_path, f"stories/{name}/{n:02d}.txt", filler(f"story-{name}-{n}"))
    return tmp_path


def flagged(problems: list[str], rel: str, needle: str) -> bool:
    return any(p.startswith(rel) and needle in p for p in problems)


def test_real_corpus_is_clean() -> None:
    problems = lint_corpus(REPO_ROOT / "amygdala_stories")
    assert problems == [], "\n".join(problems)


def test_fixture_is_clean(corpus: pathlib.Path) -> None:
    assert lint_corpus(corpus) == []


@pytest.mark.parametrize("rel, word", [
    ("stories/calm.txt", "Calmly"),            # own name, inflected, any case
    ("stories/joyful.txt", "happily"),         # listed synonym, inflected
    ("stories/joyful.txt", "joy's"),           # synonym before an apostrophe
    ("stories/left_out.txt", "left-out"),      # underscore name written with a hyphen
    ("stories/left_out.txt", "shut  out"),     # multi-word synonym
    ("stories/stuck.txt", "impasses"),
    (f"paired/{SCENARIO}/curious.txt", "curiosity"),
])
def test_emotion_words_are_flagged(corpus: pathlib.Path, rel: str, word: str) -> None:
    write(corpus, rel, filler(rel) + f" {word} then the door.")
    assert flagged(lint_corpus(corpus), rel, "uses")


@pytest.mark.parametrize("rel, text", [
    (f"paired/{SCENARIO}/baseline.txt", "calm joyful stuck"),  # baselines are exempt
    ("stories/joyful.txt", "calm enjoyment"),    # another emotion's name; 'joy' inside a word
    ("stories/calm.txt", "becalmed"),            # no prefix matching
    ("stories/joyful.txt", "it happened"),     # happy must not catch happen-
])
def test_innocent_words_pass(corpus: pathlib.Path, rel: str, text: str) -> None:
    write(corpus, rel, filler(rel) + f" {text}.")
    assert lint_corpus(corpus) == []


def test_too_short(corpus: pathlib.Path) -> None:
    write(corpus, "stories/calm.txt", filler("short", 79))
    assert flagged(lint_corpus(corpus), "stories/calm.txt", "79 words")


def test_too_long(corpus: pathlib.Path) -> None:
    write(corpus, "stories/calm.txt", filler("long", 201))
    assert flagged(lint_corpus(corpus), "stories/calm.txt", "201 words")


def test_word_limits_inclusive(corpus: pathlib.Path) -> None:
    write(corpus, "stories/calm.txt", filler("eighty", 80))
    write(corpus, "stories/joyful.txt", filler("two-hundred", 200))
    assert lint_corpus(corpus) == []


def test_two_paragraphs(corpus: pathlib.Path) -> None:
    write(corpus, "stories/calm.txt", filler("p1", 50) + "\n\n" + filler("p2", 50))
    assert flagged(lint_corpus(corpus), "stories/calm.txt", "paragraph")


def test_near_duplicate(corpus: pathlib.Path) -> None:
    words = filler("story-calm").split()
    for i in (10, 40, 70):  # a copy with three words changed
        words[i] = "lantern"
    write(corpus, "stories/curious.txt", " ".join(words))
    assert flagged(lint_corpus(corpus), "stories/curious.txt", "near-duplicate of stories/calm.txt")


def test_shared_sentence_is_not_a_duplicate(corpus: pathlib.Path) -> None:
    # Framings may repeat a sentence of the baseline; the rest is written fresh.
    shared = " ".join(filler("baseline").split()[:20])
    write(corpus, f"paired/{SCENARIO}/calm.txt", shared + " " + filler("fresh", 90))
    assert lint_corpus(corpus) == []


def test_missing_baseline(corpus: pathlib.Path) -> None:
    (corpus / "paired" / SCENARIO / "baseline.txt").unlink()
    assert flagged(lint_corpus(corpus), f"paired/{SCENARIO}", "missing baseline.txt")


def test_too_few_framings(corpus: pathlib.Path) -> None:
    write_manifest(corpus, framings=FRAMINGS[:3])
    (corpus / "paired" / SCENARIO / "stuck.txt").unlink()
    assert flagged(lint_corpus(corpus), f"paired/{SCENARIO}", "3 framings")


def test_framing_not_listed_in_manifest(corpus: pathlib.Path) -> None:
    write(corpus, f"paired/{SCENARIO}/left_out.txt", filler("extra framing"))
    assert flagged(lint_corpus(corpus), f"paired/{SCENARIO}/left_out.txt", "not listed")


def test_listed_framing_without_file(corpus: pathlib.Path) -> None:
    write_manifest(corpus, framings=FRAMINGS + ["left_out"])
    assert flagged(lint_corpus(corpus), f"paired/{SCENARIO}/left_out.txt", "missing")


def test_emotion_not_in_manifest(corpus: pathlib.Path) -> None:
    write(corpus, "stories/gloomy.txt", filler("gloomy"))
    assert flagged(lint_corpus(corpus), "stories/gloomy.txt", "not in manifest")


def test_manifest_emotion_without_file(corpus: pathlib.Path) -> None:
    (corpus / "stories" / "left_out.txt").unlink()
    shutil.rmtree(corpus / "stories" / "left_out")
    assert flagged(lint_corpus(corpus), "stories/left_out.txt", "no file")


def test_invalid_utf8(corpus: pathlib.Path) -> None:
    write(corpus, "stories/calm.txt", filler("bytes").encode() + b" caf\xe9.")
    assert flagged(lint_corpus(corpus), "stories/calm.txt", "UTF-8")


@pytest.mark.parametrize("fields, needle", [
    ({"valence": 1.5}, "valence"),
    ({"arousal": -0.1}, "arousal"),
    ({"arousal": True}, "arousal"),
    ({"cluster": ""}, "cluster"),
    ({"synonyms": ["only-one"]}, "synonyms"),
])
def test_manifest_values(corpus: pathlib.Path, fields: dict, needle: str) -> None:
    write_manifest(corpus, calm=fields)
    assert flagged(lint_corpus(corpus), "manifest.json: emotion 'calm'", needle)


def test_main_exit_status(corpus: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(corpus)]) == 0
    assert "26 files checked, 0 problems" in capsys.readouterr().out  # 10 + 16 more stories (depth)
    write(corpus, "stories/calm.txt", filler("short", 10))
    assert main([str(corpus)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("stories/calm.txt: 10 words") and "1 problems" in out


def test_an_emotion_with_too_few_texts_is_flagged_and_held_out_texts_do_not_count(corpus: pathlib.Path) -> None:
    assert "curious" not in CORE and "calm" in CORE
    (corpus / "stories/curious/02.txt").unlink()  # curious: story + framing = 2 < MIN_TEXTS
    write(corpus, "heldout/curious/01.txt", filler("held-out-curious"))
    problems = lint_corpus(corpus)
    assert flagged(problems, "stories/curious.txt", f"need at least {MIN_TEXTS}")
    (corpus / "stories/calm/02.txt").unlink()
    assert flagged(lint_corpus(corpus), "stories/calm.txt", f"need at least {CORE_MIN_TEXTS} (a core emotion)")


def test_held_out_and_extra_stories_follow_the_same_rules(corpus: pathlib.Path) -> None:
    write(corpus, "heldout/joyful/01.txt", filler("held-out") + " I was so happy.")
    write(corpus, "stories/calm/09.txt", filler("calm-extra") + " She felt tranquil.")
    write(corpus, "stories/nobody/02.txt", filler("orphan"))
    problems = lint_corpus(corpus)
    assert flagged(problems, "heldout/joyful/01.txt", "happy")
    assert flagged(problems, "stories/calm/09.txt", "tranquil")
    assert flagged(problems, "stories/nobody/", "no stories/nobody.txt beside it")
