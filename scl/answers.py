"""The one answer extractor: response text -> option letter or None, the same in generation,
SelfCorSet and evaluation, so "correct" means one thing everywhere. The first stage that finds an
answer decides:

  1. `## X ##` markers (prompts.FORMAT). The LAST marker holding a valid letter wins: a response may
     reconsider ("## A ## ... on reflection ## C ##"). `B`, `(B)`, `B.`, `C. blue`, `Option B`,
     `Answer: B` count; `## blue ##`, `## A cat ##`, `## A, B ##` and letters outside the options do not.
  2. Explicit answer phrases ("the answer is B", "final answer: d"); again the last one wins.
  3. Otherwise None: counted apart from wrong and never used to build a pair.
"""
import re

# `##`, one line without '#', `##`: a markdown heading ("### Step 1") never pairs with the real marker.
# A lookahead, tried at every `##`, so a stray `##` cannot shift the pairing and swallow the real one.
_MARKER = re.compile(r"(?=##([^#\n]{0,200}?)##)")
# Inside a marker: optional "option"/"answer:" prefix, the letter (maybe bracketed), the rest.
_IN_MARKER = re.compile(
    r"\s*(?:(?:final\s+)?answer\s*[:=]?\s*|option\s+|choice\s+)?"
    r"(?P<open>[(\[]?)\s*(?P<letter>[A-Za-z])\s*(?P<close>[)\]]?)(?P<rest>.*)", re.IGNORECASE)
# An explicit phrase ends in a connector: "answer is", "answer:", "correct option would be".
_PHRASE = re.compile(
    r"\b(?:answer|(?:correct|best|right)\s+(?:option|choice))\s*"
    r"(?:(?:is|would\s+be|should\s+be|will\s+be|must\s+be)\b\s*[:=]?|[:=])", re.IGNORECASE)
# What follows the connector: maybe "option", the letter (maybe bracketed), a word end, the rest.
_AFTER_PHRASE = re.compile(
    r"\s*(?:(?:option|choice)\s+)?(?P<open>[(\[]?)\s*(?P<letter>[A-Za-z])\s*(?P<close>[)\]]?)"
    r"(?![A-Za-z0-9])(?P<rest>[^\n]*)", re.IGNORECASE)


def _letter(m, n_options, rest_needs_separator):
    """The letter of a marker/phrase match, or None. A lowercase letter needs nothing but punctuation
    after it ("the answer is a dog" is not A); an uppercase one in a marker needs the end, a bracket or
    a separator after it ("C. blue", "B) four"; "A cat" is option text, "A, B" is two answers)."""
    letter, rest = m.group("letter"), m.group("rest").strip()
    if letter.islower() and any(c.isalnum() for c in rest):
        return None
    if rest_needs_separator and rest and not m.group("close") and rest[0] not in ".:-":
        return None
    if not "A" <= letter.upper() <= chr(ord("A") + n_options - 1):
        return None  # not one of the options
    return letter.upper()


def _last_letter(matches, n_options, rest_needs_separator):
    """The letter of the last match that gives one (a response may reconsider), or None."""
    letters = [_letter(m, n_options, rest_needs_separator) for m in matches if m]
    return next((letter for letter in reversed(letters) if letter), None)


def extract_answer(text, n_options=4):
    """The option letter a response gives ("A".."Z", within the first n_options) or None.
    Never raises: any input that is not a str, or holds no answer, gives None."""
    if not isinstance(text, str) or not text:
        return None
    try:
        n_options = max(0, min(26, int(n_options)))  # 0 options: no letter is in range
    except (TypeError, ValueError, OverflowError):
        return None
    markers = (_IN_MARKER.fullmatch(m.group(1)) for m in _MARKER.finditer(text))
    plain = text.replace("*", "")  # markdown bold: "**Answer:** B", "the answer is **B**"
    phrases = (_AFTER_PHRASE.match(plain, p.end()) for p in _PHRASE.finditer(plain))
    return (_last_letter(markers, n_options, rest_needs_separator=True)
            or _last_letter(phrases, n_options, rest_needs_separator=False))
