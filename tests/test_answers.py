"""extract_answer: the documented cascade on hand-written responses, and never raising on any text."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scl.answers import extract_answer

CASES = [
    # 1. `## X ##` markers, the format the prompt asks for
    ("The circle is red. ## B ##", 4, "B"),
    ("##B##", 4, "B"),
    ("## b ##", 4, "B"),  # lowercase alone in a marker is unambiguous
    ("## C. blue ##", 4, "C"),  # the paper's code returned "C. blue" here, never equal to a letter
    ("## (D) ##", 4, "D"),
    ("## B) four ##", 4, "B"),
    ("## Option A ##", 4, "A"),
    ("## Answer: C ##", 4, "C"),
    ("First I thought ## A ##. On reflection, ## C ##", 4, "C"),  # the last marker wins
    ("## A ## ## B ## ## D ##", 4, "D"),
    ("Put it like ## A ## as asked... final: ## c ##.", 4, "C"),
    ("### Step 1\nCount the shapes.\n### Step 2\nThere are three. ## B ##", 4, "B"),  # headings skipped
    ("## E ##", 4, None),  # outside the 4 options: not an answer
    ("## E ##", 5, "E"),
    ("## D ## then ## E ##", 4, "D"),  # the out-of-range marker is ignored, the valid one stays
    ("## blue ##", 4, None),  # option text without a letter
    ("## A cat ##", 4, None),  # option text that merely starts with a capital
    ("## A, B ##", 4, None),  # two letters are no answer
    ("## a. cat ##", 4, None),  # lowercase followed by words
    ("The answer is ## B ## and the answer is C", 4, "B"),  # markers outrank phrases
    ("Put it between two ##, like this. So: ## B ##", 4, "B"),  # a stray ## does not shift pairing
    ("## A ## or ## B ##", 4, "B"),
    # 2. explicit answer phrases
    ("The answer is B", 4, "B"),
    ("The answer is B because the circle is blue.", 4, "B"),
    ("answer: (c)", 4, "C"),
    ("final answer: d", 4, "D"),
    ("The correct option is (B).", 4, "B"),
    ("**Answer:** C", 4, "C"),
    ("The answer is A. Wait, no: the answer would be D.", 4, "D"),  # the last phrase wins
    ("the answer is: a.", 4, "A"),
    ("The answer is option D", 4, "D"),
    ("the answer is a dog", 4, None),  # English, not option A
    ("Answer: The image shows a dog.", 4, None),
    ("The answer is F", 4, None),
    ("The answer is not clear.", 4, None),
    ("## E ## so the answer is B", 4, "B"),  # no valid marker: the phrase decides
    # 3. nothing explicit
    ("A. red\nB. blue\nI think it is blue.", 4, None),  # listed options are not answers
    ("B", 4, None),  # a bare letter is not an explicit answer
    ("", 4, None),
    ("   \n\t", 4, None),
    ("####", 4, None),
    ("## ##", 4, None),
    ("#\u200b# A ##", 4, None),
]


@pytest.mark.parametrize("text,n,expected", CASES)
def test_cases(text, n, expected):
    assert extract_answer(text, n_options=n) == expected


def test_default_is_four_options():
    assert extract_answer("## D ##") == "D" and extract_answer("## E ##") is None


@pytest.mark.parametrize("junk", [None, 3, b"## A ##", ["## A ##"], {"a": 1}, 1.5])
def test_non_strings_are_none(junk):
    assert extract_answer(junk) is None


@pytest.mark.parametrize("n", [0, -3, "x", None, float("inf")])
def test_bad_n_options_is_none(n):
    assert extract_answer("## A ##", n_options=n) is None


def test_n_options_caps_at_26():
    assert extract_answer("## Z ##", n_options=100) == "Z"


@settings(max_examples=400, deadline=None)
@given(st.text(), st.integers(min_value=-5, max_value=40))
def test_never_raises_and_stays_in_range(text, n):
    got = extract_answer(text, n_options=n)
    assert got is None or (len(got) == 1 and "A" <= got <= chr(ord("A") + min(n, 26) - 1))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["## ", " ##", "#", "A", "b", "answer is ", "(", ")", ".", "\n", "E", " "]),
                max_size=30).map("".join), st.integers(min_value=1, max_value=6))
def test_never_raises_on_marker_soup(text, n):
    got = extract_answer(text, n_options=n)
    assert got is None or "A" <= got <= "ABCDEF"[n - 1]
