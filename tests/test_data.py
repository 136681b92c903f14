"""load_rows: every bad row is skipped with its reason and the rest load; each benchmark layout (TSV,
problems.json, Hugging Face parquet) gives the Rows of the equivalent JSONL. Files are built here with
the benchmarks' real column names."""
import base64
import csv
import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from scl.data import BadRow, Row, circular_groups, load_rows, split_options

QUESTIONS = [  # id, question, options, answer letter, hint, image number
    ("q1", "How many circles are there?", ["two", "three", "four", "five"], "B", None, 0),
    ("q2", "Is the square red?", ["yes", "no"], "A", "Look at the left side.", 1),
    ("q3", "Which shape is largest?", ["circle", "square", "triangle"], "C", None, 0),  # shares q1's image
]


def png_bytes(k, mode="RGB"):
    a = np.random.default_rng(k).integers(0, 256, (12 + k, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def pixels(row):
    return np.asarray(row.image)


def decoded(k):
    return np.asarray(Image.open(io.BytesIO(png_bytes(k))))


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def jsonl_dir(tmp_path):
    (tmp_path / "img").mkdir()
    for k in range(2):
        (tmp_path / "img" / f"{k}.png").write_bytes(png_bytes(k))
    records = [{"id": i, "image": f"img/{n}.png", "question": q, "options": o, "answer": a}
               | ({"hint": h} if h else {}) for i, q, o, a, h, n in QUESTIONS]
    records[0]["options"] = [f"{'ABCD'[j]}. {t}" for j, t in enumerate(records[0]["options"])]  # labels
    write_jsonl(tmp_path / "good.jsonl", records)
    return tmp_path


def same_rows(a, b):
    assert [(r.id, r.question, r.options, r.answer, r.hint) for r in a] == \
           [(r.id, r.question, r.options, r.answer, r.hint) for r in b]
    for x, y in zip(a, b):
        assert x.image.mode == y.image.mode == "RGB" and np.array_equal(pixels(x), pixels(y))


def test_jsonl_loads_rows(jsonl_dir):
    rows, skipped = load_rows(str(jsonl_dir / "good.jsonl"))
    assert skipped == [] and [r.id for r in rows] == ["q1", "q2", "q3"]
    r = rows[0]
    assert isinstance(r, Row) and r.options == ["two", "three", "four", "five"]  # "A. " stripped
    assert r.answer == "B" and r.image.mode == "RGB" and r.image.size == (16, 12)
    assert r.image_path == str(jsonl_dir / "img" / "0.png") and rows[1].hint == "Look at the left side."
    assert load_rows(str(jsonl_dir / "good.jsonl"), limit=2)[0][-1].id == "q2"


def test_every_bad_row_is_skipped_with_its_reason(jsonl_dir):
    (jsonl_dir / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (jsonl_dir / "img" / "truncated.png").write_bytes(png_bytes(3)[:-40])
    (jsonl_dir / "img" / "rgba.png").write_bytes(png_bytes(4, mode="RGBA"))
    ok = {"image": "img/0.png", "question": "Q?", "options": ["x", "y", "z"], "answer": "a"}
    records = [
        ok | {"id": "good1"},
        '{"id": "broken", "image": ',  # malformed JSON
        "[1, 2, 3]",
        ok | {"id": "missing", "image": "img/nope.png"},
        ok | {"id": "corrupt", "image": "img/corrupt.png"},
        ok | {"id": "truncated", "image": "img/truncated.png"},
        ok | {"id": "noimage", "image": None},
        ok | {"id": "noopts", "options": []},
        ok | {"id": "oneopt", "options": ["only"]},
        ok | {"id": "emptyopt", "options": ["x", " ", "z"]},
        ok | {"id": "outside", "answer": "D"},
        ok | {"id": "notletter", "answer": "7"},
        ok | {"id": "noquestion", "question": ""},
        ok | {"id": "good1"},  # duplicate id
        "",  # blank lines are not rows
        ok | {"id": "good2", "image": "img/rgba.png"},
    ]
    rows, skipped = load_rows(str(write_jsonl(jsonl_dir / "mixed.jsonl", records)))
    # Images decode when used: a corrupt one loads, then raises BadRow with its reason when read.
    assert [r.id for r in rows] == ["good1", "corrupt", "truncated", "good2"] and rows[0].answer == "A"
    assert rows[3].image.mode == "RGB"  # transparency composited, not dropped
    for row, name in zip(rows[1:3], ["img/corrupt.png", "img/truncated.png"]):
        with pytest.raises(BadRow, match=f"corrupt image {name}"):
            row.image
    reasons = {s["id"]: s["reason"] for s in skipped}
    expected = {None: "not a JSON object", "missing": "image not found: img/nope.png",
                "noimage": "no image path", "noopts": "no options", "oneopt": "at least 2",
                "emptyopt": "option B is empty", "outside": "answer D is outside the options A-C",
                "notletter": "is not an option letter", "noquestion": "no question",
                "good1": "duplicate id 'good1' (first at line 1)"}
    assert set(reasons) == set(expected)
    for rid, text in expected.items():
        assert text in reasons[rid], (rid, reasons[rid])
    assert [s["reason"] for s in skipped if s["id"] is None][0].startswith("line 2: malformed JSON")
    assert len(skipped) == 11 and all(s["reason"].startswith("line ") for s in skipped)


def tsv_text(rows, header=("index", "question", "hint", "A", "B", "C", "D", "answer", "image", "category")):
    return "\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows)


def test_tsv_equals_jsonl(jsonl_dir):
    b64 = [base64.b64encode(png_bytes(k)).decode() for k in range(2)]
    lines = []
    for i, q, o, a, h, n in QUESTIONS:
        opts = (o + ["", "", ""])[:4]
        image = b64[n] if i != "q3" else "q1"  # placeholder, replaced by q1's index below
        lines.append([i, q, h or "", *opts, a, image, "counting"])
    for k, line in enumerate(lines):
        line[0] = str(100 + k)  # MMBench indices are integers
    lines[2][8] = "100"  # q3 refers to q1's image by index
    (jsonl_dir / "bench.tsv").write_text(tsv_text(lines))
    rows, skipped = load_rows(str(jsonl_dir / "bench.tsv"))
    ref, _ = load_rows(str(jsonl_dir / "good.jsonl"))
    for r, new_id in zip(ref, ["100", "101", "102"]):
        r.id = new_id
    assert skipped == []
    same_rows(rows, ref)
    assert rows[0].image_path is None


def test_tsv_bad_rows(jsonl_dir):
    good = base64.b64encode(png_bytes(0)).decode()
    lines = [["1", "Q?", "", "x", "y", "", "", "A", good, "c"],
             ["2", "Q?", "", "x", "y", "", "", "A", "99", "c"],  # refers to a missing index
             ["3", "Q?", "", "x", "", "z", "", "A", good, "c"],  # a gap between options
             ["4", "Q?", "", "x", "y", "", "", "A", "!!!!notbase64" * 3, "c"],
             ["5", "Q?", "nan", "x", "y", "", "", "C", good, "c"],  # answer outside the options
             ["6", "Q?", "", "x", "y", "", "", "B", "1", "c"],
             ["7", "Q?"],  # too few fields
             ["8", "Q?", "", "x", "y", "", "", "A", str([good, good]), "c"],  # a multi-image (_MI) row
             ["9", "Q?", "", "x", "y", "", "", "A", "8", "c"],  # refers to the multi-image row
             ["10", "Q?", "", "x", "y", "", "", "B", str([good]), "c"]]  # a list of one image is that image
    (jsonl_dir / "bad.tsv").write_text(tsv_text(lines))
    rows, skipped = load_rows(str(jsonl_dir / "bad.tsv"))
    assert [r.id for r in rows] == ["1", "4", "6", "10"] and rows[0].hint is None
    assert np.array_equal(pixels(rows[0]), pixels(rows[2])) and np.array_equal(pixels(rows[0]), pixels(rows[3]))
    with pytest.raises(BadRow, match="corrupt image"):
        rows[1].image
    reasons = {s["id"]: s["reason"] for s in skipped}
    assert "refers to index 99" in reasons["2"] and "option B is empty" in reasons["3"]
    assert "outside the options A-B" in reasons["5"] and "2 fields, the header has 10" in reasons["7"]
    assert "2 images in one row" in reasons["8"] and "2 images in one row" in reasons["9"]
    (jsonl_dir / "nocol.tsv").write_text("index\tquestion\n1\tQ?\n")
    with pytest.raises(ValueError, match="no 'answer' column"):
        load_rows(str(jsonl_dir / "nocol.tsv"))


def test_scienceqa_equals_jsonl(jsonl_dir):
    root = jsonl_dir / "sqa"
    problems = {}
    for k, (i, q, o, a, h, n) in enumerate(QUESTIONS):
        problems[i] = {"question": q, "choices": o, "answer": "ABCD".index(a), "image": "image.png",
                       "split": "test", "hint": h or "", "subject": "natural science"}
        folder = root / "images" / "test" / i if k != 1 else root / i  # q2's image lies beside
        folder.mkdir(parents=True)
        (folder / "image.png").write_bytes(png_bytes(n))
    problems["t1"] = {"question": "Text only?", "choices": ["a", "b"], "answer": 0, "image": None,
                      "split": "test", "hint": ""}
    problems["v1"] = dict(problems["q1"], split="val")
    (root / "images" / "val" / "v1").mkdir(parents=True)
    (root / "images" / "val" / "v1" / "image.png").write_bytes(png_bytes(0))
    problems["bad"] = {"question": "Q?", "choices": ["a", "b"], "answer": 5, "image": "image.png",
                       "split": "test", "hint": ""}
    (root / "images" / "test" / "bad").mkdir()
    (root / "images" / "test" / "bad" / "image.png").write_bytes(png_bytes(0))
    (root / "problems.json").write_text(json.dumps(problems))
    rows, skipped = load_rows(str(root / "problems.json"), split="test")
    ref, _ = load_rows(str(jsonl_dir / "good.jsonl"))
    same_rows(rows, ref)
    assert rows[1].image_path == str(root / "q2" / "image.png")
    reasons = {s["id"]: s["reason"] for s in skipped}
    assert "text-only" in reasons["t1"] and "outside the options A-B" in reasons["bad"]
    assert [r.id for r in load_rows(str(root / "problems.json"))[0]] == ["q1", "q2", "q3", "v1"]


def test_missing_file_and_unknown_format(tmp_path, jsonl_dir):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "data.txt").write_text((jsonl_dir / "good.jsonl").read_text())
    with pytest.raises(ValueError, match="format="):
        load_rows(str(tmp_path / "data.txt"))
    with pytest.raises(ValueError, match="unknown data format"):
        load_rows(str(tmp_path / "data.txt"), format="csv")
    # format= overrides the name; image paths stay relative to the file.
    (tmp_path / "img").mkdir(exist_ok=True)
    rows, skipped = load_rows(str(jsonl_dir / "good.jsonl"), format="jsonl")
    assert len(rows) == 3 and skipped == []


def test_jsonl_has_no_splits(jsonl_dir):
    with pytest.raises(ValueError, match="one split"):
        load_rows(str(jsonl_dir / "good.jsonl"), split="test")


# ---------------------------------------------------------------------------- options inside the question

MMSTAR_Q = ("Which option describe the object relationship in the image correctly?\nOptions: A: The suitcase "
            "is on the book., B: The suitcase is beneath the cat., C: The suitcase is beneath the bed., D: "
            "The suitcase is beneath the book.")
RWQA_END = "Please answer directly with only the letter of the correct option and nothing else."


@pytest.mark.parametrize("text, stem, options", [
    (MMSTAR_Q, "Which option describe the object relationship in the image correctly?",
     ["The suitcase is on the book.", "The suitcase is beneath the cat.", "The suitcase is beneath the bed.",
      "The suitcase is beneath the book."]),
    ("What is shown?\nOptions: A: red, green and blue, B: only red", "What is shown?",
     ["red, green and blue", "only red"]),  # commas inside an option are not separators
    (f"In which direction is the front wheel facing?\nA. Left\nB. Straight\nC. Right\n{RWQA_END}",
     "In which direction is the front wheel facing?", ["Left", "Straight", "Right"]),
    ("Is the light red?\n\nA) yes\nB) no\n\n" + RWQA_END, "Is the light red?", ["yes", "no"]),
    ("Which is larger?\nChoices:\n(A) 1\n(B) 2", "Which is larger?", ["1", "2"]),
    ("How many pedestrians are there?\nPlease answer directly with a single word or number.",
     "How many pedestrians are there?\nPlease answer directly with a single word or number.", []),
])
def test_split_options(text, stem, options):
    assert split_options(text) == (stem, options)


@pytest.mark.parametrize("text, reason", [
    ("Pick one.\nOptions: A: x, B: y, B: z, C: w", "cannot be split unambiguously"),  # B twice
    ("Pick one.\nOptions: A: x, C: z", "cannot be split unambiguously"),  # B missing
    ("Options: first\nOptions: A: x, B: y", "cannot be split unambiguously"),
    ("Pick one.\nOptions: A: x, B: y\nAnswer with the letter.", "text after the options on a new line"),
    ("Which lane?\nA. left\nB. right\nthe middle one is closed", "not an answer instruction"),
    ("Which lane?\nA. left\nB. right\nC. middle, which\nspans two lines", "not an answer instruction"),
    ("Which?\nA. x\nB. y\nOr rather:\nA. z\nB. w", "two lines start with option A"),
    ("A. Lincoln was president when?", "only one option line"),
])
def test_options_that_cannot_be_split_are_never_guessed(text, reason):
    with pytest.raises(BadRow, match=reason):
        split_options(text)


def test_mmstar_tsv_splits_options_from_the_question(tmp_path):
    b64 = base64.b64encode(png_bytes(0)).decode()
    header = ("index", "question", "answer", "category", "l2_category", "image")
    lines = [["0", MMSTAR_Q, "A", "coarse perception", "image scene and topic", b64],
             ["1", "Pick one.\nOptions: A: x, B: y, B: z, C: w", "B", "math", "geometry", "0"]]
    with open(tmp_path / "MMStar.tsv", "w", newline="") as f:  # quoted as pandas writes a cell with newlines
        csv.writer(f, delimiter="\t").writerows([header] + lines)
    rows, skipped = load_rows(str(tmp_path / "MMStar.tsv"))
    assert [(r.id, r.question, r.answer, len(r.options)) for r in rows] == \
           [("0", "Which option describe the object relationship in the image correctly?", "A", 4)]
    assert rows[0].options[3] == "The suitcase is beneath the book." and rows[0].hint is None
    assert np.array_equal(pixels(rows[0]), decoded(0))
    assert skipped[0]["id"] == "1" and "cannot be split" in skipped[0]["reason"]


def test_tsv_split_column(tmp_path):
    b64 = base64.b64encode(png_bytes(0)).decode()
    header = ("index", "question", "A", "B", "answer", "image", "split")
    lines = [["1", "Q1?", "x", "y", "A", b64, "dev"], ["2", "Q2?", "x", "y", "B", "1", "test"]]
    (tmp_path / "MMBench_DEV_EN.tsv").write_text(tsv_text(lines, header))
    assert [r.id for r in load_rows(str(tmp_path / "MMBench_DEV_EN.tsv"), split="test")[0]] == ["2"]
    (tmp_path / "nosplit.tsv").write_text(tsv_text([line[:-1] for line in lines], header[:-1]))
    with pytest.raises(ValueError, match="no 'split' column"):
        load_rows(str(tmp_path / "nosplit.tsv"), split="dev")


# ---------------------------------------------------------------------------- Hugging Face parquet

def hf_image(k):
    return {"bytes": png_bytes(k), "path": f"{k}.png"}  # how `datasets` stores an Image feature


def write_parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: v if isinstance(v, pa.Array) else pa.array(v) for k, v in columns.items()}),
                   str(path))
    return path


