"""The one answer extractor: response text -> option letter or None.

Used unchanged by generation, SelfCorSet construction and evaluation, so "correct" means the same
thing everywhere. The cascade, in order; the first stage that finds an answer decides:

  1. `## X ##` markers (the format the prompt asks for, prompts.FORMAT). The LAST marker holding a
     valid letter wins: the prompt asks for the final answer at the end, and a response may first
     restate or reconsider ("## A ## ... on reflection ## C ##"). Accepted contents: `B`, `b`, `(B)`,
     `B.`, `B)`, `B: text`, `C. blue`, `Option B`, `Answer: B`. Markers without a letter (`## blue ##`),
     with words right after the letter (`## A cat ##`), with two letters (`## A, B ##`) or with a
     letter outside the options (`## E ##` for 4 options) are not answers and are ignored.
  2. Explicit answer phrases: "the answer is B", "Answer: (C)", "final answer: d", "the correct
     option is B"; again the last one wins.
  3. Otherwise None: unparseable, counted apart from wrong and never used to build a pair.

Lowercase letters count inside a marker or an explicit phrase only when nothing but punctuation
follows them ("answer: d", "## b ##"), because "the answer is a dog" is English, not option A.
A bare letter elsewhere in the text ("A. red" while listing options) is never an answer.

Differences from the paper's code, on purpose: the paper takes the FIRST `## [ABCD] ##` match, then
falls back to whatever text sits between `##`s (so `## C. blue ##` gives "C. blue", never equal to a
gold letter), then to the first "X." anywhere, which picks up options the model merely lists. We
allow up to 26 options (n_options), read `## C. blue ##` as C, and drop the "X." fallback.
ScienceQA's numeric `## 0 ##` form is not accepted: our loader maps its choices to letters.
"""
import re

# A marker: `##`, at most one line of anything but '#', `##`. Excluding '#' and newlines keeps
# markdown headings ("### Step 1") from pairing with the real marker further down. Matched as a
# lookahead, i.e. starting at every `##`: a stray `##` (an echoed "between two ##, like ## A ##")
# must not shift the pairing and swallow the real marker after it.
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
    """The letter of a marker/phrase match, or None. A lowercase letter needs nothing but
    punctuation after it; an uppercase one in a marker needs the end, a bracket or a separator
    after it ("C. blue", "B) four"; "A cat" is option text, "A, B" is two answers)."""
    letter, rest = m.group("letter"), m.group("rest").strip()
    if letter.islower() and any(c.isalnum() for c in rest):
        return None
    if rest_needs_separator and rest and not m.group("close") and rest[0] not in ".:-":
        return None
    if not "A" <= letter.upper() <= chr(ord("A") + n_options - 1):
        return None  # not one of the options
    return letter.upper()


def _from_phrases(text, n_options):
    text = text.replace("*", "")  # markdown bold: "**Answer:** B", "the answer is **B**"
    found = None
    for p in _PHRASE.finditer(text):
        m = _AFTER_PHRASE.match(text, p.end())
        letter = _letter(m, n_options, rest_needs_separator=False) if m else None
        found = letter or found
    return found


def extract_answer(text, n_options=4):
    """The option letter a response gives ("A".."Z", within the first n_options) or None.
    Never raises: any input that is not a str, or holds no answer, gives None."""
    if not isinstance(text, str) or not text:
        return None
    try:
        n_options = max(0, min(26, int(n_options)))
    except (TypeError, ValueError, OverflowError):
        return None
    if n_options == 0:
        return None
    found = None
    for m in _MARKER.finditer(text):
        inner = _IN_MARKER.fullmatch(m.group(1))
        letter = _letter(inner, n_options, rest_needs_separator=True) if inner else None
        found = letter or found
    return found or _from_phrases(text, n_options)
