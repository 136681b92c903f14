"""The built-in base model: its sizes, its init, its SFT data as padded tensor blocks, its optimizer.
train.py saves it with save_vlm, so every later stage loads it exactly like a downloaded checkpoint.
"""
import math
import os
from collections import Counter
from itertools import accumulate

import torch

from scl import task, vocab
from scl.config import VLMConfig
from scl.files import read_json, read_jsonl, write_json
from scl.image import CLIP_MEAN, CLIP_STD, ImageProcessor, open_image
from scl.tokenizer import Tokenizer, render_chat
from scl.vlm import VLM
from scl.weights import save_processor

PRESETS = {
    # The real LLaVA architecture at toy size: one 16-px patch per grid cell of the task's 48-px scenes.
    "tiny": dict(vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
                 text=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2)),
    # For the miniature pipeline in tests: seconds, not minutes.
    "micro": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                  text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2)),
}


def base_config(preset: str, tok, image_size=48, patch_size=16):
    p = PRESETS[preset]
    return VLMConfig.from_dict({
        "model_type": "llava", "image_token_index": tok.image_token_id, "pad_token_id": tok.pad_token_id,
        "vision_feature_layer": -1, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
        "vision_config": {"model_type": "clip_vision_model", "image_size": image_size, "patch_size": patch_size,
                          "hidden_act": "quick_gelu", **p["vision"]},
        "text_config": {"model_type": "llama", "vocab_size": tok.vocab_size, "max_position_embeddings": 1024,
                        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
                        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                        "pad_token_id": tok.pad_token_id, **p["text"]}})


def init_weights(model, std=0.02, position_std=1.0):
    """GPT-2 style init: N(0, 0.02) matrices, zero biases, unit norms; and a strong patch-position embedding.
    Footgun: the decoder finds "the top-left cell" by image-token *content* (RoPE only knows offsets), so
    each patch feature must say where it is; at std 0.02 the pixels drown the position and SFT stalls."""
    for name, p in model.named_parameters():  # norm weights stay as built: ones
        if p.dim() >= 2 and "patch_embedding" not in name:
            torch.nn.init.normal_(p, std=std)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
    torch.nn.init.normal_(model.vision_tower.embeddings.position_embedding.weight, std=position_std)


def length_buckets(lengths, buckets):
    """Upper lengths of at most `buckets` blocks that cover `lengths` with the fewest padded tokens: a dynamic
    programme, best[k][j] = fewest tokens when the j shortest distinct lengths go into k blocks."""
    count = Counter(lengths)
    ls = sorted(count)
    upto = [0, *accumulate(count[n] for n in ls)]  # upto[j] = conversations with one of the j shortest lengths
    m, inf = len(ls), float("inf")
    best = [[0.0] + [inf] * m] + [[inf] * (m + 1) for _ in range(buckets)]
    cut = {}
    for k in range(1, buckets + 1):
        for j in range(1, m + 1):
            for i in range(k - 1, j):
                cost = best[k - 1][i] + ls[j - 1] * (upto[j] - upto[i])
                if cost < best[k][j]:
                    best[k][j], cut[k, j] = cost, i
    k = min(range(1, buckets + 1), key=lambda k: best[k][m]) if m else 0
    tops, j = [], m
    for k in range(k, 0, -1):
        tops.append(ls[j - 1])
        j = cut[k, j]
    return tops[::-1]


