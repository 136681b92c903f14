"""The built-in synthetic task: multiple-choice questions about coloured shapes on a 3×3 grid.

Nothing can be downloaded, so the default experiment brings its own data: Pillow draws the scenes, a
tiny LLaVA-architecture model is SFT-trained on them from scratch, and the SCL loop runs on top. The
files are the generic MCQ JSONL (`{"id", "image", "question", "options", "answer"}`), so every later
stage runs the same code as for a user's data set.

Why the task looks like this (the attempts behind it are in docs/experiments.md):
- One object per grid cell and one cell per ViT patch (`cell_px` equals the model's patch size): each
  image token holds one whole object, and the cell is its position embedding. 48×48 px, 9 tokens.
- Few values: 4 colours, 4 shapes, 2 sizes, 9 cells with one-word names. Every question has four
  options that make sense: the 4 colours, the 4 shapes, or 4 consecutive counts.
- No answer prior: the option set is drawn first, the gold option uniformly among the four (letters
  exactly balanced per split), and only then a scene that makes it true.
- The answer reads the grid out first (`caption`: a tiny model learns to see only when every answer
  starts with this reading), then takes a few steps grounded in it, then names the value and its
  option ("So the answer is 3, option B. ## B ##"): the letter is a lookup of a value just written.
- The tokenizer makes each fixed protocol sentence one token (`protocol_sentences`): SFT time is ∝ tokens.
"""
import hashlib
import json
import os
import random
from collections import Counter

from PIL import Image, ImageDraw

from scl.files import read_jsonl, write_jsonl
from scl.prompts import LETTERS, REVIEW_PROMPTS, review_message, turn1_message

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
VALUES = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}
CELLS = ("top-left", "top-middle", "top-right", "middle-left", "centre", "middle-right",
         "bottom-left", "bottom-middle", "bottom-right")  # cell index = 3 * row + column
DIRECTIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
FAMILIES = ("count_colour", "count_shape", "colour_at", "shape_at", "largest", "most_common",
            "relation", "arithmetic")
CHOICES = LETTERS[:4]  # every question has four options
REVIEWS = tuple(REVIEW_PROMPTS)  # cp, vp1, vp2, vp3
RGB = {"red": (220, 38, 38), "green": (22, 163, 74), "blue": (37, 99, 235), "yellow": (234, 179, 8)}
BACKGROUND = (245, 245, 245)

# ---------------------------------------------------------------------------- scenes and images
# A scene is a list of objects {"cell", "colour", "shape", "size"}, sorted by cell, at most one per cell.

def _obj(rng, cell, fix=None, avoid=None):
    """A random object in `cell`; attributes in `fix` are set, values in `avoid` are not drawn."""
    fix, avoid = fix or {}, avoid or {}
    o = {"cell": cell}
    for attr, values in VALUES.items():
        o[attr] = fix[attr] if attr in fix else rng.choice([v for v in values if v != avoid.get(attr)])
    return o


