"""scl/selfcorrect.py: Type 1–4, the SelfCorSet pair rule, and multi-turn rollouts that keep the
turn-1 answer in the context. The helpers at the top (a tiny model folder, an MCQ file,
a scripted stand-in for generate()) are shared with tests/test_generate.py."""
import json
import os
import re

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

import scl.selfcorrect as sc
from scl.config import TextConfig, VisionConfig, VLMConfig
from scl.image import ImageProcessor
from scl.prompts import review_message, turn1_message
from scl.tokenizer import Tokenizer, render_chat
from scl.vlm import VLM
from scl.weights import load_vlm, save_vlm

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


# ---------------------------------------------------------------------------- shared helpers

def make_model_dir(path) -> str:
    """A tiny random LLaVA folder (config.json, model.safetensors, tokenizer files) in `path`."""
    os.makedirs(path, exist_ok=True)
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    texts = [turn1_message(f"Question q{i}: which colour is the square?", list(COLOURS)) for i in range(3)]
    texts += [review_message(p) for p in ("cp", "vp1", "vp2", "vp3")] + ["## A ## ## B ## ## C ## ## D ##"]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<pad>", "<s>", "</s>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    backend.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "image_token": "<image>",
                   "add_bos_token": True}, f)
    tok = Tokenizer.from_dir(path)
    cfg = VLMConfig(
        vision_config=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=16, patch_size=8),
        text_config=TextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        image_token_index=tok.image_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    save_vlm(VLM(cfg).eval(), path)
    return str(path)


def make_rows(folder, n=4, answers=None) -> list[dict]:
    """`n` MCQ rows with PNG images in folder/img/; row i's question names its id `q{i}`."""
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % 4]
        Image.new("RGB", (20, 20), COLOURS[colour]).save(os.path.join(folder, "img", f"q{i}.png"))
        rows.append({"id": f"q{i}", "image": f"img/q{i}.png", "question": f"Question q{i}: which colour is the square?"
                     + " Look closely." * (i % 3), "options": list(COLOURS),
                     "answer": (answers or "ABCD")[i % len(answers or "ABCD")]})
    return rows


def write_jsonl(path, rows, extra_lines=()) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def scripted(tok, script, seen=None):
    """A stand-in for generate(): row with question `qX` answers script["qX"][turn - 1], where the turn
    is read from the prompt (how many assistant headers it holds). `seen` collects the prompt ids."""
    def fake(model, input_ids, attention_mask, pixel_values=None, *, max_new_tokens, eos_token_id, pad_token_id,
             temperature=0.0, top_p=1.0, generator=None, context=None):
        out = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            ids = [i for i, m in zip(ids, mask) if m]
            if seen is not None:
                seen.append(ids)
            text = tok.decode(ids, skip_special_tokens=False)
            qid = re.search(r"Question (\w+):", text).group(1)
            out.append(tok.encode(script[qid][text.count("ASSISTANT:") - 1]) + [eos_token_id])
        width = max(map(len, out))
        return torch.tensor([o + [pad_token_id] * (width - len(o)) for o in out])  # (B, T_new)
    return fake


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="session")
def loaded(model_dir):
    model = load_vlm(model_dir)
    return model, Tokenizer.from_dir(model_dir), ImageProcessor.from_config(model.config)


@pytest.fixture
def rows(tmp_path):
    from scl.data import load_rows
    got, skipped = load_rows(write_jsonl(tmp_path / "data.jsonl", make_rows(tmp_path, 4)))
    assert skipped == []
    return got


# ---------------------------------------------------------------------------- the method, pure

def test_question_type_table():
    assert [sc.question_type(a, b) for a, b in [(1, 1), (0, 1), (1, 0), (0, 0)]] == [1, 2, 3, 4]


