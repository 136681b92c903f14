"""Tokenizer + render_chat: ids equal transformers' on the same files, the loss mask covers exactly
the trained answers, the image expands to one id per feature."""
import json
import os

import pytest
from PIL import Image
from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

from scl.tokenizer import Tokenizer, pad_left, render_chat

transformers = pytest.importorskip("transformers")

# llava-hf/llava-1.5-7b-hf's chat template, {% generation %} tags included.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr("
    "'type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# The same, closing an assistant turn with </s> as original LLaVA training did: our deliberate format.
LLAVA_EOS_TEMPLATE = LLAVA_TEMPLATE.replace("{{ content['text'] + ' '}}{% endgeneration %}",
                                            "{{ content['text'] + '</s>'}}{% endgeneration %}")
# llava-interleave-qwen style ChatML (no system prompt, image first in the user turn).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{% for "
    "content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")

TEXTS = ["USER: What is in the picture?\nASSISTANT: A red square and a blue circle.",
         "The answer is ## B ## because the circle is blue. Review your previous answer.",
         "How many shapes are there? A. two B. three C. four"] * 20
CONV = [{"role": "user", "content": "What is in the picture?\nA. a square\nB. a circle"},
        {"role": "assistant", "content": "A red square. ## A ##"},
        {"role": "user", "content": "Review your previous answer."},
        {"role": "assistant", "content": "The circle is blue. ## B ##"}]
N_IMG = 16  # (28 // 7) ** 2 + 1 CLS - 1 dropped by the "default" strategy


def _save(tk, d, config):
    os.makedirs(d, exist_ok=True)
    tk.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(d)


