"""Multiple-choice image questions from disk -> `Row`s, bad rows skipped with a reason (DESIGN §6, §7).

Three formats, picked from the file name (or `format=`):
    jsonl     : one {"id", "image", "question", "options", "answer"[, "hint"]} per line; the image path
                is relative to the file (the built-in task and any user set; DESIGN §6).
    tsv       : MMBench-style: columns index, question, [hint], A, B, C, D, ..., answer, image (base64).
                A row whose image is a short integer reuses the image of the row with that index
                (MMBench stores each image once). Empty trailing option columns are dropped.
    scienceqa : ScienceQA's problems.json, {id: {question, choices, answer (index), image, split, hint}},
                images at <dir>/images/<split>/<id>/<image> (or <dir>/<split>/<id>/, <dir>/<id>/).
                Choices become options A, B, ...; the integer answer becomes its letter.

A bad row (malformed line, missing or corrupt image, fewer than 2 options, an answer that is not one
of the option letters, a repeated id) never stops a run: it is returned in `skipped` as
{"id", "reason"} for the caller to write to skipped.jsonl. A missing data file is an error.
"""
import base64
import csv
import json
import os
import re
from dataclasses import dataclass, field

from PIL import Image

from scl.image import open_image
from scl.prompts import LETTERS

FORMATS = ("jsonl", "tsv", "scienceqa")


@dataclass
class Row:
    id: str  # unique within the file; names the question in responses.jsonl and resumes
    image: Image.Image = field(repr=False)  # RGB, fully decoded (a corrupt file fails at load time)
    question: str
    options: list  # option texts, without their "A. " labels; letters are given by position
    answer: str  # gold letter, "A".."Z", within the options
    image_path: str | None = None  # where the image came from, when it was a file
    hint: str | None = None  # context some benchmarks give with the question (MMBench, ScienceQA)


class BadRow(Exception):
    """A row that cannot be used; the message is the human-readable reason."""


def _open_image(src, name):
    """A fully decoded RGB image from a path or bytes, or BadRow naming it."""
    if isinstance(src, str) and not os.path.isfile(src):
        raise BadRow(f"image not found: {name}")
    try:
        return open_image(src)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise BadRow(f"corrupt image {name}: {type(e).__name__}: {e}") from None


_LABEL = re.compile(r"\s*\(?([A-Za-z])[.):]\s+(.*)", re.DOTALL)


def _clean_options(options):
    """Option texts with any "A. " / "(A) " label of their own position removed."""
    if not isinstance(options, list) or not options:
        raise BadRow("no options")
    out = []
    for i, text in enumerate(options):
        if not isinstance(text, str) or not text.strip():
            raise BadRow(f"option {LETTERS[i] if i < 26 else i} is empty")
        m = _LABEL.fullmatch(text)
        out.append(m.group(2).strip() if m and m.group(1).upper() == LETTERS[i] else text.strip())
    if len(out) < 2:
        raise BadRow(f"only {len(out)} option; a multiple-choice question needs at least 2")
    if len(out) > len(LETTERS):
        raise BadRow(f"{len(out)} options; at most {len(LETTERS)} can be lettered")
    return out


def _make_row(rid, question, options, answer, load_image, image_path=None, hint=None):
    """Validate the text fields first (cheap), then decode the image."""
    if not isinstance(question, str) or not question.strip():
        raise BadRow("no question")
    options = _clean_options(options)
    letter = answer.strip().upper() if isinstance(answer, str) else None
    if not letter or len(letter) != 1 or letter not in LETTERS:
        raise BadRow(f"answer {answer!r} is not an option letter")
    if LETTERS.index(letter) >= len(options):
        raise BadRow(f"answer {letter} is outside the options A-{LETTERS[len(options) - 1]}")
    hint = hint.strip() if isinstance(hint, str) and hint.strip() else None
    return Row(id=rid, image=load_image(), question=question.strip(), options=options, answer=letter,
               image_path=image_path, hint=hint)


# ----------------------------------------------------------------------------- readers
# Each yields (id, where, make): `make()` builds the Row or raises BadRow, so images are decoded only
# for rows that are kept (and not at all past `limit`).

def _jsonl(path, split):
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield None, f"line {n}", _raise(f"malformed JSON: {e}")
                continue
            if not isinstance(obj, dict):
                yield None, f"line {n}", _raise("not a JSON object")
                continue
            rid = str(obj["id"]) if obj.get("id") is not None else str(n)  # no id: the line number
            image = obj.get("image")
            if not isinstance(image, str) or not image:
                yield rid, f"line {n}", _raise("no image path")
                continue
            ipath = image if os.path.isabs(image) else os.path.join(base, image)
            yield rid, f"line {n}", lambda o=obj, r=rid, p=ipath, i=image: _make_row(
                r, o.get("question"), o.get("options"), o.get("answer"), lambda: _open_image(p, i),
                image_path=p, hint=o.get("hint"))


