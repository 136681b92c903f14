"""scl/base.py: the SFT data as fixed-shape blocks train exactly the answers they should."""
import random

import numpy as np
import torch

from scl import task, vocab
import itertools

from scl.base import encode_conversations, length_buckets
from scl.prompts import review_message, turn1_message
from scl.tokenizer import Tokenizer


def test_blocks_train_the_assistant_answers_marked_trained_and_nothing_else(tmp_path):
    rows = task.build_split(5, "sft", 40)
    rng = random.Random(0)
    convs = [task.conversation(r, rng, review_fraction=0.5) for r in rows]
    for c in convs[::2]:
        c[1]["train"] = False  # an answer that is context only
    texts = [m["content"] for c in convs for m in c] + [o for r in rows for o in r["options"]]
    vocab.train_tokenizer(texts, tmp_path, whole_tokens=vocab.protocol_sentences())
    tok = Tokenizer.from_dir(tmp_path)
    slips = 0
    for idx, ids, targets in encode_conversations(convs, tok, num_image_tokens=9, buckets=2):
        for row, n in enumerate(idx.tolist()):
            trained = tok.decode([t for t in targets[row].tolist() if t != -100], skip_special_tokens=True)
            answers = [m for m in convs[n] if m["role"] == "assistant"]
            want = "".join(m["content"] for m in answers if m.get("train", True))
            assert trained.replace(" ", "") == want.replace(" ", "")  # every trained answer, nothing else
            slips += not answers[0].get("train", True)
            # targets are the next input token wherever they are trained
            keep = targets[row] != -100
            assert torch.equal(targets[row][keep], ids[row][1:][keep[:-1]])
    assert slips == 20  # the first answers marked as context above


def test_length_buckets_pad_least_among_all_cuts():
    rng = random.Random(3)
    for _ in range(30):
        lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 25))]
        K = rng.randint(1, 4)
        padded = lambda tops: sum(min(t for t in tops if t >= n) for n in lengths)
        distinct = sorted(set(lengths))
        brute = min(padded(list(c) + [distinct[-1]]) for k in range(min(K, len(distinct)))
                    for c in itertools.combinations(distinct[:-1], k))
        tops = length_buckets(lengths, K)
        assert len(tops) <= K and tops[-1] == max(lengths) and padded(tops) == brute
    assert length_buckets([], 3) == []