def build_bytelevel(d, template=LLAVA_TEMPLATE):
    """A tiny byte-level BPE like research §5.7: <unk> <s> </s>, then <image>, <pad> added."""
    tk = Backend(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_special_tokens([AddedToken("<image>", special=True, normalized=False),
                           AddedToken("<pad>", special=True, normalized=False)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    eos = {"__type": "AddedToken", "content": "</s>", "lstrip": False, "rstrip": False, "normalized": False,
           "single_word": False, "special": True}  # the dict form old configs use for roles
    return _save(tk, d, {"bos_token": "<s>", "eos_token": eos, "unk_token": "<unk>", "pad_token": "<pad>",
                         "add_bos_token": True, "chat_template": template, "padding_side": "left"})


def build_llama(d, legacy):
    """An old-style Llama SentencePiece-BPE tokenizer.json: Prepend("▁") normalizer, byte fallback."""
    tk = Backend(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tk.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    tk.pre_tokenizer = None  # trained per word, saved the way Llama-2's tokenizer.json is
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([AddedToken("<image>", special=True, normalized=False),
                           AddedToken("<pad>", special=True, normalized=False)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return _save(tk, d, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                         "add_bos_token": True, "legacy": legacy, "tokenizer_class": "LlamaTokenizer",
                         "chat_template": LLAVA_TEMPLATE})


def build_chatml(d):
    """A Qwen-like byte-level tokenizer: no BOS, <|im_end|> ends a turn (llava-interleave-qwen)."""
    tk = Backend(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    return _save(tk, d, {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                         "chat_template": CHATML_TEMPLATE})


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"bytelevel": build_bytelevel(root / "bl"), "llama0": build_llama(root / "ll0", False),
            "llama1": build_llama(root / "ll1", True), "chatml": build_chatml(root / "cm")}


def hf_ids(d, conv, template):
    """transformers' ids: apply_chat_template, then LlavaProcessor expands <image> and tokenizes."""
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    ip = transformers.CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    proc = transformers.LlavaProcessor(image_processor=ip, tokenizer=hf_tok, patch_size=7,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       chat_template=template)
    msgs = [{"role": m["role"], "content": ([{"type": "image"}] if i == 0 else [])
             + [{"type": "text", "text": m["content"]}]} for i, m in enumerate(conv)]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    return proc(text=prompt, images=Image.new("RGB", (40, 30)))["input_ids"][0]


def runs(ids, mask):
    """The contiguous masked spans, as id lists."""
    out, cur = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(i)
        elif cur:
            out, cur = out + [cur], []
    return out


@pytest.mark.parametrize("name", ["bytelevel", "llama0", "llama1"])
def test_generation_prompt_matches_transformers(dirs, name):
    tok = Tokenizer.from_dir(dirs[name])
    ids, mask = render_chat(tok, CONV[:1], N_IMG, add_generation_prompt=True)
    assert ids == list(hf_ids(dirs[name], CONV[:1], LLAVA_TEMPLATE))
    assert ids[0] == tok.bos_token_id and sum(mask) == 0


@pytest.mark.parametrize("name", ["bytelevel", "llama0", "llama1"])
def test_turn2_prompt_matches_transformers_with_eos_closing(dirs, name):
    tok = Tokenizer.from_dir(dirs[name])
    ids, _ = render_chat(tok, CONV[:3], N_IMG, add_generation_prompt=True)
    assert ids == list(hf_ids(dirs[name], CONV[:3], LLAVA_EOS_TEMPLATE))
    # The deliberate difference from HF's own template: </s> where HF writes a space.
    assert ids != list(hf_ids(dirs[name], CONV[:3], LLAVA_TEMPLATE))


def test_legacy_flag_changes_ids_like_transformers(dirs):
    # Plain tokenizers would add a "▁" after <image>; transformers (legacy=False) does not, nor do we.
    raw = Backend.from_file(os.path.join(dirs["llama0"], "tokenizer.json"))
    text = "USER: <image>\nWhat is in the picture?"
    assert Tokenizer.from_dir(dirs["llama0"]).encode(text) != raw.encode(text, add_special_tokens=False).ids
    assert Tokenizer.from_dir(dirs["llama1"]).encode(text) == raw.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("name", ["bytelevel", "llama0", "chatml"])
def test_mask_covers_exactly_the_answers(dirs, name):
    tok = Tokenizer.from_dir(dirs[name])
    ids, mask = render_chat(tok, CONV, N_IMG)
    spans = runs(ids, mask)
    assert len(spans) == 2 and len(ids) == len(mask)
    for span, answer in zip(spans, [CONV[1]["content"], CONV[3]["content"]]):
        assert span[-1] == tok.eos_token_id
        assert tok.decode(span[:-1]).strip() == answer
    # Everything else, prompts and image included, is untrained.
    assert sum(mask) == sum(len(s) for s in spans)
    only2 = render_chat(tok, CONV, N_IMG, train_turns=[1])
    assert only2[0] == ids and runs(*only2) == spans[1:]
    assert runs(*render_chat(tok, CONV, N_IMG, train_turns=[0])) == spans[:1]
    assert sum(render_chat(tok, CONV, N_IMG, train_turns=[])[1]) == 0


def test_mask_matches_transformers_assistant_mask(dirs):
    hf_tok = transformers.AutoTokenizer.from_pretrained(dirs["bytelevel"])
    msgs = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in CONV]
    out = hf_tok.apply_chat_template(msgs, chat_template=LLAVA_EOS_TEMPLATE, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    ids, mask = render_chat(Tokenizer.from_dir(dirs["bytelevel"]), CONV, 0)
    hf = list(out["input_ids"])
    if hf[0] != ids[0]:  # apply_chat_template may not add BOS by itself; the processor path does
        hf, hf_mask = [ids[0]] + hf, [0] + list(out["assistant_masks"])
    else:
        hf_mask = list(out["assistant_masks"])
    assert ids == hf
    # One deliberate difference: the space between "ASSISTANT:" and the answer is the model's to
    # generate, so when it is a token of its own (this tiny vocab splits " The" as " " + "The") we
    # train it; HF's {% generation %} span starts after it.
    diff = [i for i in range(len(ids)) if mask[i] != hf_mask[i]]
    assert all(mask[i] == 1 and tok_decode_is_space(dirs, ids[i]) and hf_mask[i + 1] for i in diff)
    assert len(diff) == 1


def tok_decode_is_space(dirs, i):
    return Tokenizer.from_dir(dirs["bytelevel"]).decode([i]) == " "


def test_image_expands_to_num_image_tokens(dirs):
    tok = Tokenizer.from_dir(dirs["bytelevel"])
    for n in (1, 5, 576):
        ids, mask = render_chat(tok, CONV[:1], n, add_generation_prompt=True)
        pos = [i for i, t in enumerate(ids) if t == tok.image_token_id]
        assert len(pos) == n and pos == list(range(pos[0], pos[0] + n))
        assert all(mask[p] == 0 for p in pos)
    assert tok.image_token_id not in render_chat(tok, CONV[:1], 0)[0]  # text-only


def test_chatml_prompt_and_roles(dirs):
    tok = Tokenizer.from_dir(dirs["chatml"])
    assert tok.chat_format == "chatml" and tok.bos_token_id is None and not tok.add_bos_token
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ids, _ = render_chat(tok, CONV[:1], N_IMG, add_generation_prompt=True)
    assert ids == list(hf_ids(dirs["chatml"], CONV[:1], CHATML_TEMPLATE))
    assert tok.decode(render_chat(tok, CONV[:2], 1)[0], skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n" + CONV[1]["content"] + "<|im_end|>\n")


def test_roles_from_config(dirs):
    tok = Tokenizer.from_dir(dirs["bytelevel"])
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.image_token_id) == (1, 2, 301, 300)
    assert tok.vocab_size == 302 and tok.image_token == "<image>" and tok.chat_format == "llava"
    assert tok.decode(tok.encode("the circle is blue")) == "the circle is blue"
    assert tok.decode([1, 300, 2]) == ""  # special tokens skipped


def test_generated_text_with_a_leading_space_renders_the_same(dirs):
    tok = Tokenizer.from_dir(dirs["bytelevel"])
    spaced = [CONV[0], {"role": "assistant", "content": " " + CONV[1]["content"] + "\n"}]
    assert render_chat(tok, spaced, 4) == render_chat(tok, CONV[:2], 4)


def test_bad_conversations_are_clear_errors(dirs):
    tok = Tokenizer.from_dir(dirs["bytelevel"])
    with pytest.raises(ValueError, match="alternate"):
        render_chat(tok, [CONV[0], CONV[0]], 4)
    with pytest.raises(ValueError, match="<image>"):
        render_chat(tok, [{"role": "user", "content": "<image>\nhi"}], 4)
    with pytest.raises(ValueError, match="train_turns"):
        render_chat(tok, CONV, 4, train_turns=[2])
    with pytest.raises(ValueError, match="generation prompt|add_generation_prompt"):
        render_chat(tok, CONV[:2], 4, add_generation_prompt=True)


def test_pad_left():
    ids, att = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and att.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == att.dtype == __import__("torch").long
