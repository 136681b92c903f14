"""The built-in task's tokenizer: a small BPE trained on the task's own text, written as a real
checkpoint's tokenizer.json + tokenizer_config.json (with scl/tokenizer.py's LLaVA chat template), so
scl/tokenizer.py and transformers both read it. As in llava-hf's llava-1.5, the tokenizer adds "<s>".
"""
import os
import re

from scl.files import write_json
from scl.prompts import REVIEW_PROMPTS, review_message, turn1_message
from scl.tokenizer import CHAT_TEMPLATES


def protocol_sentences():
    """The lines of the protocol prompts that never change (instructions, review prompts)."""
    question, options = "Q?", ["o1", "o2", "o3", "o4"]
    lines = [x for x in turn1_message(question, options).split("\n")
             if x != question and not re.fullmatch(r"[A-D]\. o\d", x)]
    lines += [x for name in REVIEW_PROMPTS for x in review_message(name).split("\n")]
    return list(dict.fromkeys(x for x in lines if x.strip()))


def train_tokenizer(texts, out_dir, whole_tokens=()):
    """Train a BPE on `texts` and write it to out_dir. Ids: <unk> 0, <s> 1, </s> 2, the learned pieces,
    <image>, <pad>, then each of `whole_tokens` as one token. Any printable ASCII text round-trips."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Newlines and . , ? stand alone, so "3" in "is 3, option B." is the token of the option line "B. 3".
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\n.,?]"), "isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    alphabet = [chr(c) for c in range(33, 127)] + ["▁", "\n"]
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=alphabet, show_progress=False)
    pieces = []
    for text in texts:  # the whole tokens are matched before BPE: spend no merges on them
        for whole in whole_tokens:
            text = text.replace(whole, "\n")
        pieces += [text, "\n" + text]  # also as after "<image>\n": a first word without "▁"
    roles = ["USER: ASSISTANT:\nUSER:"] * 100  # the chat format's words, first in a text and after </s>
    tok.train_from_iterator(pieces + roles, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<image>", "<pad>")])
    tok.add_tokens([AddedToken(t, normalized=False) for t in whole_tokens])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "padding_side": "left", "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 1024, "chat_template": CHAT_TEMPLATES["llava"]})
    return tok
