"""The pure pieces of research/preference_real.py: the sentence-counting judge and how a prompt's sampled
replies make a preference pair. No server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "research"))
from preference_real import DATA, make_pair, one_sentence, sentences  # noqa: E402


def test_sentences_close_at_end_marks_followed_by_space_or_the_end():
    assert sentences("Bees make honey from nectar.") == 1
    assert sentences("Bees make honey. They store it in combs!  Why? Winter.") == 4
    assert sentences("It costs 3.50 dollars, e.g. at noon.") == 2  # "e.g. " closes one: the judge is simple, and says so
    assert sentences("Bees make honey from nectar and") == 1  # an unfinished sentence counts
    assert sentences("First. Then the rest") == 2
    assert sentences("   ") == 0


def test_one_sentence_means_one_finished_sentence():
    assert one_sentence("Bees make honey from nectar.", finished=True)
    assert not one_sentence("Bees make honey from nectar.", finished=False)  # cut at the token limit
    assert not one_sentence("Bees make honey. They store it.", finished=True)


def test_a_pair_prefers_the_finished_reply_with_fewest_sentences_to_the_one_with_most():
    replies = [("One. Two. Three.", True), ("Just one.", True), ("A. B. C. D. and five", False), ("Two. Here.", True)]
    assert make_pair(replies) == ("Just one.", "A. B. C. D. and five")
    # an unfinished reply is never preferred, and counts one sentence more as the rejected one
    assert make_pair([("Short", False), ("One. Two.", True)]) is None
    assert make_pair([("Same one.", True), ("Same two.", True)]) is None
    assert make_pair([("Cut here", False)]) is None


def test_train_and_held_out_prompts_are_apart():
    data = json.loads(DATA.read_text())
    assert len(data["train"]) >= 32 and len(data["held_out"]) >= 16
    assert not set(data["train"]) & set(data["held_out"])