def mmbench_columns(questions, indices, split):
    """lmms-lab/MMBench_EN's columns: one per option letter, None where a question has fewer."""
    cols = {"index": indices, "question": [q for _, q, *_ in questions],
            "hint": [h for *_, h, _ in questions]}
    for j, letter in enumerate("ABCD"):
        cols[letter] = [o[j] if j < len(o) else None for _, _, o, *_ in questions]
    return cols | {"answer": [a for _, _, _, a, _, _ in questions], "category": ["counting"] * len(questions),
                   "image": [hf_image(n) for *_, n in questions], "source": ["x"] * len(questions),
                   "L2-category": ["y"] * len(questions), "comment": [None] * len(questions),
                   "split": [split] * len(questions)}


def test_parquet_shards_equal_jsonl_and_split_picks_shards(jsonl_dir):
    data = jsonl_dir / "MMBench_EN" / "data"
    write_parquet(data / "dev-00000-of-00002.parquet", mmbench_columns(QUESTIONS[:2], [100, 101], "dev"))
    write_parquet(data / "dev-00001-of-00002.parquet", mmbench_columns(QUESTIONS[2:], [102], "dev"))
    unanswered = [("t", "Is it blue?", ["yes", "no"], None, None, 1)]  # test splits hold no answers
    write_parquet(data / "test-00000-of-00001.parquet", mmbench_columns(unanswered, [500], "test"))
    rows, skipped = load_rows(str(data), split="dev")
    ref, _ = load_rows(str(jsonl_dir / "good.jsonl"))
    for r, new_id in zip(ref, ["100", "101", "102"]):
        r.id = new_id
    assert skipped == [] and rows[0].image_path is None
    same_rows(rows, ref)
    assert "image" not in vars(rows[0]) and rows[0].image is not rows[0].image  # decoded per use, not kept
    rows, skipped = load_rows(str(jsonl_dir / "MMBench_EN"))  # the repo folder; every split
    assert [r.id for r in rows] == ["100", "101", "102"] and skipped[0]["id"] == "500"
    assert "answer None is not an option letter" in skipped[0]["reason"]
    assert skipped[0]["reason"].startswith("test-00000-of-00001.parquet row 0:")
    assert [r.id for r in load_rows(str(data), split="dev", limit=2)[0]] == ["100", "101"]
    with pytest.raises(ValueError, match="no split 'val'; the shard names give dev, test"):
        load_rows(str(data), split="val")


