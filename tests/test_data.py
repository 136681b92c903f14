"""load_rows: every bad row is skipped with its reason and the rest load; the TSV and ScienceQA readers
give the same Rows as the equivalent JSONL (DESIGN §6-7)."""
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from scl.data import Row, load_rows

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
    assert [r.id for r in rows] == ["good1", "good2"] and rows[0].answer == "A"
    assert rows[1].image.mode == "RGB"
    reasons = {s["id"]: s["reason"] for s in skipped}
    expected = {None: "not a JSON object", "missing": "image not found: img/nope.png",
                "corrupt": "corrupt image img/corrupt.png", "truncated": "corrupt image img/truncated.png",
                "noimage": "no image path", "noopts": "no options", "oneopt": "at least 2",
                "emptyopt": "option B is empty", "outside": "answer D is outside the options A-C",
                "notletter": "is not an option letter", "noquestion": "no question",
                "good1": "duplicate id 'good1' (first at line 1)"}
    assert set(reasons) == set(expected)
    for rid, text in expected.items():
        assert text in reasons[rid], (rid, reasons[rid])
    assert [s["reason"] for s in skipped if s["id"] is None][0].startswith("line 2: malformed JSON")
    assert len(skipped) == 13 and all(s["reason"].startswith("line ") for s in skipped)


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
             ["7", "Q?"]]  # too few fields
    (jsonl_dir / "bad.tsv").write_text(tsv_text(lines))
    rows, skipped = load_rows(str(jsonl_dir / "bad.tsv"))
    assert [r.id for r in rows] == ["1", "6"] and rows[0].hint is None
    assert np.array_equal(pixels(rows[0]), pixels(rows[1]))
    reasons = {s["id"]: s["reason"] for s in skipped}
    assert "refers to index 99" in reasons["2"] and "option B is empty" in reasons["3"]
    assert "corrupt image" in reasons["4"] and "outside the options A-B" in reasons["5"]
    assert "2 fields, the header has 10" in reasons["7"]
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
