"""The sentences the book writes from numbers (derprop.book.findings), on constructed inputs: signs, ties, empty cases.

The first tests are the book's five wrong sentences of issue 30, each with the numbers that made it wrong.
"""

from __future__ import annotations

import doctest

import pytest

from derprop.book import findings
from derprop.book.findings import (MINUS, above_on, positive_from, awareness, beaten_at, criterion, how_many,
                                   largest_change, noise_sentence, number, trend, two_sources, verdict)


def test_docstring_examples_hold():
    assert doctest.testmod(findings).failed == 0


# --------------------------------------------------------------------------- #
# the five sentences the book had wrong
# --------------------------------------------------------------------------- #
def test_largest_change_is_largest_by_size_not_by_signed_value():
    # the ablations' levers: the signed max named the *smallest* change (temperature, −0.30)
    levers = {"paper profile": -7.09, "λ_Der × 4": -1.52, "temperature 0.5": -0.30, "stride-4 head": -2.10}
    text = largest_change(levers, what="DerProp's trained network")
    assert text.startswith("paper profile changes DerProp's trained network most")
    assert f"{MINUS}7.09 points" in text and "temperature" not in text


def test_beaten_at_names_the_label_count_where_it_beat():
    # chapter 6 said "at no label count" while at 31 labels DerProp was ahead on both networks
    cases = {31: ((35.5, 35.0), (35.2, 33.4)), 62: ((38.9, 38.2), (41.0, 38.5)), 15: ((28.3, 28.9), (30.4, 30.3))}
    text = beaten_at(cases, who="DerProp", other="the baseline")
    assert text.startswith("DerProp beat the baseline on every network at 31 labels (35.5 / 35.0 against 35.2 / 33.4)")
    assert "at no other label count (62 labels: 38.9 / 38.2 against 41.0 / 38.5; 15 labels:" in text


def test_trend_says_a_net_that_stays_negative_stays_negative():
    # chapter 7 said "watch yellow turn azure as κ grows"; the net stayed negative to κ = 20
    text = trend([0, 1, 2, 3, 5, 10, 20], [-5200, -5100, -4800, -4300, -3900, -2500, -1800], x_name="κ",
                 y_name="the net")
    assert text == f"As κ grows from 0 to 20, the net rises from {MINUS}5,200 to {MINUS}1,800, and stays negative."


def test_above_on_says_when_the_ablation_is_above_the_method_on_every_seed():
    # Table 6.3: w/o DLP above DerProp on both seeds, never said
    text = above_on("w/o DLP", "DerProp", {0: (50.3, 49.5), 1: (47.1, 45.8)}, what="'s trained network")
    assert text.startswith("w/o DLP's trained network is above DerProp on both seeds")


def test_the_claim_is_attributed_to_this_book():
    text = criterion(0.02, "supervised + momentum")
    assert text.startswith("this book's criterion") and "the paper states none" in text and "at least 2 points" in text
    assert verdict({"measured": True, "met": False}) == "**not met**"
    assert verdict({"measured": True, "met": True}) == "**met**" and verdict({"measured": False}) == "not measured"


# --------------------------------------------------------------------------- #
# signs, ties and empty cases
# --------------------------------------------------------------------------- #
def test_number_prints_a_real_minus_and_no_negative_zero():
    assert number(-1.234) == f"{MINUS}1.23" and number(1.234, sign=True) == "+1.23"
    assert number(-0.001, sign=True) == "0.00" and number(-0.001) == "0.00"
    assert number(-12345, 0, thousands=True) == f"{MINUS}12,345"


def test_largest_change_positive_wins_over_smaller_negative():
    assert largest_change({"a": -1.0, "b": 3.0}, what="x").startswith("b changes x most: +3.00")


def test_largest_change_ties_at_the_printed_precision():
    text = largest_change({"a": -2.001, "b": 2.004, "c": 0.5}, what="x")
    assert text.startswith("a and b change x equally most") and "c" not in text.split("by")[1]
    assert largest_change({"a": 0.001}, what="x").startswith("None changes x")
    assert largest_change({}, what="x") == "No change of x was measured."


