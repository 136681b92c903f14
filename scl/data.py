"""Multiple-choice image questions from disk -> `Row`s, bad rows skipped with a reason.

Benchmarks are read as distributed; the format comes from the name (or `format=`):
    jsonl     : {"id", "image", "question", "options", "answer"[, "hint"]} per line; image path relative
    tsv       : VLMEvalKit's TSVs (MMBench, SEEDBench_IMG, MMStar, ...), base64 images
    scienceqa : problems.json; images at <dir>/images/<split>/<id>/<image>
    parquet   : a Hugging Face file or folder of shards, {bytes, path} images (needs pyarrow)
An image is decoded each time `row.image` is read and never kept: a benchmark's pixels would not fit
in memory at once.
"""
import ast
import base64
import csv
import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable

from scl.image import open_image
from scl.prompts import LETTERS

FORMATS = ("jsonl", "tsv", "scienceqa", "parquet")
CIRCULAR = 1_000_000  # MMBench: the k-th rotated copy of question i has index i + k * CIRCULAR
_MULTI_IMAGE = "images in one row (a multi-image question); only single-image questions are supported"


@dataclass
class Row:
    id: str  # unique within the file; names the question in responses.jsonl and resumes
    question: str
    options: list  # option texts, without their "A. " labels; letters are given by position
    answer: str  # gold letter, "A".."Z", within the options
    load_image: Callable = field(repr=False, compare=False)  # () -> RGB image, decoded anew per call
    image_path: str | None = None  # where the image came from, when it was a file
    hint: str | None = None  # context some benchmarks give with the question (MMBench, ScienceQA)

    @property
    def image(self):
        return self.load_image()


class BadRow(Exception):
    """A row that cannot be used; the message is the reason."""


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
    if len(options) > len(LETTERS):
        raise BadRow(f"{len(options)} options; at most {len(LETTERS)} can be lettered")
    out = []
    for i, text in enumerate(options):
        if not isinstance(text, str) or not text.strip():
            raise BadRow(f"option {LETTERS[i]} is empty")
        m = _LABEL.fullmatch(text)
        out.append(m.group(2).strip() if m and m.group(1).upper() == LETTERS[i] else text.strip())
    if len(out) < 2:
        raise BadRow(f"only {len(out)} option; a multiple-choice question needs at least 2")
    return out


def _make_row(rid, question, options, answer, load_image, image_path=None, hint=None):
    """Validate the text fields; the image is left to `load_image`, called when it is used."""
    if not isinstance(question, str) or not question.strip():
        raise BadRow("no question")
    options = _clean_options(options)
    letter = answer.strip().upper() if isinstance(answer, str) else None
    if not letter or len(letter) != 1 or letter not in LETTERS:
        raise BadRow(f"answer {answer!r} is not an option letter")
    if LETTERS.index(letter) >= len(options):
        raise BadRow(f"answer {letter} is outside the options A-{LETTERS[len(options) - 1]}")
    hint = hint.strip() if isinstance(hint, str) and hint.strip() else None
    return Row(id=rid, question=question.strip(), options=options, answer=letter, load_image=load_image,
               image_path=image_path, hint=hint)


# ----------------------------------------------------------------------------- options in the question

_INLINE = re.compile(r"(?:^|,\s*)([A-Z]):\s")  # MMStar: "Options: A: x, B: y, C: z, D: w"
_LINE = re.compile(r"\s*\(?([A-Z])[.):]\s+(\S.*)")  # one per line: "A. x", "A) x", "(A) x"
_INSTRUCTION = re.compile(r"(please|answer)\b.*\b(letter|option)", re.IGNORECASE | re.DOTALL)


