"""The ratio and goal maths of research/bench_real.py (no server, no model)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "research"))

from bench_real import Goal, against_bracket, compare, first_goes_first, paired_ratios, spread  # noqa: E402


def test_spread_is_median_and_range():
    assert spread([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    with pytest.raises(ValueError):
        spread([])


def test_paired_ratios_need_matching_rounds():
    assert paired_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError, match="2 subject vs 1 baseline"):
        paired_ratios([1.0, 2.0], [1.0])


def test_goal_direction():
    throughput, time = Goal(0.97, at_least=True), Goal(1.05, at_least=False)
    assert throughput.met(0.97) and not throughput.met(0.969)
    assert time.met(1.05) and not time.met(1.051)
    assert str(throughput) == ">= 0.97" and str(time) == "<= 1.05"


def test_compare_uses_the_ratio_of_medians_for_the_goal():
    # One outlier round: the median ratio meets the goal although one paired ratio does not.
    c = compare([99.0, 98.0, 50.0], [100.0, 100.0, 100.0], Goal(0.97, at_least=True))
    assert c["ratio"] == pytest.approx(0.98) and c["met"]
    assert c["round_ratios"]["min"] == pytest.approx(0.5) and c["round_ratios"]["median"] == pytest.approx(0.98)
    unpaired = compare([1.0, 2.0, 3.0], [2.0], paired=False)
    assert unpaired["ratio"] == 1.0 and "round_ratios" not in unpaired and "met" not in unpaired


def test_against_bracket_averages_the_two_baseline_runs():
    c = against_bracket([95.0], before=[100.0, 100.0], after=[90.0, 90.0], goal=Goal(0.97, at_least=True))
    assert c["ratio"] == pytest.approx(1.0) and c["met"]
    assert c["ratio_range"] == pytest.approx([0.95, 95 / 90])


def test_rounds_alternate_which_side_goes_first():
    assert [first_goes_first(i) for i in range(4)] == [True, False, True, False]
