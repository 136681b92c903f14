"""Text <-> token ids, and the chat a VLM is trained and prompted with (`render_chat`: ids and loss mask).

Footgun, on purpose: HF's llava-1.5 template closes an assistant turn with a space; we close it with
`</s>`, as the original LLaVA training format does, because a model must learn the token that ends its
answer. The conversation is encoded as ONE string (piece by piece, each would get Llama's "▁" prefix
anew); a token belongs to the turn its first character falls in.
"""
import json
import os

import torch
from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, pre_tokenizers

IMAGE_TOKEN = "<image>"


def _content(tok):
    """Roles in tokenizer_config.json are a string, an AddedToken dict {"content": ...}, or null."""
    return tok.get("content") if isinstance(tok, dict) else tok


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the roles (bos/eos/pad/image) and the chat format."""

    def __init__(self, backend, bos_token=None, eos_token=None, pad_token=None, image_token=IMAGE_TOKEN,
                 chat_format="llava", add_bos_token=None):
        self.backend, self.chat_format = backend, chat_format  # "llava" | "chatml"
        # ChatML turns end with <|im_end|>; generation must stop there whatever a base model's eos was.
        if chat_format == "chatml" and backend.token_to_id("<|im_end|>") is not None:
            eos_token = "<|im_end|>"
        self.bos_token, self.eos_token, self.image_token = bos_token, eos_token, image_token
        self.pad_token = pad_token if pad_token is not None else eos_token  # left padding is masked anyway
        self.bos_token_id, self.eos_token_id, self.pad_token_id, self.image_token_id = (
            None if t is None else backend.token_to_id(t) for t in (bos_token, eos_token, self.pad_token, image_token))
        if add_bos_token is None:  # unspecified: do what tokenizer.json's post-processor does (Llama: yes, Qwen: no)
            add_bos_token = backend.encode("a", add_special_tokens=True).ids[:1] == [self.bos_token_id]
        self.add_bos_token = bool(add_bos_token) and self.bos_token_id is not None

    @classmethod
    def from_dir(cls, path):
        """Read tokenizer.json, tokenizer_config.json and the chat template from a model folder."""
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise FileNotFoundError(f"{tj}: no tokenizer.json in {path}")
        backend = _Backend.from_file(tj)
        cp = os.path.join(path, "tokenizer_config.json")
        cfg = _read_json(cp) if os.path.isfile(cp) else {}
        _match_transformers_llama(backend, cfg, _read_json(tj))
        chat_format = "chatml" if "<|im_start|>" in _chat_template(path, cfg) else "llava"
        roles = {name: _content(cfg.get(name)) for name in ("bos_token", "eos_token", "pad_token")}
        return cls(backend, **roles, image_token=_content(cfg.get("image_token")) or IMAGE_TOKEN,
                   chat_format=chat_format, add_bos_token=cfg.get("add_bos_token"))

    @property
    def vocab_size(self):
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        """Ids of `text`, no BOS/EOS added; special tokens written in the text ("</s>") are recognised."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True):
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _chat_template(path, cfg):
    """All template text this folder holds, as one string: we only look for ChatML markers, never run it."""
    parts = [cfg.get("chat_template")]
    for name in ("chat_template.json", "chat_template.jinja"):
        if os.path.isfile(os.path.join(path, name)):
            with open(os.path.join(path, name), encoding="utf-8") as f:
                parts.append(json.load(f).get("chat_template") if name.endswith(".json") else f.read())
    # A template may also be a list of named templates; json.dumps covers every shape.
    return "".join(p if isinstance(p, str) else json.dumps(p) for p in parts if p)


def _match_transformers_llama(backend, cfg, tj):
    """Footgun: old Llama SentencePiece `tokenizer.json` files prepend "▁" to every text chunk, while
    transformers' LlamaTokenizer rebuilds the pre-tokenizer from `legacy` ("▁" only at the very start).
    We do the same, so our ids are the checkpoint's; ByteLevel files (Llama 3) are left alone."""
    llama = (cfg.get("tokenizer_class") or "").removesuffix("Fast") == "LlamaTokenizer"
    if not llama or "ByteLevel" in json.dumps([tj.get("pre_tokenizer"), tj.get("decoder")]):
        return
    prefix = cfg.get("add_prefix_space") in (None, True)  # unset means True
    scheme = ("first" if not cfg.get("legacy", False) else "always") if prefix else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))


# ----------------------------------------------------------------------------- chat rendering