def _record(i, answers, gold="B", texts=None):
    texts = texts or [f"text {i}.{k}" for k in range(len(answers))]
    turns = [{"text": t, "answer": a, "correct": a == gold} for t, a in zip(texts, answers)]
    types = sc.round_types(turns)
    return {"id": f"q{i}", "sample": 0, "gold": gold, "prompt": f"prompt {i}", "image": f"img/q{i}.png",
            "turns": turns, "type": types[0] if types else None, "types": types}


def test_pair_rule_and_type_counts_on_hand_made_rollouts():
    records = [_record(0, "BB"), _record(1, "AB"), _record(2, "BA"), _record(3, "AC"),  # types 1, 2, 3, 4
               _record(4, ["B", None]), _record(5, [None, "B"]), _record(6, "AB"), _record(7, ["B"])]
    assert [r["type"] for r in records] == [1, 2, 3, 4, None, None, 2, None]
    pairs = sc.build_pairs(records)
    assert [(p["id"], p["type"]) for p in pairs] == [("q1", 2), ("q2", 3), ("q6", 2)]
    # Type 2: the corrected turn 2 is chosen; Type 3: the turn-1 answer that turn 2 broke is chosen.
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("text 1.1", "text 1.0")
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == ("text 2.0", "text 2.1")
    assert pairs[0]["prompt"] == "prompt 1" and pairs[0]["image"] == "img/q1.png"
    assert set(pairs[0]) == {"id", "sample", "image", "prompt", "chosen", "rejected", "type"}

    s = sc.summarize(records, [{"id": "x", "reason": "missing image: x.png"}])
    assert s["types"] == {"1": 1, "2": 2, "3": 1, "4": 1, "unparsed": 2}
    assert s["correct"] == {"turn1": 4, "turn2": 4} and s["unparsed"] == {"turn1": 1, "turn2": 1}
    assert s["wrong"] == {"turn1": 3, "turn2": 2}  # unparsed answers are not counted as wrong
    assert s["accuracy"] == {"turn1": 4 / 8, "turn2": 4 / 7}  # q7 has no turn 2
    assert s["rollouts"] == 8 and s["pairs"] == 3 and s["pairs_by_type"] == {"2": 2, "3": 1}
    assert s["skipped"] == 1


def test_pairs_follow_the_answers_not_a_stale_type_field():
    record = {**_record(0, "AB"), "type": 4}  # hand-edited type: the turns say wrong -> right
    assert [p["type"] for p in sc.build_pairs([record])] == [2]


def test_k_rounds_types_per_round_pair_and_pairs_from_turns_1_2():
    records = [_record(0, "ABA"), _record(1, "BBA"), _record(2, "AAB")]
    assert [r["types"] for r in records] == [[2, 3], [1, 3], [4, 2]]
    assert [(p["id"], p["chosen"]) for p in sc.build_pairs(records)] == [("q0", "text 0.1")]
    s = sc.summarize(records, [])
    assert s["types_by_round"]["turn2->turn3"] == {"1": 0, "2": 1, "3": 2, "4": 0, "unparsed": 0}
    assert s["accuracy"] == {"turn1": 1 / 3, "turn2": 2 / 3, "turn3": 1 / 3}


# ---------------------------------------------------------------------------- rollouts

# Golds from make_rows: q0 A, q1 B, q2 C, q3 D. Turn 1 -> 2: q0 Type 4, q1 Type 2, q2 Type 3, q3 unparsed.
SCRIPT = {"q0": ["It is ## B ##", "Still ## B ##", "## B ##"],
          "q1": ["## A ##", "On review ## B ##", "## B ##"],
          "q2": ["## C ##", "Hmm ## D ##", "## C ##"],
          "q3": ["no idea", "## D ##", "## D ##"]}


