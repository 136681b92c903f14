"""The built-in base model (DESIGN §5): its sizes, its init, and the SFT data as fixed-shape tensors.

The model is the real LLaVA architecture at toy size: a CLIP-style tower whose 16-px patches are the
task's grid cells (48-px scenes -> 9 image tokens), the 2-layer projector, a Llama decoder with GQA.
It is saved with save_vlm, so every later stage loads it exactly like a downloaded checkpoint.
"""
import json
import os

import torch

from scl.checkpoint import write_json_atomic

BASE_PRESETS = {
    # A tiny model of the real LLaVA architecture: CLIP-style tower (one 16-px patch per grid cell of
    # the task's 48-px scenes, so 9 image tokens), the 2-layer projector, a Llama decoder.
    "tiny": dict(vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
                 text=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2)),
    # For the miniature pipeline in tests: seconds, not minutes.
    "micro": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                  text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2)),
}


def base_config(preset: str, tok, image_size=48, patch_size=16):
    from scl.config import VLMConfig

    p = BASE_PRESETS[preset]
    return VLMConfig.from_dict({
        "model_type": "llava", "image_token_index": tok.image_token_id, "pad_token_id": tok.pad_token_id,
        "vision_feature_layer": -1, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
        "vision_config": {"model_type": "clip_vision_model", "image_size": image_size, "patch_size": patch_size,
                          "hidden_act": "quick_gelu", **p["vision"]},
        "text_config": {"model_type": "llama", "vocab_size": tok.vocab_size, "max_position_embeddings": 1024,
                        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
                        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                        "pad_token_id": tok.pad_token_id, **p["text"]}})


def init_weights(model, std=0.02):
    """GPT-2 style init for training from scratch: N(0, 0.02) matrices, zero biases, unit norms."""
    for name, p in model.named_parameters():
        if p.dim() >= 2 and "patch_embedding" not in name:
            torch.nn.init.normal_(p, std=std)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif "norm" in name or "layrnorm" in name:
            torch.nn.init.ones_(p)


def encode_conversations(rows, tok, num_image_tokens):
    """SFT rows -> fixed-shape (N, T) input ids and targets (-100 where nothing is trained).

    Fixed shapes let torch.compile build one graph (research/feasibility.md: 6x faster on CPU)."""
    from scl.tokenizer import render_chat

    encoded = [render_chat(tok, r["messages"], num_image_tokens) for r in rows]
    T = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    for n, (ids, mask) in enumerate(encoded):
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        input_ids[n, :len(ids)] = ids_t
        # position t predicts token t+1; train it where token t+1 is an assistant token
        targets[n, :len(ids) - 1] = torch.where(mask_t[1:], ids_t[1:], torch.tensor(-100))
    return input_ids, targets


def preprocess_images(paths, proc, chunk=1024):
    from PIL import Image

    out = []
    for i in range(0, len(paths), chunk):
        out.append(proc([Image.open(p).convert("RGB") for p in paths[i:i + chunk]]))
    return torch.cat(out)  # (N, 3, S, S)


def write_preprocessor_config(path, image_size):
    from scl.image import CLIP_MEAN, CLIP_STD

    write_json_atomic(os.path.join(path, "preprocessor_config.json"), {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "resample": 3, "do_convert_rgb": True})


def sft_fingerprint(cfg):
    keys = ("seed", "n_sft", "n_construct", "n_test", "sft_steps", "sft_batch_size", "sft_lr", "sft_warmup",
            "model_preset")
    return {k: getattr(cfg, k) for k in keys}


def prepare_task(cfg, data_dir):
    """The built-in task's files, written once per (seed, sizes) and reused after."""
    from scl import task

    manifest = os.path.join(data_dir, "task.json")
    want = {"seed": cfg.seed, "n_sft": cfg.n_sft, "n_construct": cfg.n_construct, "n_test": cfg.n_test}
    if os.path.exists(manifest) and json.load(open(manifest)) == want:
        return [json.loads(line) for line in open(os.path.join(data_dir, "sft.jsonl"))]
    splits = task.write_task(data_dir, seed=cfg.seed, n_sft=cfg.n_sft, n_construct=cfg.n_construct, n_test=cfg.n_test)
    write_json_atomic(manifest, want)
    return splits["sft"]
