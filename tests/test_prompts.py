"""The protocol's text is the paper's released code's, verbatim, and laid out as scl/prompts.py says."""
import pytest

from scl import prompts
from scl.answers import extract_answer

# Copied by hand from the paper's released code (github.com/ivy3h/SCL), IDs 0..3.
PAPER = {
    "cp": "Review your previous answer and find problems with your answer. Based on the problems you found, "
          "improve your answer.",
    "vp1": "Review your previous answer and ensure that all relevant aspects of the image have been considered. "
           "Are there any elements or details that you missed? Based on your review, improve your answer.",
    "vp2": "Review your contextual understanding of the image. Have you correctly interpreted the overall context "
           "and purpose of the scene? Based on your review, improve your answer.",
    "vp3": "Review your answer and ensure that your understanding of the image is comprehensive and detailed. Are "
           "there any aspects of the scene that you have omitted or misinterpreted? Based on your review, improve "
           "your answer.",
}
COT = "Explain your reasoning step-by-step."
FORMAT = ("Your final answer should be put between two ##, like ## A ## (if your final answer is A), at the end "
          "of your response.")


def test_verbatim_sentences():
    assert prompts.COT == COT
    assert prompts.FORMAT == FORMAT
    assert prompts.REVIEW_PROMPTS == PAPER
    assert prompts.PROMPT_NAMES == ("sp", "cp", "vp1", "vp2", "vp3")


def test_turn1_layout():
    msg = prompts.turn1_message("How many circles are there?", ["two", "three", "four"])
    assert msg.split("\n") == ["How many circles are there?", "A. two", "B. three", "C. four", COT, FORMAT]


def test_turn1_hint_comes_first():
    msg = prompts.turn1_message("Which is bigger?", ["the cat", "the dog"], hint="Look at the left.")
    assert msg.split("\n")[:2] == ["Hint: Look at the left.", "Which is bigger?"]
    assert prompts.turn1_message("Q?", ["a", "b"], hint="") == prompts.turn1_message("Q?", ["a", "b"])


@pytest.mark.parametrize("name", ["cp", "vp1", "vp2", "vp3"])
def test_review_message(name):
    assert prompts.review_message(name) == f"{PAPER[name]} {COT} {FORMAT}"


def test_sp_and_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="no review turn"):
        prompts.review_message("sp")
    with pytest.raises(ValueError, match="vp1"):
        prompts.review_message("vp4")


def test_option_count_limits():
    with pytest.raises(ValueError):
        prompts.turn1_message("Q?", [])
    assert prompts.turn1_message("Q?", [str(i) for i in range(26)]).split("\n")[26] == "Z. 25"


def test_an_echoed_format_sentence_does_not_hide_the_answer():
    # The sentence holds "##, like ## A ##": a stray "##" that must not pair with the real marker.
    assert extract_answer(FORMAT + " The circles are blue. ## C ##") == "C"
    assert extract_answer(FORMAT) == "A"  # the echo alone reads as its example: why the LAST one wins


def test_turn1_official_layout_is_the_released_code():
    # inference.py: question + " A. x B. y" + "\nExplain your reasoning step-by-step." + " Your final answer ..."
    msg = prompts.turn1_message_official("How many circles are there?", ["two", "three", "four"])
    assert msg == f"How many circles are there? A. two B. three C. four\n{COT} {FORMAT}"
    # No hint, whatever the row holds; options split out of an MMStar question go back inline.
    assert "Hint" not in msg and msg.count("\n") == 1
    assert prompts.turn1_message("Q?", ["a", "b"]) == f"Q?\nA. a\nB. b\n{COT}\n{FORMAT}"  # unchanged
    with pytest.raises(ValueError):
        prompts.turn1_message_official("Q?", [])
