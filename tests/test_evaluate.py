"""scl/evaluate.py: the statistics on hand-made responses (accuracy, 4-type transitions, McNemar on a
known table, the paired bootstrap) and the report writer."""
import math

import pytest

from scl.evaluate import accuracy, bootstrap_diff, circular_accuracy, compare, mcnemar, report_markdown, transitions


def rec(id_, *answers, gold="A"):
    return {"id": id_, "gold": gold,
            "turns": [{"text": "", "answer": a, "correct": a == gold} for a in answers]}


RECORDS = [rec("q1", "A", "A"), rec("q2", "B", "A"), rec("q3", "A", "C"), rec("q4", "B", "D"),
           rec("q5", None, "A"), rec("q6", "A", "A", "B")]


def test_accuracy_and_transitions_on_hand_made_records():
    assert accuracy(RECORDS, 0) == pytest.approx(3 / 6)  # unparsed (q5) counts as not correct
    assert accuracy(RECORDS, 1) == pytest.approx(4 / 6)
    assert transitions(RECORDS) == {"1": 2, "2": 1, "3": 1, "4": 1, "unparsed": 1}
    assert transitions([RECORDS[-1]], 1, 2) == {"1": 0, "2": 0, "3": 1, "4": 0, "unparsed": 0}


def test_circular_accuracy_needs_every_rotation_right():
    # question 7 asked three times (rotations 7, 1000007, 2000007), question 8 twice, all right but one
    records = [rec("7", "A"), rec("1000007", "A"), rec("2000007", "B"), rec("8", "A"), rec("1000008", "A")]
    assert circular_accuracy(records) == pytest.approx(1 / 2)
    assert accuracy(records) == pytest.approx(4 / 5)
    assert circular_accuracy(RECORDS) is None  # no rotated copies: no circular score


def test_mcnemar_exact_on_known_tables():
    # b = 10, c = 2: 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert mcnemar(10, 2) == pytest.approx(158 / 4096)
    assert mcnemar(2, 10) == mcnemar(10, 2)
    assert mcnemar(5, 5) == 1.0
    assert mcnemar(0, 0) == 1.0
    assert mcnemar(0, 7) == pytest.approx(2 / 2 ** 7)
    assert mcnemar(40, 60) == pytest.approx(2 * sum(math.comb(100, i) for i in range(41)) / 2 ** 100)


def test_compare_pairs_questions_by_id_and_counts_discordant():
    base = [rec(f"q{i}", "A" if i < 5 else "B") for i in range(10)]  # right on q0..q4
    tuned = [rec(f"q{i}", "A" if i < 8 else "B") for i in reversed(range(10))]  # right on q0..q7, other order
    c = compare(base, tuned)
    assert (c["only_a_right"], c["only_b_right"]) == (0, 3)
    assert c["difference"] == pytest.approx(0.3)
    assert c["p_value"] == pytest.approx(mcnemar(0, 3))
    assert c["ci95"][0] <= 0.3 <= c["ci95"][1]


def test_bootstrap_is_degenerate_when_models_agree_and_seeded():
    same = [True, False, True, True]
    assert bootstrap_diff(same, same) == (0.0, 0.0)
    a, b = [True] * 50 + [False] * 50, [True] * 70 + [False] * 30
    assert bootstrap_diff(a, b, seed=1) == bootstrap_diff(a, b, seed=1)
    lo, hi = bootstrap_diff(a, b, seed=1)
    assert 0 < lo < 0.2 < hi


def test_report_lists_every_prompt_and_round():
    m = {"questions": 6, "test_accuracy": 0.5, "unparsed_rate": 1 / 6,
         "prompts": {"cp": {"turn1_accuracy": 0.5, "turn2_accuracy": 0.6, "transitions": transitions(RECORDS)}},
         "rounds": {"prompt": "cp", "accuracy": [0.5, 0.6, 0.55]}}
    text = report_markdown({"base": m}, None)
    assert "| base | cp | 50.0% | 60.0% | 2 | 1 | 1 | 1 | 1 |" in text
    assert "55.0%" in text
