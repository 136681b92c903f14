"""A loadable model folder with random weights in a real model's exact shapes, without any download.

    python bench/make_checkpoint.py --config=bench/configs/llava-interleave-qwen-0.5b-hf --out=DIR
    python bench/make_checkpoint.py --config=bench/configs/llava-1.5-7b-hf --out=DIR --layers=1   # quick tests

`--config` is a folder holding a published config.json and preprocessor_config.json (bench/configs/
has llava-1.5-7b-hf and llava-interleave-qwen-0.5b-hf). The folder written to `--out` is what the
Hub repo would hold, with random numbers in place of the trained ones:

- model-*.safetensors + model.safetensors.index.json in the Hub key layout, written one shard at a
  time, so a 7B model never needs more than one shard in memory;
- config.json: the published file, with only the depth changed when --layers truncates it (and the
  widths with --width, for tests that need the vocabulary and image-token count but not the size);
- tokenizer.json + tokenizer_config.json: a small byte-fallback BPE learned from the protocol's own
  prompts, padded with unreachable filler tokens so that the vocabulary has the real size and every
  special token sits at the real model's id (llava-1.5: <image> 32000, <pad> 32001; the Qwen one:
  <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645, <image> 151646). So the chat format,
  the image-token expansion and the stop at end-of-turn work as with the real tokenizer; the text
  ids of ordinary words differ from the real ones;
- preprocessor_config.json (copied), processor_config.json and chat_template.jinja (save_processor).

Random weights: N(0, 0.02) matrices, unit norms, zero biases (transformers' own init), except the
token embeddings and the output head, N(0, 1): greedy decoding then has clear winners, as a trained
model's does, instead of near-ties that flip with the last bit of a bf16 sum.
"""
import json
import os
import shutil
import sys
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from scl.cli import parse_cli, to_json  # noqa: E402
from scl.config import VLMConfig  # noqa: E402
from scl.files import write_json  # noqa: E402
from scl.prompts import FORMAT, REVIEW_PROMPTS, turn1_message  # noqa: E402
from scl.tokenizer import CHAT_TEMPLATES  # noqa: E402
from scl.vlm import VLM  # noqa: E402
from scl.weights import hub_name, save_processor  # noqa: E402


@dataclass
class CheckpointConfig:
    """python bench/make_checkpoint.py --config=DIR --out=DIR [--dtype=bfloat16] [--layers=N]"""
    config: str = ""  # folder with the published config.json and preprocessor_config.json
    out: str = ""  # the model folder to write
    dtype: str = "bfloat16"  # weights on disk: bfloat16 | float16 | float32 (the Hub files are 16-bit)
    layers: int = 0  # keep only this many vision and decoder layers (0 = all: the real depth)
    width: int = 0  # tests only: every hidden width set to this (0 = the real widths); vocab and image size stay
    seed: int = 0
    shard_gb: float = 2.0  # largest shard file, GB


# -----------------------------------------------------------------------------
# config.json: the published file, optionally shallower (and narrower)

def derived_config(published: dict, layers: int, width: int, dtype: str) -> dict:
    d = json.loads(json.dumps(published))  # a deep copy
    text, vision = d.setdefault("text_config", {}), d.setdefault("vision_config", {})
    full = VLMConfig.from_dict(published)  # the real depths, defaults filled in
    if layers:
        text["num_hidden_layers"] = min(layers, full.text_config.num_hidden_layers)
        vision["num_hidden_layers"] = min(layers, full.vision_config.num_hidden_layers)
    if width:  # 4 heads of width/4 everywhere, MLPs twice as wide
        for sub in (text, vision):
            sub.update(hidden_size=width, intermediate_size=2 * width, num_attention_heads=4)
        text["num_key_value_heads"] = 4
    d["torch_dtype"] = dtype
    return d


# -----------------------------------------------------------------------------
# The tokenizer: real size, real special ids, a small learned vocabulary in between

def protocol_text() -> list[str]:
    """What the models are prompted with and answer: the BPE merges are learned from these."""
    options = ["red", "green", "blue", "yellow"]
    texts = [turn1_message(f"How many {c} shapes are in the image?", options) for c in options]
    texts += [REVIEW_PROMPTS[name] for name in REVIEW_PROMPTS] + [FORMAT]
    texts += [f"The answer is {c}, so ## {x} ##." for c, x in zip(options, "ABCD")]
    return texts