def test_beaten_at_everywhere_nowhere_and_ties():
    every = beaten_at({1: ((2.0,), (1.0,)), 2: ((3.0,), (2.0,))}, who="A", other="B")
    assert every.startswith("A beat B on every network at every label count")
    tie = beaten_at({1: ((2.04, 3.0), (2.0, 1.0))}, who="A", other="B")  # 2.0 = 2.0 as printed: no win
    assert tie.startswith("A beat B at no label count")
    one_net = beaten_at({1: ((2.0, None), (1.0, 5.0))}, who="A", other="B")  # only networks both have count
    assert one_net.startswith("A beat B on every network at every label count")
    assert beaten_at({}, who="A", other="B") == "A was not compared with B."


def test_above_on_mixed_level_and_counts():
    text = above_on("A", "B", {0: (2.0, 1.0), 1: (1.0, 1.04), 2: (0.0, 1.0)})
    assert text.startswith("A is above B on seed 0, level with B on seed 1 and below B on seed 2")
    assert above_on("A", "B", {0: (1.0, 2.0), 1: (1.0, 3.0), 2: (0.0, 1.0)}).startswith("A is below B on all three seeds")
    assert above_on("A", "B", {0: (1.0, 1.0)}).startswith("A is level with B on the one seed")
    assert how_many(2, 3, "seed") == "2 of 3 seeds" and how_many(0, 3, "seed") == "no seed"
    measures = above_on("A", "B", {"share": (0.5, 0.4), "accuracy": (0.8, 0.9)}, noun="measure", label=str)
    assert measures == "A is above B on share and below B on accuracy (share: 0.5 against 0.4; accuracy: 0.8 against 0.9)."
    both = above_on("A", "B", {"share": (0.5, 0.4), "accuracy": (0.9, 0.8)}, noun="measure", label=str)
    assert both.startswith("A is above B on both measures (share: 0.5")


def test_trend_sign_changes_falls_and_flat():
    assert trend([0, 1, 2], [-5, 3, 8], x_name="κ", y_name="y").endswith("it is first positive at κ = 1.")
    assert trend([0, 1, 2], [5, -3, -8], x_name="κ", y_name="y").startswith("As κ grows from 0 to 2, y falls from 5 to")
    assert "(not monotonically)" in trend([0, 1, 2], [1, 5, 2], x_name="κ", y_name="y")
    assert "ends where it starts" in trend([0, 1], [4, 4], x_name="κ", y_name="y")
    assert trend([2, 0, 1], [8, -5, 3], x_name="κ", y_name="y") == trend([0, 1, 2], [-5, 3, 8], x_name="κ", y_name="y")
    with pytest.raises(ValueError):
        trend([0, 1], [1], x_name="κ", y_name="y")


def test_awareness_bounds():
    assert awareness(1.05) == "hardly class-aware" and awareness(1.1) == "only mildly class-aware"
    assert awareness(2.68) == "moderately class-aware" and awareness(4.0) == "strongly class-aware"


def test_two_sources_show_both_and_their_gap():
    text = two_sources("The seed-0 warm start", 35.33, "this build: x", 40.33, "committed: y")
    assert "35.33 % in this build (this build: x)" in text and "40.33 % in the committed evidence" in text
    assert text.endswith("5.00 points apart.")
    assert two_sources("w", 40.331, "a", 40.329, "b").endswith("the same to the digits shown.")


def test_noise_sentence_with_and_without_a_measurement():
    assert "not measured" in noise_sentence(None)
    noise = {"by_threads": {"1": {"range": 0.0}, "2": {"range": 0.0}}, "machine_range": 0.04,
             "seed_spread": {"std": 0.0237, "range": 0.0621}}
    text = noise_sentence(noise, "committed: `results/thread_noise.json`")
    assert "moves by 0.00 points" in text and "between 1 thread and 2 threads it moves by 4.00 points" in text
    assert "spread over seeds of 2.37 points" in text and text.endswith("(committed: `results/thread_noise.json`).")


def test_positive_from_says_from_only_when_every_later_point_is_positive():
    pts = [(2.8, "a", 3.0), (4.1, "b", -6.1), (6.1, "c", -28.3)]
    assert positive_from(pts) == "net positive only at 2.8 cells (a: +3.0 per 1,000), negative elsewhere"
    pts = [(2.8, "a", -9.2), (4.1, "b", 14.0), (6.1, "c", 20.0)]
    assert positive_from(pts) == "net positive from 4.1 cells on (b: +14.0 per 1,000)"
    assert positive_from([(2.8, "a", -1.0), (4.1, "b", 0.0)]) == "net negative at every geometry"
    assert positive_from([(2.8, "a", 1.0), (4.1, "b", -1.0), (6.1, "c", 2.0)]).startswith(
        "net positive only at 2.8 and 6.1 cells")
