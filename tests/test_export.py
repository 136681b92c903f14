"""A model folder we write is one transformers uses as it is (scl/weights.py save_processor):
AutoProcessor + apply_chat_template + LlavaForConditionalGeneration.generate give our input ids
(render_chat), our pixel values (ImageProcessor) and our greedy tokens (scl.generation.generate).

Two folders: the built-in base model's kind, made the way train.py's SFT stage makes it (BPE tokenizer
from scl/vocab.py, CLIP + Llama "micro" preset, LLaVA chat format), and a SigLIP + Qwen2 one with a
ChatML tokenizer (llava-interleave-qwen's kind). Random weights at unit scale, so the logits are O(1)
and greedy decoding has clear winners. Ids and tokens are compared exactly, pixels within 1e-5.

Run: python -m pytest -q tests/test_export.py
"""
import numpy as np
import pytest
import torch
from PIL import Image

import hf_fixtures as hx
from scl import vocab
from scl.base import base_config, write_preprocessor_config
from scl.config import VLMConfig
from scl.files import write_json
from scl.generation import generate
from scl.image import ImageProcessor
from scl.prompts import review_message, turn1_message
from scl.tokenizer import CHAT_TEMPLATES, Tokenizer, render_chat
from scl.vlm import VLM
from scl.weights import load_vlm, save_processor, save_vlm

transformers = pytest.importorskip("transformers")

QUESTION = turn1_message("How many red shapes are there?", ["1", "2", "3", "4"])
ANSWER = "I see a red square and a red circle. That makes 2. ## B ##"
REVIEW = review_message("cp")
NEW_TOKENS = 8


def build_llava(path):
    """As the SFT stage: tokenizer trained on the task's text (protocol sentences as whole tokens), the
    micro CLIP + Llama model, the CLIP image recipe, then save_vlm and save_processor."""
    texts = [QUESTION, ANSWER, REVIEW, "The top-left cell holds a blue triangle. ## A ##"] * 5
    vocab.train_tokenizer(texts, path, whole_tokens=vocab.protocol_sentences())
    config = base_config("micro", Tokenizer.from_dir(path))
    write_preprocessor_config(path, config.vision_config.image_size)
    return finish(path, config)


def build_chatml(path):
    """A Qwen-like byte-level tokenizer (no BOS, <|im_end|> ends a turn) and a SigLIP + Qwen2 model."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([QUESTION, ANSWER, REVIEW] * 5, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    backend.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    write_json(path / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "padding_side": "left", "chat_template": CHAT_TEMPLATES["chatml"]})
    tok = Tokenizer.from_dir(path)
    config = VLMConfig.from_dict({
        "model_type": "llava", "image_token_index": tok.image_token_id, "pad_token_id": tok.pad_token_id,
        "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
        "vision_config": {"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 8,
                          "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2},
        "text_config": {"model_type": "qwen2", "vocab_size": tok.vocab_size, "hidden_size": 48,
                        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "tie_word_embeddings": True, "bos_token_id": None,
                        "eos_token_id": tok.eos_token_id, "rope_parameters": {"rope_theta": 1e6}}})
    write_json(path / "preprocessor_config.json", {  # SiglipImageProcessor: square resize, mean/std 0.5
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    return finish(path, config)


def finish(path, config):
    torch.manual_seed(0)
    save_vlm(hx.randomize_(VLM(config), seed=1).eval(), path)
    save_processor(path, config)
    return str(path)


@pytest.fixture(scope="module", params=["llava", "chatml"])
def folder(request, tmp_path_factory):
    """(path, our model, tokenizer, image processor, transformers' processor, a scene at the tower's size).

    The scene is already image_size pixels square, so resize and crop are identities whichever image
    backend transformers picks (PIL here; torchvision where installed): the pixels then differ only by
    rescale and normalize. Resampling parity is tests/test_image.py's."""
    build = {"llava": build_llava, "chatml": build_chatml}[request.param]
    path = build(tmp_path_factory.mktemp(request.param))
    hx._quiet_transformers()
    model = load_vlm(path)
    side = model.config.vision_config.image_size
    scene = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    return (path, model, Tokenizer.from_dir(path), ImageProcessor.from_dir(path),
            transformers.AutoProcessor.from_pretrained(path), scene)


