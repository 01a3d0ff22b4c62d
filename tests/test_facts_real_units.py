"""The pure pieces of research/facts_real.py: answer matching, the greedy-production test on prompt_logprobs
entries, a setting's figures against the goal, and the trade-off curve. No server."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "research"))
from facts_real import DATA, GOAL, matches, normalise, pareto, produced_greedily, summarise  # noqa: E402


def test_answers_match_as_whole_words_whatever_the_case_and_punctuation():
    assert matches("The capital of France is PARIS.", ["paris"])
    assert matches("It's New-Delhi!", ["new delhi", "delhi"])
    assert matches("A spider has 8 legs.", ["8", "eight"])
    assert not matches("It was built in 1984.", ["4", "four"])  # a digit inside a number is not the answer
    assert not matches("Canada's capital is Toronto.", ["ottawa"])
    assert normalise("  Marigold   Quince. ") == " marigold quince "


def test_a_reply_is_produced_greedily_only_when_every_token_ranks_first():
    entries = [{"5": {"logprob": -0.1, "rank": 1}}, {"7": {"logprob": -0.2, "rank": 1}}]
    assert produced_greedily(entries, [5, 7])
    entries[1] = {"7": {"logprob": -1.2, "rank": 2}, "9": {"logprob": -0.4, "rank": 1}}
    assert not produced_greedily(entries, [5, 7])


def fact(steps, learned=True):
    return {"steps": steps, "learned": learned, "step_seconds": [2.0] * steps, "tokens": 10 * steps,
            "all_tokens": 50 * steps}


def test_summary_counts_only_questions_right_before_and_checks_the_goal():
    base = {"questions": {"a": True, "b": True, "c": False, "d": True}, "ppl": 10.0}
    run = {"facts": [fact(3), fact(10, learned=False)],
           "after": {"questions": {"a": True, "b": False, "c": True, "d": True}, "facts": {"x": True, "y": False},
                     "ppl": 10.05}}
    s = summarise(run, base)
    assert (s["kept"], s["kept_of"]) == (2, 3)  # c was wrong before: it counts neither way
    assert s["learned"] == 1 and s["mean_steps"] == 3 and s["max_steps"] == 10 and s["recalled"] == 1
    assert s["ppl_rise"] == pytest.approx(0.005)
    assert s["step_seconds"] == 2.0 and s["tokens_per_s"] == pytest.approx(25.0)
    assert not s["meets_goal"]  # a fact not learned and a third of the answers lost
    run["facts"][1] = fact(4)
    run["after"]["questions"]["b"] = True
    assert summarise(run, base)["meets_goal"]
    run["after"]["ppl"] = 10.0 * (1 + GOAL["max_ppl_rise"]) + 0.01
    assert not summarise(run, base)["meets_goal"]


def test_the_trade_off_curve_keeps_the_points_nothing_beats_everywhere():
    points = {"a": (20, 0.80, -0.05), "b": (10, 0.99, -0.001), "c": (10, 0.90, -0.01), "d": (20, 0.80, -0.05)}
    assert pareto(points) == ["a", "b", "d"]  # c is beaten by b on every count; equal points both stay
    assert math.isnan(summarise({"facts": [], "after": {"questions": {}, "facts": {}, "ppl": 1.0}},
                                {"questions": {}, "ppl": 1.0})["mean_steps"])


def test_the_data_has_20_facts_and_at_least_50_questions_none_of_them_trivially_matched():
    data = json.loads(DATA.read_text())
    assert len(data["facts"]) == 20 and len(data["questions"]) >= 50
    for question, reply, key in data["facts"]:
        assert matches(reply, [key]), (question, reply, key)  # the taught reply contains what is checked
    for question, answers in data["questions"]:
        assert all(len(normalise(a).strip()) >= 2 or a.isdigit() for a in answers), question
        assert not matches(question, answers), question  # the answer is not in the question itself