def split_options(text):
    """A question with its options written inside (MMStar, RealWorldQA) -> (stem, [option texts]), or
    (text, []). Never guesses: labels out of order or followed by other text than an answer instruction
    raise BadRow."""
    head, sep, tail = text.rpartition("Options:")
    marks = list(_INLINE.finditer(tail.strip())) if sep else []
    if marks:
        letters, tail = "".join(m.group(1) for m in marks), tail.strip()
        if text.count("Options:") > 1 or letters != LETTERS[:len(letters)] or len(letters) < 2:
            raise BadRow(f"options after 'Options:' cannot be split unambiguously (labels {', '.join(letters)})")
        ends = [m.start() for m in marks[1:]] + [len(tail)]
        options = [tail[m.end():end].strip() for m, end in zip(marks, ends)]
        extra = options[-1].partition("\n")[2]  # one line holds them all; more is text we cannot place
        if extra:
            raise BadRow(f"text after the options on a new line: {extra[:60]!r}")
        return head.strip(), options
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if (m := _LINE.fullmatch(line)) and m.group(1) == "A"]
    if not starts:
        return text.strip(), []
    if len(starts) > 1:
        raise BadRow("two lines start with option A; cannot tell which list holds the options")
    options, end = [], starts[0]
    for i in range(starts[0], len(lines)):  # the next letter's line, blank lines between allowed
        m = _LINE.fullmatch(lines[i])
        if m and len(options) < len(LETTERS) and m.group(1) == LETTERS[len(options)]:
            options.append(m.group(2).strip())
            end = i + 1
        elif lines[i].strip():
            break
    rest = "\n".join(lines[end:]).strip()
    if rest and not _INSTRUCTION.match(rest):
        raise BadRow(f"text after the options is not an answer instruction: {rest[:60]!r}")
    if len(options) < 2:
        raise BadRow("only one option line (A) in the question")
    stem = re.sub(r"\s*(Options|Choices):\s*$", "", "\n".join(lines[:starts[0]]).strip())
    return stem, options


# ----------------------------------------------------------------------------- benchmark records

def _missing(value):
    """None, NaN, or a blank / "nan" string (pandas writes NaN cells as nan)."""
    return value is None or value != value or (isinstance(value, str) and value.strip().lower() in ("", "nan"))


def _benchmark_row(rid, rec, load_image, image_path=None):
    """One benchmark record (its columns as a dict) -> Row, whichever way it lays out its options."""
    question, answer = rec.get("question"), rec.get("answer")
    if "choice_a" in rec:  # SEED-Bench
        options = [rec.get(f"choice_{c}") for c in "abcd"]
    elif "A" in rec:  # MMBench / VLMEvalKit: a column per letter, the unused trailing ones empty
        letters = LETTERS[:next((i for i, c in enumerate(LETTERS) if c not in rec), len(LETTERS))]
        options = [None if _missing(rec[c]) else rec[c] for c in letters]
        while options and options[-1] is None:
            options.pop()
    elif "choices" in rec or "options" in rec:  # ScienceQA, MMEvalPro, AI2D; ScienceQA, AI2D answer by index
        options = rec.get("choices", rec.get("options"))
        if type(answer) is int or (isinstance(answer, str) and answer.strip().isdigit()):  # int, not bool
            answer = LETTERS[int(answer)] if int(answer) < len(LETTERS) else f"#{answer}"
    else:  # MMStar, RealWorldQA: the options are written inside the question
        question, options = split_options(question) if isinstance(question, str) else (question, [])
        if not options:
            letter = isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS
            kind = "" if letter else " (an open-ended question)"
            raise BadRow(f"no options in the question{kind}; answer {answer!r}")
    hint = rec.get("hint")
    return _make_row(rid, question, options, answer, load_image, image_path, None if _missing(hint) else str(hint))


# ----------------------------------------------------------------------------- readers
# Each yields (id, where, make): `make()` builds the Row or raises BadRow (or `make` is the BadRow
# already), so rows past `limit` cost nothing.

def _jsonl(path, split):
    if split is not None:
        raise ValueError(f"{path}: a JSONL file holds one split; split= picks one in parquet, TSV or problems.json")
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield None, f"line {n}", BadRow(f"malformed JSON: {e}")
                continue
            if not isinstance(obj, dict):
                yield None, f"line {n}", BadRow("not a JSON object")
                continue
            rid = str(obj["id"]) if obj.get("id") is not None else str(n)  # no id: the line number
            yield rid, f"line {n}", lambda o=obj, r=rid: _jsonl_row(base, r, o)


def _jsonl_row(base, rid, obj):
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        raise BadRow("no image path")
    ipath = os.path.join(base, image)  # an absolute image path stays as it is
    if not os.path.isfile(ipath):  # cheap to check now; decoding waits until the image is used
        raise BadRow(f"image not found: {image}")
    return _make_row(rid, obj.get("question"), obj.get("options"), obj.get("answer"),
                     lambda: _open_image(ipath, image), image_path=ipath, hint=obj.get("hint"))