def render(scene, cell_px=16):
    """The scene as a (3·cell_px)² RGB image; each object is centred in its cell and stays inside it."""
    img = Image.new("RGB", (3 * cell_px, 3 * cell_px), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene:
        row, col = divmod(o["cell"], 3)
        margin = 1 if o["size"] == "large" else cell_px // 4  # 14 px vs 8 px wide in a 16-px cell
        x0, y0 = col * cell_px + margin, row * cell_px + margin
        x1, y1 = (col + 1) * cell_px - 1 - margin, (row + 1) * cell_px - 1 - margin  # inclusive
        if o["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=RGB[o["colour"]])
        elif o["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=RGB[o["colour"]])
        elif o["shape"] == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=RGB[o["colour"]])
        else:  # diamond
            draw.polygon([((x0 + x1) / 2, y0), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y1),
                          (x0, (y0 + y1) / 2)], fill=RGB[o["colour"]])
    return img


# ---------------------------------------------------------------------------- question families
# Each builder gets the gold option's index and returns (scene, question, options, params). The
# option set comes first and the scene is made to fit it, so the text alone tells nothing.

def _counts(rng, i):  # 4 consecutive counts, sorted; gold at index i
    low = rng.randint(0, 3)
    return [str(low + k) for k in range(4)], low + i


def _categories(rng, attr, i):  # all 4 values of `attr` in their fixed order; gold at index i
    # Fixed order, like the sorted counts: the letter follows from the value (with shuffled colours and
    # shapes a small base matched them far less often). The gold index is uniform: no text prior.
    options = list(VALUES[attr])
    return options, options[i]


def _count(rng, i, attr):
    options, k = _counts(rng, i)
    target = rng.choice(VALUES[attr])
    cells = rng.sample(range(9), rng.randint(max(k, 2), min(9, max(k, 2) + 4)))
    scene = [_obj(rng, c, fix={attr: target}) if j < k else _obj(rng, c, avoid={attr: target})
             for j, c in enumerate(cells)]
    question = f"How many {target} shapes are there?" if attr == "colour" else f"How many {target}s are there?"
    return scene, question, options, {"attr": attr, "value": target}


def _arithmetic(rng, i):
    options, left = _counts(rng, i)
    colour = rng.choice(COLOURS)
    taken = rng.randint(0 if left else 1, min(3, 9 - left))
    cells = rng.sample(range(9), left + taken)
    scene = [_obj(rng, c, fix={"colour": colour}) if j < taken else _obj(rng, c, avoid={"colour": colour})
             for j, c in enumerate(cells)]
    return scene, f"How many shapes are there in total minus the {colour} ones?", options, {"colour": colour}


def _at(rng, i, attr):
    options, gold = _categories(rng, attr, i)
    cells = rng.sample(range(9), rng.randint(2, 7))
    scene = [_obj(rng, cells[0], fix={attr: gold})] + [_obj(rng, c) for c in cells[1:]]
    where = CELLS[cells[0]]
    question = f"What colour is the shape at the {where}?" if attr == "colour" else f"What shape is at the {where}?"
    return scene, question, options, {"attr": attr, "cell": cells[0]}


def _largest(rng, i, attr):
    options, gold = _categories(rng, attr, i)
    cells = rng.sample(range(9), rng.randint(2, 7))
    scene = [_obj(rng, cells[0], fix={attr: gold, "size": "large"})]
    scene += [_obj(rng, c, fix={"size": "small"}) for c in cells[1:]]
    question = "What colour is the largest shape?" if attr == "colour" else "What shape is the largest object?"
    return scene, question, options, {"attr": attr}


def _most_common(rng, i, attr):
    options, gold = _categories(rng, attr, i)
    top = rng.randint(2, 3)  # the others have fewer: at most 3 + 3·2 = 9 objects
    values = [v for v in VALUES[attr] for _ in range(top if v == gold else rng.randint(0, top - 1))]
    scene = [_obj(rng, c, fix={attr: v}) for c, v in zip(rng.sample(range(9), len(values)), values)]
    question = "Which colour do most shapes have?" if attr == "colour" else "Which shape is the most common?"
    return scene, question, options, {"attr": attr}


def _relation(rng, i, attr):
    options, gold = _categories(rng, attr, i)
    direction = rng.choice(list(DIRECTIONS))
    (dr, dc), cells = DIRECTIONS[direction], list(range(9))
    anchor = rng.choice([c for c in cells if 0 <= c // 3 + dr < 3 and 0 <= c % 3 + dc < 3])
    near = anchor + 3 * dr + dc
    a = _obj(rng, anchor)
    kind = (a["colour"], a["shape"])  # the anchor must be the only object of its kind
    other = "shape" if attr == "colour" else "colour"
    scene = [a, _obj(rng, near, fix={attr: gold}, avoid={other: a[other]} if gold == a[attr] else None)]
    for c in rng.sample([c for c in cells if c not in (anchor, near)], rng.randint(0, 5)):
        o = _obj(rng, c)
        while (o["colour"], o["shape"]) == kind:
            o = _obj(rng, c)
        scene.append(o)
    name = f"the {a['colour']} {a['shape']}"
    question = (f"What colour is the shape directly {direction} {name}?" if attr == "colour"
                else f"What shape is directly {direction} {name}?")
    return scene, question, options, {"attr": attr, "anchor": anchor, "direction": direction}


def make_question(rng, family, letter):
    """One scene and question of `family` whose gold option is `letter`."""
    i, attr = LETTERS.index(letter), rng.choice(("colour", "shape"))
    builders = {"count_colour": lambda: _count(rng, i, "colour"), "count_shape": lambda: _count(rng, i, "shape"),
                "colour_at": lambda: _at(rng, i, "colour"), "shape_at": lambda: _at(rng, i, "shape"),
                "largest": lambda: _largest(rng, i, attr), "most_common": lambda: _most_common(rng, i, attr),
                "relation": lambda: _relation(rng, i, attr), "arithmetic": lambda: _arithmetic(rng, i)}
    scene, question, options, params = builders[family]()
    q = {"family": family, "params": params, "question": question, "options": options, "answer": letter}
    return sorted(scene, key=lambda o: o["cell"]), q


# ---------------------------------------------------------------------------- responses

def _steps(scene, q):
    """The reasoning steps that lead from `scene` to the answer of `q` (without the answer sentence)."""
    p, at = q["params"], {o["cell"]: o for o in scene}

    def listing(noun, match):
        cells = [CELLS[o["cell"]] for o in scene if match(o)]
        return f"Looking for {noun}: {', '.join(cells) or 'none'}. That makes {len(cells)}.", len(cells)

    family = q["family"]
    if family.startswith("count"):
        attr, v = p["attr"], p["value"]
        return listing(f"{v} shapes" if attr == "colour" else f"{v}s", lambda o: o[attr] == v)[0]
    if family == "arithmetic":
        (first, total), (second, taken) = listing("all shapes", lambda o: True), listing(
            f"{p['colour']} shapes", lambda o: o["colour"] == p["colour"])
        return f"{first} {second} {total} - {taken} = {total - taken}."
    if family.endswith("_at"):
        o = at[p["cell"]]
        return f"The shape at the {CELLS[o['cell']]} is a {o['colour']} {o['shape']}."
    if family == "largest":
        o = next(o for o in scene if o["size"] == "large")
        return f"The largest shape is the {o['colour']} {o['shape']} at the {CELLS[o['cell']]}."
    if family == "most_common":
        n = Counter(o[p["attr"]] for o in scene)
        counts = ", ".join(f"{v} {n[v]}" for v in VALUES[p["attr"]])
        return f"Counting {p['attr']}s: {counts}. The most common is {n.most_common(1)[0][0]}."
    a = at[p["anchor"]]  # relation
    dr, dc = DIRECTIONS[p["direction"]]
    o = at[p["anchor"] + 3 * dr + dc]
    return (f"The {a['colour']} {a['shape']} is at the {CELLS[a['cell']]}. Directly {p['direction']} it, "
            f"at the {CELLS[o['cell']]}, is a {o['colour']} {o['shape']}.")


def caption(scene) -> str:
    """Every cell of the grid in reading order: "top-left: small red circle. top-middle: empty. ..."."""
    at = {o["cell"]: o for o in scene}
    return ". ".join(f"{name}: {at[c]['size']} {at[c]['colour']} {at[c]['shape']}" if c in at else f"{name}: empty"
                     for c, name in enumerate(CELLS)) + "."


def response(scene, q) -> str:
    """The reference answer to `q`: the whole scene read out (`caption`), the steps, then the value and
    its option, ending `## X ##`: perception first, then reasoning."""
    value = q["options"][LETTERS.index(q["answer"])]
    return f"{caption(scene)} {_steps(scene, q)} So the answer is {value}, option {q['answer']}. ## {q['answer']} ##"


def error_kind(row, text) -> str:
    """What went wrong in a response, against the reference: "reasoned" (nothing), "misread" (a cell of
    the reading wrong), "slip" (the reading right, then a wrong step: a cell listed, a count, the object
    looked up), "letter" (reading and steps right, then the wrong value or option), "format" (no
    reading and steps to compare)."""
    scene, (head, sep, _) = row["scene"], text.partition(" So the answer is ")
    if not sep or not head.startswith(CELLS[0] + ":"):
        return "format"
    if not head.startswith(caption(scene)):
        return "misread"
    if head[len(caption(scene)):].strip() != _steps(scene, row):
        return "slip"
    return "reasoned" if text == response(scene, row) else "letter"


def reasoned(row, text) -> bool:
    """Does `text` carry the whole reference reasoning of `row`, up to the letter? A right letter alone can
    be a lucky guess after wrong steps (1 in 4 by chance); only the built-in task can tell, from the scene."""
    return error_kind(row, text) == "reasoned"


# ---------------------------------------------------------------------------- splits and files

def content_key(scene, question):
    """Hash of what a question is about; no scene + question pair is in two splits."""
    return hashlib.sha1(json.dumps([scene, question], sort_keys=True).encode()).hexdigest()


def build_split(seed, split, n, exclude=()):
    """`n` rows of one split, deterministic in (seed, split); families and gold letters are balanced
    exactly (up to n mod 8 and n mod 4). Rows whose content key is in `exclude` are drawn again."""
    rng = random.Random(f"scl-task/{seed}/{split}")  # a str seed is hashed with sha512: stable
    families = [FAMILIES[k % len(FAMILIES)] for k in range(n)]
    letters = [CHOICES[k % len(CHOICES)] for k in range(n)]
    rng.shuffle(families)
    rng.shuffle(letters)
    seen, rows = set(exclude), []
    for k, (family, letter) in enumerate(zip(families, letters)):
        while True:
            scene, q = make_question(rng, family, letter)
            key = content_key(scene, q["question"])
            if key not in seen:
                break
        seen.add(key)
        rows.append({"id": f"{split}-{k:06d}", "image": f"images/{split}/{k:06d}.png", **q, "scene": scene})
    return rows


def conversation(row, rng, review_fraction=0.1):
    """An SFT conversation for `row`: turn 1, and with probability `review_fraction` a review turn (a
    review prompt drawn from cp/vp1/vp2/vp3, then the answer again), so the model knows the two-turn
    format. Messages are {"role", "content"}; the image goes with message 0. The second answer is the
    same correct response a single-turn answer is trained to be: nothing here teaches turn 2 to beat
    turn 1 or to lose to it; what the review turn does to the trained model is measured."""
    answer = response(row["scene"], row)
    messages = [{"role": "user", "content": turn1_message(row["question"], row["options"])},
                {"role": "assistant", "content": answer}]
    if rng.random() < review_fraction:
        messages += [{"role": "user", "content": review_message(rng.choice(REVIEWS))},
                     {"role": "assistant", "content": answer}]
    return messages


def write_task(out_dir, seed=0, n_sft=20000, n_construct=1000, n_test=1000, cell_px=16, review_fraction=0.1,
               blank=False):
    """Write out_dir/{sft,construct,test}.jsonl and out_dir/images/<split>/*.png; return the rows.

    Rows: {"id", "image", "question", "options", "answer"} (the generic format) plus "family",
    "params", "scene"; sft rows also carry "messages" (see `conversation`). The test split is drawn
    first and construct second, so they do not change with n_sft. `blank`: every image is the empty
    background (the text-only baseline; the rows and answers are unchanged)."""
    rng, seen, splits = random.Random(f"scl-task/{seed}/conversations"), set(), {}
    for split, n in (("test", n_test), ("construct", n_construct), ("sft", n_sft)):
        rows = build_split(seed, split, n, exclude=seen)
        seen.update(content_key(r["scene"], r["question"]) for r in rows)
        os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
        for row in rows:
            render([] if blank else row["scene"], cell_px).save(os.path.join(out_dir, row["image"]), compress_level=1)
            if split == "sft":
                row["messages"] = conversation(row, rng, review_fraction)
        write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), rows)  # a complete file or none
        splits[split] = rows
    return splits


def reasoning_counts(data: str, responses: str) -> dict:
    """How many right answers in a rollout file, and how many chosen and rejected responses of its
    SelfCorSet, carry the task's reference reasoning (`reasoned`)? A right letter after wrong steps is a
    lucky guess, and a pair can only teach reasoning if its chosen response has it."""
    from scl.selfcorrect import build_pairs

    rows = {r["id"]: r for r in read_jsonl(data)}
    records = read_jsonl(responses)
    right = [(rows[x["id"]], t["text"]) for x in records for t in x["turns"] if t["correct"]]
    pairs = build_pairs(records)
    return {"right": len(right), "right_reasoned": sum(reasoned(row, text) for row, text in right),
            "chosen_reasoned": sum(reasoned(rows[p["id"]], p["chosen"]) for p in pairs),
            "rejected_reasoned": sum(reasoned(rows[p["id"]], p["rejected"]) for p in pairs)}


def answer_analysis(data: str, responses: str) -> dict:
    """What a model's single-turn answers are made of: the error kind of every answer, the right answers
    that are reasoned, accuracy per family and per gold letter, and how often each letter is answered.
    Comparing two models says *why* one is more accurate: fewer slips of some kind, or merely a letter
    it now prefers whatever the question (a prior, not the paper's effect)."""
    rows = {r["id"]: r for r in read_jsonl(data)}
    records = [(rows[x["id"]], x["turns"][0]) for x in read_jsonl(responses)]
    total, right = {"family": Counter(), "letter": Counter()}, {"family": Counter(), "letter": Counter()}
    for row, t in records:
        for key, value in (("family", row["family"]), ("letter", row["answer"])):
            total[key][value] += 1
            right[key][value] += t["correct"]
    return {"kinds": dict(Counter(error_kind(row, t["text"]) for row, t in records)),
            "right": sum(t["correct"] for _, t in records),
            "right_reasoned": sum(t["correct"] and reasoned(row, t["text"]) for row, t in records),
            "accuracy_by_family": {k: right["family"][k] / n for k, n in sorted(total["family"].items())},
            "accuracy_by_letter": {k: right["letter"][k] / n for k, n in sorted(total["letter"].items())},
            "answered": dict(sorted(Counter(str(t["answer"]) for _, t in records).items()))}
