"""The built-in synthetic task: determinism, disjoint splits, answers right by an independent checker,
no answer prior, balanced letters, grounded responses, the images, and the tokenizer."""
import json
import os
import re
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from scl import task, vocab
from task_checker import check_answer

from scl.prompts import COT, FORMAT, review_message, turn1_message  # noqa: E402

ANSWER = re.compile(r"So the answer is (.+), option ([A-D])\. ## ([A-D]) ##$")


@pytest.fixture(scope="module")
def rows():
    return task.build_split(0, "test", 2000)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("task")
    return out, task.write_task(out, seed=1, n_sft=400, n_construct=80, n_test=80)


@pytest.fixture(scope="module")
def tokenizer_dir(written, tmp_path_factory):
    out, splits = written
    texts = [m["content"] for r in splits["sft"] for m in r["messages"]]
    path = tmp_path_factory.mktemp("tokenizer")
    vocab.train_tokenizer(texts, path, whole_tokens=vocab.protocol_sentences())
    return path


# ---------------------------------------------------------------------------- data


def test_same_seed_same_files_other_seed_other_files(tmp_path, written):
    out, _ = written
    task.write_task(tmp_path / "again", seed=1, n_sft=400, n_construct=80, n_test=80)
    task.write_task(tmp_path / "other", seed=2, n_sft=400, n_construct=80, n_test=80)
    for split in ("sft", "construct", "test"):
        mine = (out / f"{split}.jsonl").read_bytes()
        assert (tmp_path / "again" / f"{split}.jsonl").read_bytes() == mine
        assert (tmp_path / "other" / f"{split}.jsonl").read_bytes() != mine
    for name in ("images/test/000000.png", "images/sft/000399.png"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()


def test_test_and_construct_splits_do_not_depend_on_sft_size(tmp_path, written):
    out, _ = written
    task.write_task(tmp_path, seed=1, n_sft=10, n_construct=80, n_test=80)
    for split in ("construct", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (out / f"{split}.jsonl").read_bytes()


def test_splits_are_disjoint_and_rows_are_in_the_generic_format(written):
    out, splits = written
    keys = {s: {task.content_key(r["scene"], r["question"]) for r in rows} for s, rows in splits.items()}
    assert [len(k) for k in keys.values()] == [80, 80, 400]  # no duplicates inside a split either
    assert not keys["sft"] & keys["test"] and not keys["sft"] & keys["construct"]
    assert not keys["construct"] & keys["test"]
    for split, rows in splits.items():
        lines = (out / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows
        for row in rows[:5]:
            assert {"id", "image", "question", "options", "answer"} <= row.keys()
            image = Image.open(out / row["image"])  # relative to the JSONL file
            assert image.size == (48, 48) and image.mode == "RGB"


def test_exclusion_draws_fresh_rows():
    first = task.build_split(5, "x", 60)
    keys = {task.content_key(r["scene"], r["question"]) for r in first}
    again = task.build_split(5, "x", 60, exclude=keys)
    assert not keys & {task.content_key(r["scene"], r["question"]) for r in again}
    assert Counter(r["family"] for r in again) == Counter(r["family"] for r in first)


def test_every_gold_answer_is_right_by_the_independent_checker(rows):
    assert all(check_answer(r["scene"], r["question"], r["options"]) == r["answer"] for r in rows)


def test_checker_notices_a_changed_scene(rows):
    # The checker is not a rubber stamp: asked about another question's scene, it answers for that scene.
    changed = 0
    for r, other in zip(rows[:400], rows[400:800]):
        got = check_answer(other["scene"], r["question"], r["options"])
        assert got in (*"ABCD", None)  # None: the scene does not fit the question (no such anchor)
        changed += got != r["answer"]
    assert changed >= 0.6 * 400, changed
    assert check_answer([], "What colour is the largest shape?", list(task.COLOURS)) is None


def test_options_unique_letters_and_families_balanced(rows):
    assert all(len(r["options"]) == 4 and len(set(r["options"])) == 4 for r in rows)
    letters = Counter(r["answer"] for r in rows)
    assert all(abs(letters[x] / len(rows) - 0.25) <= 0.03 for x in "ABCD"), letters
    families = Counter(r["family"] for r in rows)
    assert set(families) == set(task.FAMILIES) and min(families.values()) >= 0.9 * len(rows) / 8


def test_text_alone_does_not_tell_the_answer(rows):
    # A blind model's best strategy: the gold value seen most often with this question text.
    # Options and scenes are drawn so that it stays at chance (25%); the limit for the base is 35%.
    train = task.build_split(0, "blind", 8000)
    best = {}
    for r in train:
        best.setdefault(r["question"], Counter())[r["options"]["ABCD".index(r["answer"])]] += 1
    hits = 0
    for r in rows:
        ranked = [v for v, _ in best.get(r["question"], Counter()).most_common() if v in r["options"]]
        hits += bool(ranked) and r["options"].index(ranked[0]) == "ABCD".index(r["answer"])
    assert hits / len(rows) <= 0.31, hits / len(rows)


def test_responses_name_the_option_they_pick(rows):
    for r in rows[:400]:
        text = task.response(r["scene"], r)
        value, named, final = ANSWER.search(text).groups()
        assert named == final == r["answer"] and value == r["options"]["ABCD".index(r["answer"])]
        if r["family"] in ("count_colour", "count_shape"):  # the count it states is the value
            assert re.search(rf"That makes {value}\.", text)
        if r["family"] == "arithmetic":
            assert re.search(rf"= {value}\.", text)


def test_gold_responses_are_grounded_in_the_scene(rows):
    described = 0
    for r in rows[:400]:
        text = task.response(r["scene"], r)[len(task.caption(r["scene"])):]  # the steps after the reading
        objects = {o["cell"]: o for o in r["scene"]}
        if r["family"] in ("count_colour", "count_shape"):  # it lists exactly the matching cells
            attr, value = r["params"]["attr"], r["params"]["value"]
            listed = re.search(r": (.*?)\. That makes", text).group(1)
            cells = [task.CELLS[c] for c, o in sorted(objects.items()) if o[attr] == value]
            assert listed == (", ".join(cells) or "none")
        # every object it describes ("at the X, is a red circle", "the red circle is at the X") is there
        found = [(w, c, s) for w, c, s in re.findall(r"at the ([\w-]+),? is a (\w+) (\w+)", text)]
        found += [(w, c, s) for c, s, w in re.findall(r"the (\w+) (\w+) (?:is )?at the ([\w-]+)", text)]
        for where, colour, shape in found:
            o = objects[task.CELLS.index(where)]
            assert (o["colour"], o["shape"]) == (colour, shape)
        described += len(found)
    assert described > 150  # colour_at, shape_at, largest, relation: ~200 in 400 rows


def wrong_answers(r):
    """r's reference answer gone wrong, each ending in the gold letter: (misread, slip, no reading)."""
    gold, reading = task.response(r["scene"], r), task.caption(r["scene"])
    seen = [dict(o) for o in r["scene"]]  # the first object read in another colour
    seen[0]["colour"] = next(c for c in task.COLOURS if c != seen[0]["colour"])
    _, sep, tail = gold.partition(" So the answer is ")
    return task.caption(seen) + gold[len(reading):], f"{reading} That makes 0.{sep}{tail}", gold[len(reading) + 1:]


def test_reasoned_tells_a_reasoned_answer_from_a_lucky_letter(rows):
    for r in rows[:200]:
        assert task.reasoned(r, task.response(r["scene"], r))
        for lucky in wrong_answers(r):  # wrong reading or steps, then the right letter
            assert ANSWER.search(lucky).group(3) == r["answer"] and not task.reasoned(r, lucky)


def test_error_kind_names_the_first_wrong_part(rows):
    for r in rows[:200]:
        gold = task.response(r["scene"], r)
        assert task.error_kind(r, gold) == "reasoned"
        assert [task.error_kind(r, text) for text in wrong_answers(r)] == ["misread", "slip", "format"]
        other = next(x for x in "ABCD" if x != r["answer"])
        letter = gold.replace(f"option {r['answer']}. ## {r['answer']} ##", f"option {other}. ## {other} ##")
        assert task.error_kind(r, letter) == "letter"


def test_answer_analysis_counts_kinds_letters_and_families(tmp_path, rows):
    picked = rows[:40]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked))
    records = []
    for k, r in enumerate(picked):  # even rows answered right with reasoning, odd rows misread, then option A
        text = task.response(r["scene"], r) if k % 2 == 0 else wrong_answers(r)[0][:-4] + "A ##"
        answer = r["answer"] if k % 2 == 0 else "A"
        records.append({"id": r["id"], "turns": [{"text": text, "answer": answer, "correct": answer == r["answer"]}]})
    (tmp_path / "responses.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    a = task.answer_analysis(str(tmp_path / "data.jsonl"), str(tmp_path / "responses.jsonl"))
    lucky = sum(k % 2 == 1 and r["answer"] == "A" for k, r in enumerate(picked))
    assert a["right"] == 20 + lucky and a["right_reasoned"] == 20  # a lucky letter is right, not reasoned
    assert a["kinds"] == {"reasoned": 20, "misread": 20}
    assert a["answered"]["A"] == 20 + sum(k % 2 == 0 and r["answer"] == "A" for k, r in enumerate(picked))
    assert a["accuracy_by_letter"]["A"] == 1.0
    assert set(a["accuracy_by_family"]) == {r["family"] for r in picked}


def test_sft_conversations_follow_the_protocol(written):
    _, splits = written
    reviews = 0
    for r in splits["sft"]:
        m = r["messages"]
        assert [x["role"] for x in m] in (["user", "assistant"], ["user", "assistant"] * 2)
        assert m[0]["content"] == turn1_message(r["question"], r["options"])
        assert m[0]["content"].split("\n")[1:] == [f"{x}. {o}" for x, o in zip("ABCD", r["options"])] + [COT, FORMAT]
        gold = task.response(r["scene"], r)
        assert m[1]["content"] == gold and ANSWER.search(gold).group(3) == r["answer"]
        if len(m) == 4:  # a review turn: a review prompt, then the same correct answer
            reviews += 1
            assert m[2]["content"] in [review_message(n) for n in task.REVIEWS] and m[3]["content"] == gold
    assert 0.05 <= reviews / len(splits["sft"]) <= 0.16


# ---------------------------------------------------------------------------- images


def test_each_object_is_drawn_inside_its_own_cell_in_its_colour(rows):
    for r in rows[:200]:
        pixels = np.asarray(task.render(r["scene"]))
        objects = {o["cell"]: o for o in r["scene"]}
        for cell in range(9):
            row, col = divmod(cell, 3)
            patch = pixels[16 * row:16 * row + 16, 16 * col:16 * col + 16].reshape(-1, 3)
            colours = {tuple(p) for p in patch} - {task.BACKGROUND}
            expect = {task.RGB[objects[cell]["colour"]]} if cell in objects else set()
            assert colours == expect  # one object per patch, nothing spills over a cell border
            assert tuple(patch[8 * 16 + 8]) == (next(iter(expect)) if expect else task.BACKGROUND)


def test_shapes_and_sizes_are_told_apart_by_their_pixels():
    masks = {}
    for shape in task.SHAPES:
        for size in task.SIZES:
            image = task.render([{"cell": 4, "colour": "red", "shape": shape, "size": size}])
            masks[shape, size] = (np.asarray(image) != task.BACKGROUND).any(-1).tobytes()
    assert len(set(masks.values())) == 8
    for shape in task.SHAPES:
        assert masks[shape, "large"].count(1) > 2 * masks[shape, "small"].count(1)
    assert task.render([], cell_px=8).size == (24, 24)


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_ids_and_round_trip(tokenizer_dir, written):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    image, pad = tok.token_to_id("<image>"), tok.token_to_id("<pad>")
    assert pad == image + 1 and tok.get_vocab_size() < 512
    _, splits = written
    texts = {m["content"] for r in splits["sft"] for m in r["messages"]}
    texts |= {task.response(r["scene"], r)[:-4] + f"{x} ##" for r in splits["test"] for x in "ABCD"}
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text and 0 not in ids  # no <unk>
    for sentence in vocab.protocol_sentences():  # each fixed sentence is one token
        assert len(tok.encode(sentence, add_special_tokens=False).ids) == 1
    reply = tok.encode("There are 3. ## B ##", add_special_tokens=False)
    assert reply.tokens[-3:] == ["▁##", "▁B", "▁##"]
    chat = "USER: <image>\nHow many circles are there? ASSISTANT: ## B ##</s>USER: Hi ASSISTANT:"
    ids = tok.encode(chat).ids
    assert ids[0] == 1 and ids.count(image) == 1 and ids.count(2) == 1
    assert tok.decode(ids) == chat.replace("<image>", "").replace("</s>", "")


def test_tokenizer_loads_in_transformers_with_the_llava_chat_format(tokenizer_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert hf.pad_token_id == tok.token_to_id("<pad>") and hf.padding_side == "left"
    u1, a1 = turn1_message("How many circles are there?", ["0", "1", "2", "3"]), "Looking. ## A ##"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": u1}]},
                {"role": "assistant", "content": [{"type": "text", "text": a1}]},
                {"role": "user", "content": [{"type": "text", "text": review_message("vp2")}]}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == f"USER: <image>\n{u1} ASSISTANT: {a1}</s>USER: {review_message('vp2')} ASSISTANT:"
    assert hf(text)["input_ids"] == tok.encode(text).ids  # same ids both ways, <s> first
    response = "Looking for circles: top-left, centre. That makes 2. So the answer is 2, option C. ## C ##"
    assert hf.decode(hf(response)["input_ids"], skip_special_tokens=True) == response


# ---------------------------------------------------------------------------- measurements


@pytest.mark.bench
def test_bench_write_default_sizes(tmp_path):
    start = time.perf_counter()
    splits = task.write_task(tmp_path, seed=0, n_sft=20000, n_construct=2000, n_test=1000)
    written = time.perf_counter() - start
    texts = [m["content"] for r in splits["sft"] for m in r["messages"]]
    start = time.perf_counter()
    tok = vocab.train_tokenizer(texts, tmp_path / "tok", whole_tokens=vocab.protocol_sentences())
    trained = time.perf_counter() - start
    prompt = [len(tok.encode(r["messages"][0]["content"], add_special_tokens=False).ids) for r in splits["sft"]]
    reply = [len(tok.encode(r["messages"][1]["content"], add_special_tokens=False).ids) for r in splits["sft"]]
    print(f"\n| write 20k sft + 2k construct + 1k test | {written:.1f} s |"
          f"\n| train tokenizer                        | {trained:.1f} s, vocab {tok.get_vocab_size()} |"
          f"\n| turn-1 prompt tokens (no image)        | mean {np.mean(prompt):.1f}, max {max(prompt)} |"
          f"\n| response tokens                        | mean {np.mean(reply):.1f}, max {max(reply)} |")
    assert os.path.exists(tmp_path / "sft.jsonl") and written < 60