def _raise(reason):
    def make():
        raise BadRow(reason)
    return make


def _missing(value):
    return value is None or value.strip() == "" or value.strip().lower() == "nan"  # pandas writes nan


def _tsv(path, split):
    csv.field_size_limit(2**31 - 1)  # base64 images are far longer than csv's 128 KiB default
    with open(path, encoding="utf-8", newline="") as f:
        table = list(csv.reader(f, delimiter="\t"))
    if not table:
        return
    header = table[0]
    for col in ("index", "question", "answer", "image"):
        if col not in header:
            raise ValueError(f"{path}: TSV has no {col!r} column (header: {', '.join(header)})")
    letters = [c for c in LETTERS if c in header]
    letters = letters[: next((i for i, c in enumerate(letters) if c != LETTERS[i]), len(letters))]
    body = [(n, dict(zip(header, raw)), len(raw)) for n, raw in enumerate(table[1:], start=2) if raw]
    images = {r["index"].strip(): r["image"] for _, r, width in body
              if width == len(header) and len(r["image"].strip()) > 16}
    for n, r, width in body:
        rid = (r.get("index") or "").strip() or str(n)
        if width != len(header):
            yield rid, f"line {n}", _raise(f"{width} fields, the header has {len(header)}")
            continue
        values = [None if _missing(r[c]) else r[c] for c in letters]
        while values and values[-1] is None:
            values.pop()  # MMBench leaves C/D empty for two- and three-option questions
        ref = r["image"].strip()
        if ref.isdigit() and len(ref) <= 16:  # a reference to another row's image, by index
            if ref not in images:
                yield rid, f"line {n}", _raise(f"image refers to index {ref}, which has no image")
                continue
            ref, name = images[ref], f"(base64, of index {ref})"
        else:
            name = "(base64)"
        yield rid, f"line {n}", lambda r=r, rid=rid, v=values, b64=ref, name=name: _make_row(
            rid, r["question"], ["" if x is None else x for x in v], r["answer"],
            lambda: _open_image(_b64(b64, name), name), hint=None if _missing(r.get("hint")) else r["hint"])


def _b64(text, name):
    try:
        return base64.b64decode(text, validate=False)
    except Exception as e:
        raise BadRow(f"corrupt image {name}: not base64 ({e})") from None


def _scienceqa(path, split):
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        problems = json.load(f)
    if not isinstance(problems, dict):
        raise ValueError(f"{path}: expected ScienceQA's {{id: problem}} object")
    for pid, p in problems.items():
        if not isinstance(p, dict):
            yield str(pid), f"problem {pid}", _raise("not a JSON object")
            continue
        if split is not None and p.get("split") != split:
            continue  # not in the requested split: filtered, not skipped
        yield str(pid), f"problem {pid}", lambda pid=str(pid), p=p: _scienceqa_row(base, pid, p)


def _scienceqa_row(base, pid, p):
    if not p.get("image"):
        raise BadRow("no image (a text-only question)")
    choices, answer = p.get("choices"), p.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool) or not isinstance(choices, list):
        raise BadRow(f"answer {answer!r} is not an index into the choices")
    letter = LETTERS[answer] if 0 <= answer < len(LETTERS) else f"#{answer}"
    candidates = [os.path.join(base, *parts, pid, p["image"]) for parts in
                  (("images", str(p.get("split", ""))), ("images",), (str(p.get("split", "")),), ())]
    ipath = next((c for c in candidates if os.path.isfile(c)), candidates[0])
    return _make_row(pid, p.get("question"), choices, letter, lambda: _open_image(ipath, ipath),
                     image_path=ipath, hint=p.get("hint"))


def _detect(path):
    name = os.path.basename(path).lower()
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith(".json"):
        return "scienceqa"  # the only .json layout we read (problems.json)
    raise ValueError(f"{path}: cannot tell the data format from the name; pass format= one of {FORMATS}")


def load_rows(path, format=None, limit=None, split=None):
    """Read a data file -> (rows, skipped). `limit` caps the rows kept; `split` filters ScienceQA
    problems by their "split" field. skipped: [{"id": str | None, "reason": str}, ...]."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    fmt = format or _detect(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; one of {FORMATS}")
    reader = {"jsonl": _jsonl, "tsv": _tsv, "scienceqa": _scienceqa}[fmt]
    rows, skipped, seen = [], [], {}
    for rid, where, make in reader(path, split):
        if limit is not None and len(rows) >= limit:
            break
        try:
            if rid is not None and rid in seen:
                raise BadRow(f"duplicate id {rid!r} (first at {seen[rid]})")
            row = make()
        except BadRow as e:
            skipped.append({"id": rid, "reason": f"{where}: {e}"})
            continue
        seen[rid] = where
        rows.append(row)
    return rows, skipped