def build_tokenizer(chat_format: str, vocab_size: int, out: str) -> None:
    """tokenizer.json + tokenizer_config.json whose special tokens have the real model's ids.

    llava (Llama/SentencePiece-like): <unk> 0, <s> 1, </s> 2, byte tokens <0x00>..<0xFF> 3-258,
    learned pieces, fillers up to 32000, then <image> 32000 and <pad> 32001.
    chatml (Qwen/byte-level): the 256 byte symbols, learned pieces, fillers up to 151643, then
    <|endoftext|>, <|im_start|>, <|im_end|>, <image> at 151643-151646.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if chat_format == "llava":
        base, added = vocab_size, ["<image>", "<pad>"]
        bytes_ = [f"<0x{b:02X}>" for b in range(256)]
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
        alphabet = [chr(c) for c in range(33, 127)] + ["▁"]
        trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<unk>", "<s>", "</s>"] + bytes_,
                                      initial_alphabet=alphabet, show_progress=False)
    else:
        base, added = vocab_size, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    tok.train_from_iterator(protocol_text() * 4, trainer)
    # Fillers: plain vocabulary entries no merge produces, so the ids of the specials land where the
    # real models have them (and generated filler ids still decode to text).
    spec = json.loads(tok.to_str())
    # The byte tokens were trainer "special tokens" only to pin their ids; as added tokens they would
    # match "<0x41>" typed in a text and vanish from skip_special_tokens decodes. Plain vocabulary, as in Llama.
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
    vocab = spec["model"]["vocab"]
    for k in range(len(vocab), base):
        vocab[f"filler{k}"] = k
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    if chat_format == "llava":  # "<s>" before every text, from the tokenizer, as llava-hf's does
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    tok.save(os.path.join(out, "tokenizer.json"))
    roles = ({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
              "add_bos_token": True} if chat_format == "llava" else
             {"bos_token": None, "eos_token": "<|im_end|>", "unk_token": None, "pad_token": "<|endoftext|>",
              "add_bos_token": False})
    write_json(os.path.join(out, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", **roles, "image_token": "<image>", "add_eos_token": False,
        "padding_side": "left", "clean_up_tokenization_spaces": False, "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATES[chat_format]})


# -----------------------------------------------------------------------------
# Weights, one shard at a time

def init_tensor(name: str, shape, dtype, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if "norm" in name or "layrnorm" in name:
        return torch.ones(shape, dtype=dtype)
    std = 1.0 if ("embed_tokens" in name or "lm_head" in name) else 0.02
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def plan_shards(shapes: dict, itemsize: int, shard_bytes: float) -> list[list[str]]:
    """Names in model order, cut into consecutive groups of at most shard_bytes (one tensor may exceed it)."""
    shards, size = [[]], 0
    for name, shape in shapes.items():
        n = itemsize * torch.Size(shape).numel()
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_weights(config: VLMConfig, out: str, dtype: torch.dtype, seed: int, shard_gb: float) -> int:
    with torch.device("meta"):  # names and shapes only; nothing is allocated
        shapes = {k: tuple(v.shape) for k, v in VLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    shards = plan_shards(shapes, dtype.itemsize, shard_gb * 1e9)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {hub_name(n): init_tensor(n, shapes[n], dtype, gen) for n in names}
        save_file(tensors, os.path.join(out, file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: file for k in tensors})
        del tensors  # one shard in memory at a time
        print(f"  {file}: {len(names)} tensors", flush=True)
    write_json(os.path.join(out, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": weight_map})
    return sum(torch.Size(s).numel() for s in shapes.values())


def make_checkpoint(cfg: CheckpointConfig) -> str:
    if not (cfg.config and cfg.out):
        raise ValueError("need --config=DIR (with config.json) and --out=DIR")
    with open(os.path.join(cfg.config, "config.json")) as f:
        published = json.load(f)
    d = derived_config(published, cfg.layers, cfg.width, cfg.dtype)
    config = VLMConfig.from_dict(d, source=os.path.join(cfg.config, "config.json"))
    dtype = getattr(torch, cfg.dtype)
    tmp = cfg.out.rstrip("/") + ".tmp"  # the folder appears under its name only when complete
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    n = write_weights(config, tmp, dtype, cfg.seed, cfg.shard_gb)
    write_json(os.path.join(tmp, "config.json"), d)
    text = config.text_config
    gen = {"bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id, "pad_token_id": config.pad_token_id}
    write_json(os.path.join(tmp, "generation_config.json"), {k: v for k, v in gen.items() if v is not None})
    chat_format = "chatml" if text.model_type == "qwen2" else "llava"
    # The added tokens end with <image> (4 of them in Qwen's list, <image> first in Llava's), so the
    # learned vocabulary stops right below the first: 151643 and 32000.
    build_tokenizer(chat_format, config.image_token_index - (3 if chat_format == "chatml" else 0), tmp)
    shutil.copyfile(os.path.join(cfg.config, "preprocessor_config.json"), os.path.join(tmp, "preprocessor_config.json"))
    save_processor(tmp, config)
    shutil.rmtree(cfg.out, ignore_errors=True)
    os.replace(tmp, cfg.out)
    print(f"{n / 1e6:.1f}M parameters ({cfg.dtype}), {config.num_image_tokens} image tokens -> {cfg.out}")
    return cfg.out


if __name__ == "__main__":
    c = parse_cli(CheckpointConfig)
    print(to_json(c))
    try:
        make_checkpoint(c)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