def hf_messages(conversation, scene):
    """Our conversation ({"role", "content": str}) in the processor's form, the image in the first turn."""
    return [{"role": m["role"], "content": ([{"type": "image", "image": scene}] if i == 0 else [])
             + [{"type": "text", "text": m["content"]}]} for i, m in enumerate(conversation)]


def test_folder_holds_what_llava_hf_folders_hold(folder):
    path, model, tok, proc, hf_proc, scene = folder
    assert type(hf_proc).__name__ == "LlavaProcessor"
    assert hf_proc.patch_size == model.config.vision_config.patch_size
    # the processor expands one <image> to exactly our number of image features
    out = hf_proc(images=scene, text=tok.image_token)
    assert out["input_ids"][0].count(tok.image_token_id) == model.config.num_image_tokens
    assert hf_proc.chat_template == CHAT_TEMPLATES[tok.chat_format]


def test_apply_chat_template_gives_our_ids_and_pixels(folder):
    path, model, tok, proc, hf_proc, scene = folder
    ids, _ = render_chat(tok, [{"role": "user", "content": QUESTION}], model.config.num_image_tokens,
                         add_generation_prompt=True)
    messages = hf_messages([{"role": "user", "content": QUESTION}], scene)
    inputs = hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ids
    assert (ids[0] == tok.bos_token_id) == (tok.bos_token_id is not None)  # one BOS for Llama, none for Qwen
    text = hf_proc.apply_chat_template(messages, add_generation_prompt=True)
    assert hf_proc(images=scene, text=text)["input_ids"][0] == ids  # the two-step form too
    assert (inputs["pixel_values"] - proc([scene])).abs().max() <= 1e-5


TURN2 = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": " " + ANSWER},
         {"role": "user", "content": REVIEW}]


@pytest.mark.parametrize("turns, add_generation_prompt", [(3, True), (2, False), (1, False)])
def test_self_correction_conversation_gives_our_ids(folder, turns, add_generation_prompt):
    """Turn 2's prompt (turn 1's answer, closed by the end-of-turn token, then the review); a
    conversation ending in an answer, as training renders it; an open user turn without the prompt.
    The answer has the leading space a decoded generation has: both sides strip it."""
    path, model, tok, proc, hf_proc, scene = folder
    conversation = TURN2[:turns]
    ids, _ = render_chat(tok, conversation, model.config.num_image_tokens, add_generation_prompt=add_generation_prompt)
    inputs = hf_proc.apply_chat_template(hf_messages(conversation, scene), add_generation_prompt=add_generation_prompt,
                                         tokenize=True, return_dict=True)
    assert inputs["input_ids"][0] == ids


def test_generate_gives_our_greedy_tokens(folder):
    path, model, tok, proc, hf_proc, scene = folder
    inputs = hf_proc.apply_chat_template(hf_messages([{"role": "user", "content": QUESTION}], scene),
                                         add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(path)
    with torch.no_grad():
        hf_out = hf.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    ours = generate(model, inputs["input_ids"], inputs["attention_mask"], proc([scene]), max_new_tokens=NEW_TOKENS,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    # Each greedy choice must be clear, or an ulp of difference between machines could flip it.
    full = torch.cat([inputs["input_ids"], ours], dim=1)
    with torch.no_grad():
        logits = model(full, pixel_values=proc([scene]))[0, inputs["input_ids"].shape[1] - 1:-1]  # (T_new, V)
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
    assert hf_out[0, inputs["input_ids"].shape[1]:].tolist() == ours[0].tolist()