def test_rollout_two_turns_types_pairs_and_the_prompt_the_model_saw(loaded, rows, monkeypatch):
    model, tok, proc = loaded
    seen = []
    monkeypatch.setattr(sc, "generate", scripted(tok, SCRIPT, seen))
    records = sc.rollout(model, tok, proc, rows, prompts={"vp2": 2}, batch_size=3)["vp2"]
    assert [(r["id"], r["type"]) for r in records] == [("q0", 4), ("q1", 2), ("q2", 3), ("q3", None)]
    assert records[1]["turns"] == [{"text": "## A ##", "answer": "A", "correct": False},
                                   {"text": "On review ## B ##", "answer": "B", "correct": True}]
    assert records[3]["turns"][0]["answer"] is None
    pairs = sc.build_pairs(records)
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("q1", "On review ## B ##", "## A ##"), ("q2", "## C ##", "Hmm ## D ##")]

    n_img = model.config.num_image_tokens
    turn1 = [ids for ids in seen if tok.decode(ids, skip_special_tokens=False).count("ASSISTANT:") == 1]
    turn2 = [ids for ids in seen if tok.decode(ids, skip_special_tokens=False).count("ASSISTANT:") == 2]
    assert len(turn1) == len(turn2) == 4
    for p in pairs:  # the pair's prompt renders to exactly the ids the model answered in turn 1
        ids = render_chat(tok, [{"role": "user", "content": p["prompt"]}], n_img, add_generation_prompt=True)[0]
        assert ids in turn1
        row = next(r for r in rows if r.id == p["id"])
        assert p["prompt"] == turn1_message(row.question, row.options)
    for ids in turn2:  # turn 2 continues the conversation: answer 1 in context, the review, one image
        text = tok.decode(ids, skip_special_tokens=False)
        qid = re.search(r"Question (\w+):", text).group(1)
        assert SCRIPT[qid][0] in text and review_message("vp2") in text
        assert ids.count(tok.image_token_id) == n_img and ids[0] == tok.bos_token_id


def test_rollout_k_rounds_repeat_the_review_and_sp_has_one_turn(loaded, rows, monkeypatch):
    model, tok, proc = loaded
    seen = []
    monkeypatch.setattr(sc, "generate", scripted(tok, SCRIPT, seen))
    records = sc.rollout(model, tok, proc, rows, prompts={"cp": 3}, batch_size=4)["cp"]
    assert [r["types"] for r in records] == [[4, 4], [2, 1], [3, 2], [None, 1]]
    last = tok.decode(seen[-1], skip_special_tokens=False)
    assert last.count(review_message("cp")) == 2 and last.count("ASSISTANT:") == 3
    seen.clear()
    records = sc.rollout(model, tok, proc, rows, prompts={"sp": 2})["sp"]
    assert all(len(r["turns"]) == 1 and r["type"] is None for r in records) and len(seen) == 4
    assert sc.build_pairs(records) == []


def test_plan_is_fixed_sorted_longest_first_and_keeps_samples_together(loaded, rows):
    _, tok, _ = loaded
    plan = sc.plan_batches(tok, rows, samples=2, batch_size=3)
    assert sorted(it for b in plan for it in b) == [(i, s) for i in range(4) for s in range(2)]
    assert [len(b) for b in plan] == [3, 3, 2]
    flat = [i for b in plan for i, _ in b]
    lengths = [len(tok.encode(turn1_message(rows[i].question, rows[i].options))) for i in flat]
    assert lengths == sorted(lengths, reverse=True)
    assert plan == sc.plan_batches(tok, rows, samples=2, batch_size=3)


def test_real_generation_sampling_is_seeded_per_batch(loaded, rows):
    model, tok, proc = loaded
    kw = dict(prompts={"vp1": 2}, samples=2, temperature=1.0, top_p=0.9, max_new_tokens=6, batch_size=4)
    a, b, c = (sc.rollout(model, tok, proc, rows, seed=seed, **kw)["vp1"] for seed in (1, 1, 2))
    texts = lambda recs: [t["text"] for r in recs for t in r["turns"]]  # noqa: E731
    assert texts(a) == texts(b) and texts(a) != texts(c)
    assert [(r["id"], r["sample"]) for r in a] == [(f"q{i}", s) for i in range(4) for s in range(2)]
    assert all(isinstance(t["correct"], bool) for r in a for t in r["turns"])