def test_parquet_split_column_and_missing_columns(tmp_path):
    cols = mmbench_columns(QUESTIONS, [1, 2, 3], "dev")
    cols["split"] = ["dev", "test", "dev"]
    write_parquet(tmp_path / "mmbench.parquet", cols)
    assert [r.id for r in load_rows(str(tmp_path / "mmbench.parquet"), split="dev")[0]] == ["1", "3"]
    del cols["split"]
    write_parquet(tmp_path / "nosplit.parquet", cols)
    with pytest.raises(ValueError, match="no 'split' column"):
        load_rows(str(tmp_path / "nosplit.parquet"), split="dev")
    write_parquet(tmp_path / "noanswer.parquet", {"question": ["Q?"], "image": [hf_image(0)]})
    with pytest.raises(ValueError, match="no 'answer' column"):
        load_rows(str(tmp_path / "noanswer.parquet"))


def test_mmstar_parquet(tmp_path):
    questions = [MMSTAR_Q, "Pick one.\nOptions: A: x, B: y, B: z, C: w",
                 "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at "
                 "the end.\nQuestion: What is x?\nOptions: A: 1, B: 2, C: 3, D: 4"]
    write_parquet(tmp_path / "mmstar.parquet", {
        "index": [0, 1, 2], "question": questions, "image": [hf_image(k) for k in range(3)],
        "answer": ["A", "B", "D"], "category": ["coarse perception", "math", "math"],
        "l2_category": ["image scene and topic", "geometry", "geometry"],
        "meta_info": [{"source": "MathVista", "split": "testmini", "image_path": f"images/{k}.jpg"}
                      for k in range(3)]})
    rows, skipped = load_rows(str(tmp_path / "mmstar.parquet"))
    assert [r.id for r in rows] == ["0", "2"] and rows[0].options[1] == "The suitcase is beneath the cat."
    assert rows[1].question.endswith("Question: What is x?") and rows[1].options == ["1", "2", "3", "4"]
    assert rows[1].answer == "D" and np.array_equal(pixels(rows[1]), decoded(2))
    assert skipped[0]["id"] == "1" and "cannot be split unambiguously" in skipped[0]["reason"]