# The two formats as Jinja templates, for transformers' apply_chat_template (tests/test_export.py). No "<s>"
# in them: the tokenizer adds it, as in llava-hf's llava-1.5; a template that wrote it would get two.
_CONTENT = (
    "{% if message['content'] is string %}{% set texts = [message['content']] %}{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% set texts = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | list %}"
    "{% endif %}{% set text = texts | join(' ') %}"
    "{% if message['role'] == 'assistant' %}{% set text = text | trim %}{% endif %}")
CHAT_TEMPLATES = {
    # USER: <image>\n{u1} ASSISTANT: {a1}</s>USER: {u2} ASSISTANT:
    "llava": "{% for message in messages %}{% if message['role'] != 'system' %}"
             "{{ message['role'].upper() + ': ' }}" + _CONTENT +
             "{% if message['role'] == 'assistant' %}{{ text + eos_token }}"
             "{% elif loop.last and not add_generation_prompt %}{{ text }}{% else %}{{ text + ' ' }}{% endif %}"
             "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}",
    # <|im_start|>user\n<image>\n{u1}<|im_end|>\n<|im_start|>assistant\n{a1}<|im_end|>\n...
    "chatml": "{% for message in messages %}{% if message['role'] != 'system' %}"
              "{{ '<|im_start|>' + message['role'] + '\n' }}" + _CONTENT + "{{ text + '<|im_end|>\n' }}"
              "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
}


def _render_text(tok, messages, with_image, add_generation_prompt):
    """The conversation as one string, plus the character span of each assistant answer and its EOS."""
    if add_generation_prompt and messages[-1].get("role") != "user":
        raise ValueError("add_generation_prompt needs the conversation to end with a user message")
    image = tok.image_token + "\n" if with_image else ""
    llava = tok.chat_format == "llava"
    user, user_end, header = ("USER: ", "", " ASSISTANT:") if llava else (
        "<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n")
    text, spans = "", []
    for i, m in enumerate(messages):
        if m.get("role") != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError(f"message {i}: roles must alternate user/assistant from user, got {m.get('role')!r}")
        if tok.image_token in m["content"]:
            raise ValueError(f"message {i}: {tok.image_token} in the text; the image is added by render_chat")
        if m["role"] == "user":
            text += user + (image if i == 0 else "") + m["content"] + user_end + header
        else:
            # Stripped: a decoded generation starts with a space in byte-level vocabularies, and the
            # same answer must render to the same ids whether it was typed or generated.
            start = len(text)
            text += (" " if llava else "") + m["content"].strip() + tok.eos_token
            spans.append((start, len(text)))
            text += "" if llava else "\n"
    if not add_generation_prompt and messages[-1]["role"] == "user":
        text = text[:-len(header)]  # no generation prompt: drop the open assistant header
    return text, spans


def render_chat(tok, messages, num_image_tokens, add_generation_prompt=False, train_turns=None):
    """Ids and loss mask of a conversation; the image becomes num_image_tokens ids in the first user message.
    train_turns: indices among the assistant messages whose answers are trained (None = all)."""
    if tok.eos_token_id is None:
        raise ValueError("tokenizer has no eos token; render_chat needs one to close assistant turns")
    if num_image_tokens and tok.image_token_id is None:
        raise ValueError(f"tokenizer has no {tok.image_token} token; cannot place the image")
    text, spans = _render_text(tok, messages, num_image_tokens > 0, add_generation_prompt)
    train = range(len(spans)) if train_turns is None else list(train_turns)
    if not all(0 <= t < len(spans) for t in train):
        raise ValueError(f"train_turns: {list(train)} are not all assistant turns (there are {len(spans)})")
    trained = [spans[t] for t in train]
    enc = tok.backend.encode(text, add_special_tokens=False)
    ids, mask = ([tok.bos_token_id], [0]) if tok.add_bos_token else ([], [])
    for i, (start, _end) in zip(enc.ids, enc.offsets):
        n = num_image_tokens if i == tok.image_token_id else 1  # the image: (P,) one id per image feature
        ids += [i] * n
        mask += [int(any(a <= start < b for a, b in trained))] * n  # never the image: it is in a user turn
    return ids, mask


def pad_left(seqs, pad_id):
    """Id lists -> input_ids (B, T) and attention_mask (B, T), left-padded: every row ends at column -1."""
    width = max((len(s) for s in seqs), default=0)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for b, s in enumerate(seqs):
        input_ids[b, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
        attention_mask[b, width - len(s):] = 1
    return input_ids, attention_mask