def test_review_prompts_continuing_one_greedy_turn1_equal_each_prompt_alone(loaded, rows):
    """eval.py generates turn 1 once and every review prompt continues it in the same cache: the records
    of each prompt rolled out alone from that turn 1 (and of vp3's whole rollout, turn 1 included)."""
    model, tok, proc = loaded
    shared = sc.rollout(model, tok, proc, rows, prompts={"sp": 1, "cp": 2, "vp3": 3}, max_new_tokens=6, batch_size=3)
    turn1 = [r["turns"][0]["text"] for r in shared["sp"]]
    for p, rounds in (("cp", 2), ("vp3", 3)):
        alone = sc.rollout(model, tok, proc, rows, prompts={p: rounds}, first=turn1, max_new_tokens=6, batch_size=2)
        assert alone[p] == shared[p] and len(alone[p][0]["turns"]) == rounds
    assert sc.rollout(model, tok, proc, rows, prompts={"vp3": 3}, max_new_tokens=6)["vp3"] == shared["vp3"]
    given = sc.rollout(model, tok, proc, rows, prompts={"vp3": 3}, first=["I think ## B ##"] * len(rows),
                       max_new_tokens=6)["vp3"]
    assert [r["turns"][0] for r in given] == [{"text": "I think ## B ##", "answer": "B", "correct": r.answer == "B"}
                                              for r in rows] and all(len(r["turns"]) == 3 for r in given)


def test_each_review_prompt_starts_from_turn1s_cache_so_it_does_not_grow(loaded, rows, monkeypatch):
    model, tok, proc = loaded
    made = []

    class Recorded(sc.Context):
        def __init__(self, *a):
            super().__init__(*a)
            made.append(self)
    monkeypatch.setattr(sc, "Context", Recorded)

    def size(prompts):
        made.clear()
        sc.rollout(model, tok, proc, rows, prompts=prompts, max_new_tokens=6, batch_size=4)
        return made[0].max_len
    assert size({"sp": 1, "cp": 2, "vp1": 2, "vp3": 3}) == max(size({"sp": 1, p: k}) for p, k in
                                                               (("cp", 2), ("vp1", 2), ("vp3", 3)))


def test_rollout_turns_that_continue_the_cache_equal_each_conversation_from_scratch(loaded, rows, monkeypatch):
    """Turns 2 and 3, and a second review prompt continuing the same turn 1, feed only what the cache lacks;
    the same rollouts with every turn's whole conversation recomputed without a cache (generate_ref, the
    image encoded again) give the same records."""
    from scl.generation import generate_ref
    model, tok, proc = loaded
    kw = dict(prompts={"vp1": 3, "cp": 2}, samples=2, temperature=1.0, top_p=0.9, max_new_tokens=8, batch_size=5)
    images, real = [], sc.generate

    def counting(model, input_ids, attention_mask, pixel_values, **kw):
        images.append(None if pixel_values is None else pixel_values.shape[0])
        return real(model, input_ids, attention_mask, pixel_values, **kw)
    monkeypatch.setattr(sc, "generate", counting)
    cached = sc.rollout(model, tok, proc, rows, **kw)
    assert images == [5, None, None, None, 3, None, None, None]  # each image is encoded in turn 1 only
    monkeypatch.setattr(sc, "generate", lambda *a, context=None, **k: generate_ref(*a, **k))  # context unused
    assert sc.rollout(model, tok, proc, rows, **kw) == cached


def test_config_rejects_bad_values():
    ok = dict(model="m", data="d", out_dir="o")
    for bad in (dict(prompt="vp9"), dict(rounds=0), dict(samples=2), dict(top_p=0.0), dict(dtype="int8")):
        with pytest.raises(ValueError):
            sc.GenerateConfig(**ok, **bad)
    assert sc.GenerateConfig(**ok, samples=2, temperature=0.7).samples == 2