def test_realworldqa_parquet(tmp_path):
    data = tmp_path / "RealWorldQA" / "data"
    write_parquet(data / "test-00000-of-00002.parquet", {
        "image": [hf_image(0), hf_image(1)],
        "question": [f"In which direction is the front wheel facing?\nA. Left\nB. Straight\nC. Right\n{RWQA_END}",
                     "How many pedestrians are there?\nPlease answer directly with a single word or number."],
        "answer": ["C", "2"]})
    write_parquet(data / "test-00001-of-00002.parquet", {
        "image": [hf_image(2), hf_image(3)],
        "question": [f"Is the light red?\nA) yes\nB) no\n{RWQA_END}",
                     "Which lane?\nA. left\nB. right\nthe middle"],
        "answer": ["B", "A"]})
    rows, skipped = load_rows(str(data), split="test")
    assert [(r.id, r.question, r.options, r.answer) for r in rows] == [
        ("test-0", "In which direction is the front wheel facing?", ["Left", "Straight", "Right"], "C"),
        ("test-2", "Is the light red?", ["yes", "no"], "B")]  # ids count rows across the split's shards
    assert np.array_equal(pixels(rows[1]), decoded(2))
    reasons = {s["id"]: s["reason"] for s in skipped}
    assert "no options in the question (an open-ended question); answer '2'" in reasons["test-1"]
    assert "not an answer instruction" in reasons["test-3"]


