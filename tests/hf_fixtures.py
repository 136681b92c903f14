"""Tiny random LLaVA checkpoints built with transformers inside tests (helpers, not tests).

transformers is the reference our model is checked against ; it is imported
here, lazily, and never by scl/. Two families, both at toy sizes so building one costs ~0.1 s:

  "clip_llama"    CLIP ViT (class token, quick_gelu) + Llama with GQA (4 heads, 2 kv heads), untied head,
                  feature layer -2, strategy "default" (16 image tokens)
  "siglip_qwen2"  SigLIP (no class token, tanh GELU) + Qwen2 (q/k/v biases) with tied embeddings,
                  feature layer -1, strategy "full" (16 image tokens)

Every parameter is re-randomized, norm weights and biases included: default init makes norms 1 and
biases 0, so a loader that forgot them would still pass.

Also: rewrite a checkpoint into each of the four key layouts (scl/weights.py), split it into shards,
and build a left-padded batch with images.
"""
import copy
import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

KINDS = ("clip_llama", "siglip_qwen2")
LAYOUTS = ("a", "b", "c", "d")
BOS, EOS = 1, 2


def _quiet_transformers():
    """Import transformers without its progress bars and warnings in test output."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


def tiny_hf_config(kind: str = "clip_llama", *, vision_hidden=32, vision_layers=3, image_size=28, patch=7,
                   text_hidden=48, text_layers=2, heads=4, kv_heads=2, vocab=128, image_token=100,
                   text_extra: dict | None = None, llava_extra: dict | None = None):
    """A LlavaConfig at toy size. Image token `image_token`, pad = vocab - 1, bos 1, eos 2.

    text_extra / llava_extra override text-config / top-level fields (e.g. head_dim, vision_feature_layer)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2Config, SiglipVisionConfig

    vision_kw = dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
                     num_attention_heads=4, image_size=image_size, patch_size=patch)
    text_kw = dict(vocab_size=vocab, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                   num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                   rms_norm_eps=1e-5, max_position_embeddings=512, bos_token_id=BOS, eos_token_id=EOS,
                   **(text_extra or {}))
    if kind == "clip_llama":
        vision, text = CLIPVisionConfig(**vision_kw), LlamaConfig(**text_kw)
        extra = dict(vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False)
    elif kind == "siglip_qwen2":
        vision = SiglipVisionConfig(**vision_kw, vision_use_head=False)
        text = Qwen2Config(**text_kw, tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 1e6})
        extra = dict(vision_feature_layer=-1, vision_feature_select_strategy="full", tie_word_embeddings=True)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    extra.update(llava_extra or {})
    drop_cls = extra["vision_feature_select_strategy"] == "default"  # transformers drops token 0, CLS or not
    n_image = (image_size // patch) ** 2 + (kind == "clip_llama") - drop_cls
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                       image_seq_length=n_image, projector_hidden_act="gelu", pad_token_id=vocab - 1, **extra)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter redrawn at unit-ish scale: norms 1 ± 0.2, biases ± 0.2, matrices ~ N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("bias"):
            p.copy_(0.2 * noise)
        elif re.search(r"(norm|layrnorm)[^.]*\.weight$", name):
            p.copy_(1 + 0.2 * noise)
        elif p.dim() >= 2:
            p.copy_(noise / math.sqrt(p[0].numel()))
        else:  # class_embedding
            p.copy_(0.5 * noise)
    return model


def make_hf_model(kind: str = "clip_llama", seed: int = 0, **sizes):
    """A re-randomized LlavaForConditionalGeneration in eval mode, SDPA attention, fp32."""
    LlavaForConditionalGeneration = _quiet_transformers().LlavaForConditionalGeneration
    config = tiny_hf_config(kind, **sizes)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return randomize_(model, seed).eval()


def load_hf(path):
    """transformers' model from a checkpoint folder (SDPA attention, fp32, eval)."""
    LlavaForConditionalGeneration = _quiet_transformers().LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa",
                                                         dtype=torch.float32).eval()


def make_llava_checkpoint(tmp_path, kind: str = "clip_llama", seed: int = 0, **sizes):
    """save_pretrained of a tiny random model into tmp_path/<kind>-<seed> -> (path, hf_config).

    transformers 5.24 writes the hybrid layout (c) from a model built from scratch."""
    model = make_hf_model(kind, seed, **sizes)
    path = Path(tmp_path) / f"{kind}-{seed}"
    model.save_pretrained(path)
    return path, model.config