def encode_conversations(conversations, tok, num_image_tokens, buckets=6):
    """Conversations -> [(row indices, input_ids (N_k, T_k), targets (N_k, T_k), -100 = not trained)]. A batch
    is drawn from one block, so it is padded to that block's length only."""
    encoded = [render_chat(tok, c, num_image_tokens, train_turns=[k for k, m in enumerate(
        m for m in c if m["role"] == "assistant") if m.get("train", True)]) for c in conversations]
    blocks, low = [], 0
    for T in length_buckets([len(ids) for ids, _ in encoded], buckets):
        idx = [n for n, (ids, _) in enumerate(encoded) if low < len(ids) <= T]
        low = T
        input_ids = torch.full((len(idx), T), tok.pad_token_id, dtype=torch.long)
        targets = torch.full((len(idx), T), -100, dtype=torch.long)
        for row, n in enumerate(idx):
            ids, mask = encoded[n]
            input_ids[row, :len(ids)] = torch.tensor(ids)
            # position t predicts token t+1; train it where token t+1 is an assistant token
            targets[row, :len(ids) - 1] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])
        blocks.append((torch.tensor(idx), input_ids, targets))
    return blocks


def write_preprocessor_config(path, image_size):
    write_json(os.path.join(path, "preprocessor_config.json"), {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "resample": 3, "do_convert_rgb": True})


def prepare_sft(cfg, data_dir, model_dir):
    """The task's files in data_dir (written once per setting), a tokenizer trained on them and a fresh model
    (files in model_dir), the SFT conversations as blocks, every image preprocessed once.
    -> (model, blocks, pixel_values (N_img, 3, S, S), image_of (N_conv,): conversation -> image row)."""
    want = {k: getattr(cfg, k) for k in ("seed", "n_sft", "n_construct", "n_test", "sft_review_fraction",
                                         "blank_images")}
    if read_json(os.path.join(data_dir, "task.json")) == want:
        rows = read_jsonl(os.path.join(data_dir, "sft.jsonl"))
    else:
        rows = task.write_task(data_dir, seed=cfg.seed, n_sft=cfg.n_sft, n_construct=cfg.n_construct,
                               n_test=cfg.n_test, review_fraction=cfg.sft_review_fraction,
                               blank=cfg.blank_images)["sft"]
        write_json(os.path.join(data_dir, "task.json"), want)
    conversations = [r["messages"] for r in rows]
    texts = [m["content"] for c in conversations for m in c] + [o for r in rows for o in r["options"]]
    vocab.train_tokenizer(texts, model_dir, whole_tokens=vocab.protocol_sentences())  # protocol sentences: 1 token
    tok = Tokenizer.from_dir(model_dir)
    model = VLM(base_config(cfg.model_preset, tok))
    init_weights(model)
    write_preprocessor_config(model_dir, model.config.vision_config.image_size)
    save_processor(model_dir, model.config)  # what transformers' AutoProcessor reads
    proc = ImageProcessor.from_dir(model_dir)
    blocks = encode_conversations(conversations, tok, model.config.num_image_tokens)
    unique = sorted({r["image"] for r in rows})
    chunks = [unique[i:i + 1024] for i in range(0, len(unique), 1024)]  # 1024 decoded images at a time
    pixel_values = torch.cat([proc([open_image(os.path.join(data_dir, p)) for p in c]) for c in chunks])
    position = {p: i for i, p in enumerate(unique)}
    image_of = torch.tensor([position[r["image"]] for r in rows])
    print(f"sft: {len(rows)} conversations in blocks of {[b[1].shape[1] for b in blocks]} tokens")
    return model, blocks, pixel_values, image_of


# Footgun: the decoder's RMSNorm makes the image features' scale free, and Adam's steps at a text-sized lr
# grow it fast; their gradients then shrink as 1/scale and the tower stops learning.
VISION_LR_SCALE = 0.1


def sft_optimizer(model, lr):
    """AdamW with the vision tower and projector at VISION_LR_SCALE times the lr ("scale" of each group)."""
    vision = ("vision_tower.", "multi_modal_projector.")
    return torch.optim.AdamW([
        {"params": [p for n, p in model.named_parameters() if not n.startswith(vision)], "scale": 1.0},
        {"params": [p for n, p in model.named_parameters() if n.startswith(vision)], "scale": VISION_LR_SCALE}],
        lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


def sft_lr_at(step, total, warmup, peak):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