def _tsv_image(cell, images):
    """A TSV image cell -> the function that decodes it. MMBench stores each image once and other rows
    name its index; multi-image rows hold a Python list."""
    cell, name = cell.strip(), "(base64)"
    if cell.isdigit() and len(cell) <= 16:
        if cell not in images:
            raise BadRow(f"image refers to index {cell}, which has no image")
        cell, name = images[cell].strip(), f"(base64, of index {cell})"
    if cell.startswith("["):
        try:
            cells = ast.literal_eval(cell)
        except (ValueError, SyntaxError):
            raise BadRow("image cell starts with '[' but is not a list of base64 images") from None
        if len(cells) != 1:
            raise BadRow(f"{len(cells)} {_MULTI_IMAGE}")
        cell = cells[0]

    def load():
        try:
            data = base64.b64decode(cell, validate=False)
        except Exception as e:
            raise BadRow(f"corrupt image {name}: not base64 ({e})") from None
        return _open_image(data, name)
    return load


def _tsv(path, split):
    csv.field_size_limit(2**31 - 1)  # base64 images are far longer than csv's 128 KiB default
    with open(path, encoding="utf-8", newline="") as f:
        table = list(csv.reader(f, delimiter="\t"))
    if not table:
        return
    header = table[0]
    for col in ("index", "question", "answer", "image") + (("split",) if split is not None else ()):
        if col not in header:
            raise ValueError(f"{path}: TSV has no {col!r} column (header: {', '.join(header)})")
    body = [(n, dict(zip(header, raw)), len(raw)) for n, raw in enumerate(table[1:], start=2) if raw]
    images = {r["index"].strip(): r["image"] for _, r, width in body
              if width == len(header) and len(r["image"].strip()) > 16}
    for n, r, width in body:
        rid = (r.get("index") or "").strip() or str(n)
        if width != len(header):
            yield rid, f"line {n}", BadRow(f"{width} fields, the header has {len(header)}")
            continue
        if split is not None and r["split"].strip() != split:
            continue  # not in the requested split: filtered, not skipped
        yield rid, f"line {n}", lambda r=r, rid=rid: _benchmark_row(rid, r, _tsv_image(r["image"], images))


def _scienceqa(path, split):
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        problems = json.load(f)
    if not isinstance(problems, dict):
        raise ValueError(f"{path}: expected ScienceQA's {{id: problem}} object")
    for pid, p in problems.items():
        if not isinstance(p, dict):
            yield pid, f"problem {pid}", BadRow("not a JSON object")
            continue
        if split is not None and p.get("split") != split:
            continue  # not in the requested split: filtered, not skipped
        yield pid, f"problem {pid}", lambda pid=pid, p=p: _scienceqa_row(base, pid, p)  # JSON keys are str


def _scienceqa_row(base, pid, p):
    if not p.get("image"):
        raise BadRow("no image (a text-only question)")
    candidates = [os.path.join(base, *parts, pid, p["image"]) for parts in
                  (("images", str(p.get("split", ""))), ("images",), (str(p.get("split", "")),), ())]
    ipath = next((c for c in candidates if os.path.isfile(c)), None)
    if ipath is None:
        raise BadRow(f"image not found: {candidates[0]}")
    return _benchmark_row(pid, p, lambda: _open_image(ipath, ipath), image_path=ipath)


_SHARD = re.compile(r"(.+?)-\d{5}-of-\d{5}.*\.parquet")  # Hugging Face shards: test-00000-of-00002.parquet