# ------------------------------------------------------------------ key layouts and shards
def read_tensors(path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (single file or shards)."""
    path, out = Path(path), {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def to_layout(key: str, layout: str) -> str:
    """Any layout's key -> the same tensor's key in `layout` (the layouts of scl/weights.py)."""
    key = re.sub(r"^model\.language_model\.", "language_model.model.", key)  # first to (a)
    key = re.sub(r"^lm_head\.", "language_model.lm_head.", key)
    key = re.sub(r"^model\.(vision_tower|multi_modal_projector)\.", r"\1.", key)
    key = re.sub(r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.", key)
    if layout in ("b", "d"):  # transformers' in-memory names (5.x: b, 4.52-5.5: d)
        key = re.sub(r"^language_model\.model\.", "model.language_model.", key)
        key = re.sub(r"^language_model\.lm_head\.", "lm_head.", key)
        key = re.sub(r"^(vision_tower|multi_modal_projector)\.", r"model.\1.", key)
    if layout in ("b", "c"):  # no vision_model level (transformers >= 5.6)
        key = key.replace("vision_tower.vision_model.", "vision_tower.", 1)
    return key


def _copy_configs(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


def rewrite_layout(src, dst, layout: str) -> Path:
    """Copy checkpoint `src` to `dst` with every key renamed into layout "a" | "b" | "c" | "d"."""
    src, dst = Path(src), Path(dst)
    _copy_configs(src, dst)
    tensors = {to_layout(k, layout): v.contiguous() for k, v in read_tensors(src).items()}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def write_tensors(dst, tensors: dict, like=None) -> Path:
    """A checkpoint folder with `tensors` as model.safetensors (configs copied from `like`)."""
    dst = Path(dst)
    if like is not None:
        _copy_configs(Path(like), dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return dst


def make_sharded_copy(src, dst, n_shards: int = 2) -> Path:
    """Copy `src` split into `n_shards` files plus model.safetensors.index.json, as save_pretrained shards."""
    src, dst = Path(src), Path(dst)
    _copy_configs(src, dst)
    tensors = read_tensors(src)
    keys = sorted(tensors)
    weight_map, total = {}, 0
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i::n_shards]}
        save_file(part, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return dst


# ------------------------------------------------------------------ inputs
def make_batch(hf_config, text_lengths=((3, 4), (1, 2)), seed: int = 0):
    """Left-padded batch: per row [BOS, a text tokens, P image tokens, b text tokens], one image per row.

    -> input_ids (B, T), attention_mask (B, T), pixel_values (B, 3, S, S). Text tokens avoid the
    special ids (0-2, image token, pad)."""
    g = torch.Generator().manual_seed(seed)
    image_id, pad = hf_config.image_token_index, hf_config.pad_token_id
    P = hf_config.image_seq_length
    rows = []
    for a, b in text_lengths:
        text = torch.randint(3, image_id, (a + b,), generator=g).tolist()
        rows.append([BOS] + text[:a] + [image_id] * P + text[a:])
    T = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    S = hf_config.vision_config.image_size
    pixel_values = torch.randn(len(rows), 3, S, S, generator=g)
    return input_ids, attention_mask, pixel_values


def hf_generate(hf, input_ids, attention_mask, pixel_values, *, max_new_tokens, eos_token_id, pad_token_id):
    """transformers' greedy generate -> only the new tokens (B, T_new).

    Footgun: eos_token_id=None does not disable EOS in transformers (it falls back to the config's eos,
    2 here), so "no EOS" is passed as an id no row can emit (the vocab size)."""
    config = copy.deepcopy(hf.generation_config)
    no_eos = hf.config.text_config.vocab_size
    config.update(eos_token_id=no_eos if eos_token_id is None else eos_token_id, pad_token_id=pad_token_id,
                  max_new_tokens=max_new_tokens, do_sample=False)
    with torch.no_grad():
        out = hf.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                          generation_config=config)
    return out[:, input_ids.shape[1]:]


def hf_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """What transformers' generate passes for left padding; its forward alone would use 0..T-1."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