def test_seedbench_parquet_skips_videos_and_several_images(tmp_path):
    n = 5
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", {
        "answer": ["B", "A", "A", "A", "C"], "question": [f"Question {k}?" for k in range(n)],
        **{f"choice_{c}": [f"{c}{k}" for k in range(n)] for c in "abcd"},
        "data_id": [f"{k}.jpg" for k in range(n)], "data_type": ["image", "video", "image", "image", "image"],
        "question_id": [str(100 + k) for k in range(n)], "question_type_id": [1] * n,
        "image": [[hf_image(0)], [hf_image(k) for k in range(3)], [hf_image(0), hf_image(1)], [], [hf_image(4)]]})
    rows, skipped = load_rows(str(tmp_path / "data"))
    assert [(r.id, r.question, r.options, r.answer) for r in rows] == [
        ("100", "Question 0?", ["a0", "b0", "c0", "d0"], "B"),
        ("104", "Question 4?", ["a4", "b4", "c4", "d4"], "C")]
    assert np.array_equal(pixels(rows[1]), decoded(4))
    reasons = {s["id"]: s["reason"] for s in skipped}
    assert "a video question" in reasons["101"] and "2 images in one row" in reasons["102"]
    assert "no image" in reasons["103"]


def test_scienceqa_parquet_equals_jsonl(jsonl_dir):
    import pyarrow as pa
    folder = jsonl_dir / "ScienceQA-IMG"
    for split, qs in (("test", QUESTIONS), ("validation", QUESTIONS[:1])):
        qs = qs + [("t", "Text only?", ["a", "b"], "A", None, None)]
        write_parquet(folder / f"{split}-00000-of-00001.parquet", {
            "image": [None if n is None else hf_image(n) for *_, n in qs], "question": [q for _, q, *_ in qs],
            "choices": [o for _, _, o, *_ in qs],
            "answer": pa.array(["ABCD".index(a) for *_, a, _, _ in qs], pa.int8()),  # an index, as in ScienceQA
            "hint": [h or "" for *_, h, _ in qs], **{c: ["x"] * len(qs) for c in (
                "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")}})
    rows, skipped = load_rows(str(folder), split="test")
    ref, _ = load_rows(str(jsonl_dir / "good.jsonl"))
    for r, new_id in zip(ref, ["test-0", "test-1", "test-2"]):
        r.id = new_id
    same_rows(rows, ref)  # the int answers became letters, "" hints became None
    assert skipped == [{"id": "test-3",
                        "reason": "test-00000-of-00001.parquet row 3: no image (a text-only question)"}]
    assert [r.id for r in load_rows(str(folder))[0]] == ["test-0", "test-1", "test-2", "validation-0"]