def _parquet(path, split):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no .parquet files under {path}")
    named = [(f, m.group(1) if (m := _SHARD.fullmatch(os.path.basename(f))) else None) for f in files]
    splits = sorted({s for _, s in named if s})
    if split is not None and splits:  # the shard names say the split: read only those files
        if split not in splits:
            raise ValueError(f"{path}: no split {split!r}; the shard names give {', '.join(splits)}")
        named, split = [(f, s) for f, s in named if s == split], None
    seen = {}  # rows read so far per split: the id of a benchmark without an id column
    for file, shard_split in named:
        table = pq.read_table(file)
        cols = table.column_names
        for col in ("question", "answer", "image") + (("split",) if split is not None else ()):
            if col not in cols:
                raise ValueError(f"{file}: no {col!r} column (columns: {', '.join(cols)})")
        images = table.column("image")
        listed = pa.types.is_list(images.type) or pa.types.is_large_list(images.type)  # SEED-Bench
        struct = images.type.value_type if listed else images.type
        if not pa.types.is_struct(struct) or min(struct.get_field_index(f) for f in ("bytes", "path")) < 0:
            raise ValueError(f"{file}: the 'image' column is {images.type}, not Hugging Face images {{bytes, path}}")
        base = os.path.dirname(os.path.abspath(file))
        for n, rec in enumerate(table.select([c for c in cols if c != "image"]).to_pylist()):
            k = seen[shard_split] = seen.get(shard_split, -1) + 1
            if split is not None and rec.get("split") != split:
                continue  # not in the requested split: filtered, not skipped
            rid = next((str(rec[c]) for c in ("index", "question_id", "id") if rec.get(c) is not None),
                       f"{shard_split}-{k}" if shard_split else str(k))
            where = f"{os.path.basename(file)} row {n}"
            yield rid, where, lambda rid=rid, rec=rec, cell=(images, n, listed, base, where): _benchmark_row(
                rid, rec, _arrow_image(*cell, rec.get("data_type")))


def _arrow_image(images, n, listed, base, where, data_type=None):
    """Check row n of an image column now (no bytes copied) -> the function that decodes it. Several
    images or a video are skipped, never read as their first frame."""
    if data_type not in (None, "image"):  # SEED-Bench lists a video's frames as its images
        raise BadRow(f"a {data_type} question; only image questions are supported")
    cell = images[n]
    if listed:
        count = len(cell) if cell.is_valid else 0
        if count > 1:
            raise BadRow(f"{count} {_MULTI_IMAGE}")
        cell = cell[0] if count else None
    if cell is None or not cell.is_valid or not (cell["bytes"].is_valid or cell["path"].is_valid):
        raise BadRow("no image (a text-only question)")

    def load():
        value = cell.as_py()  # the cell checked above
        if value["bytes"] is not None:
            return _open_image(value["bytes"], where)
        return _open_image(os.path.join(base, value["path"]), value["path"])  # join keeps an absolute path
    return load


def _detect(path):
    if os.path.isdir(path):
        return "parquet"  # a folder of Hugging Face shards
    name = os.path.basename(path).lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".tsv", "tsv"), (".json", "scienceqa"), (".parquet", "parquet")):
        if name.endswith(ext):
            return fmt  # .json: problems.json is the only JSON layout we read
    raise ValueError(f"{path}: cannot tell the data format from the name; pass format= one of {FORMATS}")


def load_rows(path, format=None, limit=None, split=None):
    """A data file (or a folder of parquet shards) -> (rows, skipped: [{"id", "reason"}]). `split` picks
    the `<split>-0000k-of-0000n` shards, or the rows whose `split` column equals it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    fmt = format or _detect(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; one of {FORMATS}")
    if os.path.isdir(path) and fmt != "parquet":
        raise ValueError(f"{path} is a folder; only parquet shards are read from a folder")
    reader = {"jsonl": _jsonl, "tsv": _tsv, "scienceqa": _scienceqa, "parquet": _parquet}[fmt]
    rows, skipped, seen = [], [], {}
    for rid, where, make in reader(path, split):
        if limit is not None and len(rows) >= limit:
            break
        try:
            if rid in seen:  # None (an unparsable JSONL line) never enters `seen`
                raise BadRow(f"duplicate id {rid!r} (first at {seen[rid]})")
            if isinstance(make, BadRow):
                raise make
            rows.append(make())
            seen[rid] = where
        except BadRow as e:
            skipped.append({"id": rid, "reason": f"{where}: {e}"})
    return rows, skipped


def circular_groups(ids):
    """MMBench's rotated copies of question i carry ids i + k * CIRCULAR -> {i: [member ids]} (other
    ids alone), or {} when no id is a rotated copy. A group is right only when all its members are."""
    ids = [str(i) for i in ids]
    if not any(i.isdigit() and int(i) >= CIRCULAR for i in ids):
        return {}
    groups = {}
    for i in ids:
        groups.setdefault(str(int(i) % CIRCULAR) if i.isdigit() else i, []).append(i)
    return groups
