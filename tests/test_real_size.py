"""bench/make_checkpoint.py: random-weight folders of the two real LLaVA models load, prompt and generate.

Each folder is built by the script itself (a subprocess, as a user runs it) with one layer per tower. By
default the widths are narrowed to 64 (--width=64), which keeps what the test is about — vocabulary size,
special-token ids, image-token count, key names — and takes seconds; `-m slow` builds the real widths.
transformers is the reference: it must load the same folder with no missing or unexpected key, and
its processor must render our prompt ids.

Run: python -m pytest -q tests/test_real_size.py        (add -m slow for the full widths)
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from scl.config import VLMConfig
from scl.generation import generate
from scl.tokenizer import pad_left, render_chat
from scl.weights import load_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "bench", "configs")
# name -> (image tokens, config vocab, {special token: the real model's id})
MODELS = {
    "llava-1.5-7b-hf": (576, 32064, {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001}),
    "llava-interleave-qwen-0.5b-hf": (729, 152000, {"<|endoftext|>": 151643, "<|im_start|>": 151644,
                                                    "<|im_end|>": 151645, "<image>": 151646}),
}
PROMPT = "How many red shapes are there?\nA. 1\nB. 2\nC. 3\nD. 4"


def build(out, name, *flags) -> str:
    cmd = [sys.executable, os.path.join(ROOT, "bench", "make_checkpoint.py"), f"--config={os.path.join(CONFIGS, name)}",
           f"--out={out}", "--layers=1", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(out)


@pytest.fixture(scope="module", params=list(MODELS))
def narrow(request, tmp_path_factory):
    """name, folder: one layer per tower, widths 64, tiny shards (so the index path is the one taken)."""
    name = request.param
    return name, build(tmp_path_factory.mktemp(name) / "model", name, "--width=64", "--shard_gb=0.004")


def check_folder(name, path, dtype):
    """Our loader, tokenizer, prompt and generation, then transformers' loader and processor, on one folder."""
    n_image, vocab, specials = MODELS[name]
    model, tok, proc = load_model_dir(path, dtype=dtype)  # strict: every key used, every parameter filled
    assert model.config.num_image_tokens == n_image
    assert model.config.text_config.vocab_size == vocab == model.lm_head_weight.shape[0]
    assert {t: tok.backend.token_to_id(t) for t in specials} == specials
    assert tok.image_token_id == model.config.image_token_index == specials["<image>"]
    assert tok.vocab_size <= vocab

    ids, _ = render_chat(tok, [{"role": "user", "content": PROMPT}], n_image, add_generation_prompt=True)
    assert ids.count(tok.image_token_id) == n_image
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.rstrip().endswith("ASSISTANT:" if tok.chat_format == "llava" else "<|im_start|>assistant")
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    pixel_values = proc([image]).to(dtype)  # (1, 3, S, S)
    assert pixel_values.shape[-1] == model.config.vision_config.image_size
    input_ids, mask = pad_left([ids, ids[:1] + ids[2:]], tok.pad_token_id)  # two rows, one left-padded
    out = generate(model, input_ids, mask, pixel_values.repeat(2, 1, 1, 1), max_new_tokens=4,
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 2 and 1 <= out.shape[1] <= 4
    assert int(out.max()) < vocab and isinstance(tok.decode(out[0].tolist()), str)

    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True,
                                                                          dtype=dtype)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    processor = transformers.AutoProcessor.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    hf_in = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          images=[image], return_tensors="pt")
    assert hf_in["input_ids"][0].tolist() == ids  # the same chat format and image-token expansion
    return model, hf, hf_in


def test_narrow_folder_loads_prompts_generates_and_matches_transformers(narrow):
    name, path = narrow
    files = os.listdir(path)
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards  # written shard by shard
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
              "processor_config.json", "chat_template.jinja", "generation_config.json"):
        assert f in files, f
    model, hf, hf_in = check_folder(name, path, torch.float32)
    # Same weights, same numbers: the logits of transformers' model on its own processed inputs.
    with torch.no_grad():
        want = hf(**hf_in).logits[0, -1]
        got = model(hf_in["input_ids"], hf_in["pixel_values"])[0, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_published_config_is_kept_except_depth_width_and_dtype():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from make_checkpoint import derived_config

    for name, (n_image, vocab, _) in MODELS.items():
        published = json.load(open(os.path.join(CONFIGS, name, "config.json")))
        same = derived_config(published, layers=0, width=0, dtype=published["torch_dtype"])
        assert same == published
        full = VLMConfig.from_dict(published)
        assert (full.num_image_tokens, full.text_config.vocab_size) == (n_image, vocab)
        short = VLMConfig.from_dict(derived_config(published, layers=1, width=0, dtype="bfloat16"))
        assert short.text_config.num_hidden_layers == short.vision_config.num_hidden_layers == 1
        assert short.text_config.hidden_size == full.text_config.hidden_size


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_full_width_one_layer_folder_loads_and_generates(tmp_path, name):
    """The real widths and vocabulary (7B: 4096 wide, 32064 rows; 0.5B: 1024, 152000), one layer each, bf16."""
    path = build(tmp_path / "model", name)
    check_folder(name, path, torch.bfloat16)