def test_ai2d_and_mmevalpro_parquet(tmp_path):
    write_parquet(tmp_path / "ai2d" / "test-00000-of-00001.parquet", {
        "question": ["Which stage is shown?", "Which label?"], "options": [["egg", "larva", "adult", "pupa"]] * 2,
        "answer": ["1", "7"], "image": [hf_image(0), hf_image(1)]})
    rows, skipped = load_rows(str(tmp_path / "ai2d"))
    assert [(r.id, r.options[1], r.answer) for r in rows] == [("test-0", "larva", "B")]
    assert "outside the options A-D" in skipped[0]["reason"]
    write_parquet(tmp_path / "MMEvalPro" / "data" / "test-00000-of-00001.parquet", {
        "index": [0, 1, 2], "triplet_id": [1, 1, 1], "question": ["Origin?", "Perception?", "Knowledge?"],
        "choices": [["(A) 1", "(B) 2", "(C) 3"], ["red", "blue"], ["x", "y"]], "answer": ["C", "B", "Z"],
        "image": [hf_image(k) for k in range(3)], "source": ["MMMU"] * 3, "question_category": ["q"] * 3,
        "eval_type": ["Origin", "Perception", "Knowledge"]})
    rows, skipped = load_rows(str(tmp_path / "MMEvalPro"))
    assert [(r.id, r.options, r.answer) for r in rows] == [("0", ["1", "2", "3"], "C"),  # "(A) " labels dropped
                                                           ("1", ["red", "blue"], "B")]
    assert skipped[0]["id"] == "2" and "answer Z is outside the options A-B" in skipped[0]["reason"]


def test_parquet_corrupt_image_fails_when_used_and_pyarrow_is_optional(tmp_path, monkeypatch):
    write_parquet(tmp_path / "ai2d.parquet", {"question": ["Q?", "Q?"], "options": [["x", "y"]] * 2,
                                              "answer": ["0", "1"],
                                              "image": [hf_image(0), {"bytes": b"junk", "path": None}]})
    rows, skipped = load_rows(str(tmp_path / "ai2d.parquet"))
    assert [r.id for r in rows] == ["0", "1"] and skipped == [] and rows[0].image.size == (16, 12)
    with pytest.raises(BadRow, match="corrupt image ai2d.parquet row 1"):
        rows[1].image
    write_parquet(tmp_path / "paths.parquet", {"question": ["Q?"], "options": [["x", "y"]], "answer": ["0"],
                                               "image": [{"bytes": None, "path": "img/0.png"}]})
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "0.png").write_bytes(png_bytes(0))  # a path-only struct: beside the file
    assert load_rows(str(tmp_path / "paths.parquet"))[0][0].image.size == (16, 12)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_rows(str(tmp_path / "ai2d.parquet"))


def test_circular_groups():
    assert circular_groups(["1", "2", "q3"]) == {}  # no rotated copies: plain accuracy only
    ids = ["5", "1000005", "2000005", "7", "1000007", "8"]
    assert circular_groups(ids) == {"5": ["5", "1000005", "2000005"], "7": ["7", "1000007"], "8": ["8"]}
    assert circular_groups([5, 3000005]) == {"5": ["5", "3000005"]}
