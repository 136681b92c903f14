"""Train: the SFT base model of the built-in task, DPO on SelfCorSet, or the whole SCL experiment.

    python train.py                                    # the whole experiment into runs/default/
    python train.py --stage=sft --out_dir=DIR          # built-in task data + tokenizer + base model (SFT)
    python train.py --stage=dpo --model=DIR --pairs=FILE --out_dir=DIR   # DPO on a SelfCorSet file
    torchrun --nproc_per_node=2 train.py --stage=dpo ...                 # data parallel (gloo on CPU)

Flags are the fields of TrainConfig below (`--field=value`). The loops are plain and read top to
bottom: batch -> policy log-probs -> cached reference log-probs -> loss -> backward per micro-batch ->
all-reduce -> clip -> step -> log (DESIGN §4). The whole experiment (stage=all) lives in scl/experiment.py.
"""
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from scl.files import load_checkpoint, save_checkpoint, write_json
from scl.cli import parse_cli, to_json


@dataclass
class TrainConfig:
    """python train.py [--stage=all|sft|dpo] [--field=value ...]"""
    stage: str = "all"  # all = the whole experiment; sft = base model of the built-in task; dpo = DPO only
    out_dir: str = "runs/default"  # everything a stage writes goes here
    seed: int = 0  # one seed for data, init, sampling and data order
    device: str = "auto"  # auto = cuda if available, else cpu
    threads: int = 0  # CPU threads for torch (0 = leave torch's default)
    # --- built-in task and its base model (stage sft; DESIGN §5) ---
    n_sft: int = 20000  # SFT questions
    n_construct: int = 1000  # questions SelfCorSet is built from (two-turn rollouts)
    n_test: int = 1000  # held-out questions, never used to build pairs or choose settings
    sft_steps: int = 500  # optimizer steps of the base model's SFT (fits 10 minutes on 2 cores with a cold compile)
    sft_batch_size: int = 64  # conversations per SFT step
    sft_lr: float = 3e-3  # peak AdamW lr of the base SFT (warm-up then cosine)
    sft_warmup: int = 60  # warm-up steps
    sft_describe_first: bool = True  # answers start with the scene caption, then reason (perception first)
    sft_review_fraction: float = 0.1  # SFT conversations that carry the review turn (enough to learn the two-turn format)
    sft_review_misread: float = 0.0  # SFT review turns whose first answer (context) is a reasoning slip (scl/task.py)
    sft_blank_images: bool = False  # text-only baseline: every image blank, in SFT and on test (issue 4)
    sft_vision_lr_scale: float = 0.1  # lr of vision tower + projector relative to sft_lr (keeps their scale sane)
    sft_compile: bool = True  # torch.compile the SFT step (one graph for all blocks; ~6x faster on CPU, research/feasibility)
    model_preset: str = "tiny"  # size of the base model, see scl/base.py BASE_PRESETS
    # --- self-correction rollouts on construct (stage all; generate.py's code) ---
    prompt: str = "vp2"  # review prompt that builds SelfCorSet: cp | vp1 | vp2 | vp3
    samples: int = 2  # rollouts per construct question (1 = the paper)
    temperature: float = 1.0  # sampling temperature of the rollouts (0 = greedy)
    top_p: float = 1.0  # nucleus sampling
    gen_batch_size: int = 256  # sequences per generation batch
    max_new_tokens: int = 128  # token budget per answer (scene description + reasoning)
    # --- DPO (stage dpo; DESIGN §1.6, paper §4.2) ---
    model: str = ""  # starting model folder (policy init and reference)
    pairs: str = ""  # selfcorset.jsonl written by generate.py
    beta: float = 0.1  # DPO temperature
    sft_alpha: float = 0.1  # weight of the NLL(chosen) term: (1 - a)·DPO + a·NLL (paper's sft_beta)
    lr: float = 5e-5  # peak learning rate (paper: 5e-5 with LoRA)
    epochs: float = 3.0  # passes over the pairs
    batch_size: int = 16  # pairs per optimizer step, all ranks and micro-batches together (paper: 16)
    micro_batch_size: int = 4  # pairs per forward/backward on one rank
    warmup_ratio: float = 0.03  # linear warm-up share of the steps, then linear decay to 0
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 0.5  # max global gradient norm
    lora: bool = True  # LoRA adapters (merged on export) instead of full fine-tuning
    lora_r: int = 8  # LoRA rank
    lora_alpha: float = 32.0  # LoRA alpha (scale alpha / r)
    lora_dropout: float = 0.05  # dropout on the adapter input
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])  # LLM modules
    max_length: int = 2048  # prompt + response tokens; longer pairs are skipped (ms-swift "delete")
    pair_fraction: float = 1.0  # train on this share of the pairs (the paper's data-size ablation)
    val_fraction: float = 0.05  # pairs held out to pick the best checkpoint (by held-out DPO loss)
    share_prefix: bool = True  # run image + prompt once for chosen and rejected (DESIGN §4)
    grad_checkpointing: bool = False  # recompute decoder layers in backward to save memory
    save_every: int = 50  # optimizer steps between checkpoints
    resume: bool = False  # continue from out_dir/checkpoints/last
    max_nan_steps: int = 10  # abort after this many skipped non-finite steps
    stop_after: int = 0  # stop after this many optimizer steps (0 = run to the end; tests use it)
    # --- evaluation (stage all) ---
    eval_prompts: list[str] = field(default_factory=lambda: ["cp", "vp1", "vp2", "vp3"])  # review prompts compared
    eval_rounds: int = 3  # K of the K-round curve
    eval_scl_prompts: bool = False  # also run the review prompts and curve for the SCL model (time; base always does)
    scl_lr: float = 1e-3  # DPO lr of the built-in experiment: a 3.8M model from scratch, not the paper's 7B LoRA
    scl_beta: float = 1.0  # DPO beta of the built-in experiment (beta 0.1 lost 5 points on held-out val)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# -----------------------------------------------------------------------------
# Data parallel: torchrun sets RANK / WORLD_SIZE. Gradients are averaged by hand with one all_reduce
# per parameter after the micro-batches: what DDP does, but visible, and it works for forward_hidden
# calls that DDP's forward hook would not see.

def init_distributed(device):
    if "RANK" not in os.environ:
        return 0, 1
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_reduce_(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def log0(rank, *args):
    if rank == 0:
        print(*args, flush=True)


def lr_at(step, total, warmup, peak):
    """Linear warm-up, then linear decay to 0 (ms-swift's `linear` schedule, paper §4.2)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


# -----------------------------------------------------------------------------
# DPO on SelfCorSet

def load_pairs(cfg, tok, proc, num_image_tokens, out_dir, rank):
    """selfcorset.jsonl -> encoded pairs; skipped rows and their reasons go to out_dir/skipped.jsonl."""
    from scl.dpo import read_pairs

    if not os.path.isfile(cfg.pairs):
        sys.exit(f"error: pairs file not found: {cfg.pairs}")
    pairs, skipped = read_pairs(cfg.pairs, tok, proc, num_image_tokens, cfg.max_length)
    if rank == 0 and skipped:
        with open(os.path.join(out_dir, "skipped.jsonl"), "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in skipped)
    if not pairs:
        sys.exit(f"error: no usable pairs in {cfg.pairs} ({len(skipped)} skipped, see {out_dir}/skipped.jsonl)")
    return pairs, skipped


def make_batch(pairs, pad_id, device):
    from scl.dpo import collate_pairs

    batch = {k: v.to(device) for k, v in collate_pairs(pairs, pad_id).items()}
    pixel_values = torch.stack([p["pixel_values"] for p in pairs]).to(device)  # (B, 3, S, S)
    return batch, pixel_values


@torch.no_grad()
def reference_logps(model, pairs, pad_id, device, cfg):
    """log πref of every pair, computed once before training (DESIGN §1.6): {pair id: (chosen, rejected)}."""
    from scl.dpo import concatenated_forward

    model.eval()
    out = {}
    for i in range(0, len(pairs), cfg.micro_batch_size):
        chunk = pairs[i:i + cfg.micro_batch_size]
        batch, pix = make_batch(chunk, pad_id, device)
        with autocast(device):
            s = concatenated_forward(model, batch, pix, share_prefix=cfg.share_prefix)
        for p, c, r in zip(chunk, s["chosen_logps"].tolist(), s["rejected_logps"].tolist()):
            out[p["id"]] = (c, r)
    return out


def autocast(device):
    """bf16 autocast on CUDA; fp32 on CPU (log-probs and losses are fp32 either way)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def enable_grad_checkpointing(model):
    """Recompute each decoder layer in backward instead of storing its activations."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.language_model.model.layers:
        layer._plain_forward = layer.forward
        layer.forward = lambda *a, _f=layer._plain_forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def dpo_step_loss(model, chunk, ref, pad_id, device, cfg, scale):
    """Forward one micro-batch; returns (loss · scale, summed metrics over its pairs)."""
    from scl.dpo import concatenated_forward, dpo_loss

    batch, pix = make_batch(chunk, pad_id, device)
    with autocast(device):
        s = concatenated_forward(model, batch, pix, share_prefix=cfg.share_prefix)
    ref_c = torch.tensor([ref[p["id"]][0] for p in chunk], device=device)
    ref_r = torch.tensor([ref[p["id"]][1] for p in chunk], device=device)
    loss, metrics = dpo_loss(s["chosen_logps"], s["rejected_logps"], ref_c, ref_r,
                             beta=cfg.beta, sft_alpha=cfg.sft_alpha, chosen_nll=s["chosen_nll"])
    return loss * scale, {k: v * len(chunk) for k, v in metrics.items()}


def run_dpo(cfg: TrainConfig) -> dict:
    from scl.lora import add_lora, lora_parameters, merge_lora
    from scl.selfcorrect import load_model_dir
    from scl.weights import CheckpointError, save_vlm

    device = pick_device(cfg.device)
    rank, world = init_distributed(device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.manual_seed(cfg.seed)
    out_dir = cfg.out_dir
    os.makedirs(out_dir, exist_ok=True)
    if not os.path.isdir(cfg.model):
        sys.exit(f"error: model folder not found: {cfg.model!r} (pass --model=DIR)")
    try:
        model, tok, proc = load_model_dir(cfg.model, device=device)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    if rank == 0:
        write_json(os.path.join(out_dir, "config.json"), dataclasses.asdict(cfg))
    t0 = time.time()

    # 1. Pairs: encode, hold out a validation share, take the requested fraction (ablation).
    pairs, skipped = load_pairs(cfg, tok, proc, model.config.num_image_tokens, out_dir, rank)
    order = list(range(len(pairs)))
    random.Random(cfg.seed).shuffle(order)
    n_val = int(len(pairs) * cfg.val_fraction) if len(pairs) >= 20 else 0
    val = [pairs[i] for i in order[:n_val]]
    train = [pairs[i] for i in order[n_val:]]
    train = train[:max(1, round(len(train) * cfg.pair_fraction))]
    log0(rank, f"dpo: {len(train)} train pairs, {len(val)} held out, {len(skipped)} skipped")

    # 2. Reference log-probs, once, from the starting model (before any adapter exists).
    ref_path = os.path.join(out_dir, "reference_logps.json")
    ref = None
    if os.path.exists(ref_path):
        cached = json.load(open(ref_path))
        if cached.get("model") == os.path.abspath(cfg.model) and cached.get("pairs") == os.path.abspath(cfg.pairs):
            ref = {k: tuple(v) for k, v in cached["logps"].items()}
    if ref is None or any(p["id"] not in ref for p in train + val):
        ref = reference_logps(model, train + val, tok.pad_token_id, device, cfg)
        if rank == 0:
            write_json(ref_path, {"model": os.path.abspath(cfg.model), "pairs": os.path.abspath(cfg.pairs),
                                         "logps": ref})

    # 3. Trainable parameters: LoRA adapters on the LLM's q/k/v (paper), or everything.
    if cfg.lora:
        add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=tuple(cfg.lora_targets))
        params = lora_parameters(model)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)

    # 4. Schedule: a global batch of cfg.batch_size pairs per step, split over ranks and micro-batches.
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    warmup = max(1, round(cfg.warmup_ratio * total_steps))
    start_step, nan_steps, best = 0, 0, float("inf")
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    if cfg.resume and os.path.isdir(os.path.join(ckpt_dir, "last")):
        trainable, state = load_checkpoint(os.path.join(ckpt_dir, "last"))
        with torch.no_grad():
            for p in params:
                p.copy_(trainable[names[id(p)]])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start_step, nan_steps, best = state["step"], state["nan_steps"], state["best"]
        log0(rank, f"dpo: resumed at step {start_step}")
    log_path = os.path.join(out_dir, "log.jsonl")
    if rank == 0 and start_step == 0 and os.path.exists(log_path):
        os.remove(log_path)

    def step_pairs(step):
        """The pairs of optimizer step `step`: a fixed permutation per epoch, so resume replays it."""
        epoch, i = divmod(step, steps_per_epoch)
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).tolist()
        return [train[j] for j in perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]]

    def save(tag, step):
        if rank == 0:
            state = {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "step": step,
                     "nan_steps": nan_steps, "best": best}
            save_checkpoint(os.path.join(ckpt_dir, tag), {names[id(p)]: p for p in params}, state)

    # 5. The loop.
    from tqdm import tqdm
    model.train()
    bar = tqdm(range(start_step, total_steps), desc="dpo", disable=rank != 0, initial=start_step, total=total_steps)
    for step in bar:
        group = step_pairs(step)
        mine = group[rank::world]  # this rank's share of the global batch
        sums = {}
        for i in range(0, len(mine), cfg.micro_batch_size):
            chunk = mine[i:i + cfg.micro_batch_size]
            # Scale so that summing over micro-batches and ranks gives the mean over the global batch.
            loss, m = dpo_step_loss(model, chunk, ref, tok.pad_token_id, device, cfg, len(chunk) / len(group))
            loss.backward()
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
        # All ranks agree on the step: gradients summed, metrics summed, one finiteness flag.
        flat = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=device)
                          for p in params])
        keys = sorted(sums)
        stats = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
        all_reduce_(flat), all_reduce_(stats)
        metrics = {k: v / len(group) for k, v in zip(keys, stats.tolist())}
        if not (torch.isfinite(flat).all() and math.isfinite(metrics["loss"])):
            nan_steps += 1
            optimizer.zero_grad(set_to_none=True)
            log0(rank, f"dpo: step {step} non-finite, skipped ({nan_steps}/{cfg.max_nan_steps})")
            if nan_steps >= cfg.max_nan_steps:
                sys.exit(f"error: {nan_steps} non-finite DPO steps; lower --lr or check the pairs")
            continue
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
        lr = lr_at(step, total_steps, warmup, cfg.lr)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics.update(step=step + 1, lr=lr, grad_norm=grad_norm, epoch=(step + 1) / steps_per_epoch)
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}",
                            margin=f"{metrics['rewards/margins']:.3f}")
        done = step + 1
        if done % cfg.save_every == 0 or done == total_steps:
            if val:
                val_loss = evaluate_pairs(model, val, ref, tok.pad_token_id, device, cfg)
                if val_loss < best:
                    best = val_loss
                    save("best", done)
            save("last", done)
        if cfg.stop_after and done - start_step >= cfg.stop_after:
            save("last", done)
            return {"stopped_at": done}

    # 6. Export: adapters folded into the weights, a plain checkpoint any LLaVA loader reads.
    in_sync = True
    if world > 1:  # every rank must hold the same weights, or the all_reduce above was wrong
        checksum = torch.cat([p.detach().reshape(-1).double() for p in params])
        gathered = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(gathered, checksum)
        in_sync = all(torch.equal(g, gathered[0]) for g in gathered)
    if cfg.lora:
        merge_lora(model)
    if rank == 0:
        export = os.path.join(out_dir, "model")
        save_vlm(model.eval(), export)
        copy_tokenizer_files(cfg.model, export)
        result = summarize_dpo(log_path, out_dir, len(train), len(val), len(skipped), time.time() - t0,
                               ranks_in_sync=in_sync, nan_steps=nan_steps)
        log0(rank, f"dpo: done in {result['seconds']:.0f}s, model in {export}")
        return result
    return {}


@torch.no_grad()
def evaluate_pairs(model, pairs, ref, pad_id, device, cfg):
    """Mean DPO loss on held-out pairs (picks the best checkpoint, as ms-swift's eval split does)."""
    was = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(pairs), cfg.micro_batch_size):
        chunk = pairs[i:i + cfg.micro_batch_size]
        loss, _ = dpo_step_loss(model, chunk, ref, pad_id, device, cfg, len(chunk) / len(pairs))
        total += loss.item()
    model.train(was)
    return total


def copy_tokenizer_files(src, dst):
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                 "special_tokens_map.json", "chat_template.json", "chat_template.jinja"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def summarize_dpo(log_path, out_dir, n_train, n_val, n_skipped, seconds, **extra):
    """First/last metrics of the run and the PNG plots of loss, margins and accuracies."""
    rows = [json.loads(line) for line in open(log_path)] if os.path.exists(log_path) else []
    result = {"pairs_train": n_train, "pairs_val": n_val, "pairs_skipped": n_skipped, "seconds": seconds,
              "steps": len(rows), **extra}
    if rows:
        k = max(1, len(rows) // 10)  # first and last tenth of the run, averaged
        for name in ("loss", "rewards/accuracies", "rewards/margins"):
            result[f"first/{name}"] = sum(r[name] for r in rows[:k]) / k
            result[f"last/{name}"] = sum(r[name] for r in rows[-k:]) / k
        plot_log(rows, os.path.join(out_dir, "dpo.png"))
    write_json(os.path.join(out_dir, "metrics.json"), result)
    return result


def plot_log(rows, path, keys=("loss", "rewards/margins", "rewards/accuracies")):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, key in zip(axes, keys):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows])
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)



# -----------------------------------------------------------------------------
# SFT: the built-in task's base model, trained from scratch (DESIGN §5)

def run_sft(cfg: TrainConfig) -> dict:
    """Task data + tokenizer + base model, trained from scratch; out_dir/{data,base}/."""
    from tqdm import tqdm
    from scl import vocab
    from scl.base import (base_config, blank_image, encode_conversations, init_weights, prepare_task,
                          preprocess_images, sft_fingerprint, write_preprocessor_config)
    from scl.data import load_rows
    from scl.image import ImageProcessor
    from scl.selfcorrect import rollout
    from scl.tokenizer import Tokenizer
    from scl.vlm import VLM
    from scl.weights import save_vlm

    t0 = time.time()
    device = pick_device(cfg.device)
    data_dir, base_dir = os.path.join(cfg.out_dir, "data"), os.path.join(cfg.out_dir, "base")
    metrics_path = os.path.join(base_dir, "metrics.json")
    if os.path.exists(metrics_path) and json.load(open(metrics_path)).get("config") == sft_fingerprint(cfg):
        print(f"sft: reusing {base_dir} (same config)")
        return json.load(open(metrics_path))
    torch.manual_seed(cfg.seed)
    rows = prepare_task(cfg, data_dir)
    tmp_dir = base_dir + ".tmp"  # the finished folder appears only when complete
    os.makedirs(tmp_dir, exist_ok=True)

    # 1. Conversations: every SFT question (each answer reads the scene out first: a dense caption);
    #    a tokenizer trained on their text, in which every protocol sentence is one token.
    conversations = [r["messages"] for r in rows]  # answers as scl/task.py conversation() writes them
    images = [r["image"] for r in rows]
    texts = [m["content"] for c in conversations for m in c] + [o for r in rows for o in r["options"]]
    vocab.train_tokenizer(texts, tmp_dir, whole_tokens=vocab.protocol_sentences())
    tok = Tokenizer.from_dir(tmp_dir)

    # 2. The model, the data as a few padded blocks, the images preprocessed once.
    config = base_config(cfg.model_preset, tok)
    model = VLM(config)
    init_weights(model)
    model.to(device)
    write_preprocessor_config(tmp_dir, config.vision_config.image_size)
    proc = ImageProcessor.from_dir(tmp_dir)
    blocks = encode_conversations(conversations, tok, config.num_image_tokens)  # [(rows, (N_k, T_k), (N_k, T_k))]
    unique = sorted(set(images))
    pixel_values = preprocess_images([os.path.join(data_dir, p) for p in unique], proc)  # (N_img, 3, S, S)
    if cfg.sft_blank_images:  # the baseline that shows the questions need the image: nothing to see
        pixel_values = proc([blank_image(config)]).expand_as(pixel_values)
    position = {p: i for i, p in enumerate(unique)}
    image_of = torch.tensor([position[p] for p in images])  # conversation -> its row in pixel_values
    n_params = sum(p.numel() for p in model.parameters())
    print(f"sft: {len(conversations)} conversations in blocks of "
          f"{[b[1].shape[1] for b in blocks]} tokens, model {n_params / 1e6:.2f}M parameters")

    # 3. The loop: AdamW, warm-up + cosine, clipping; one compiled step.
    # Footgun: the decoder's RMSNorm makes the image features' scale free, and Adam's steps at a text-sized
    # lr grow it ~250x in 50 steps; their gradients then shrink as 1/scale and the tower stops learning
    # (measured: feature norm 0.6 -> 150, patch-embedding grad 3.4 -> 1e-4). A smaller lr there keeps it ~2.
    vision = [p for n, p in model.named_parameters() if n.startswith(("vision_tower.", "multi_modal_projector."))]
    rest = [p for n, p in model.named_parameters() if not n.startswith(("vision_tower.", "multi_modal_projector."))]
    optimizer = torch.optim.AdamW([{"params": rest, "scale": 1.0}, {"params": vision, "scale": cfg.sft_vision_lr_scale}],
                                  lr=cfg.sft_lr, betas=(0.9, 0.95), weight_decay=0.1)

    def loss_fn(ids, tgt, pix):
        with autocast(device) if device.type == "cuda" else torch.autocast("cpu", dtype=torch.bfloat16,
                                                                            enabled=cfg.sft_compile):
            logits = model(ids, pixel_values=pix)  # (B, T, V) fp32
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)

    # One graph for every block length (dynamic shapes): a cold inductor compile costs ~30-70 s on
    # 2 cores, one static graph per block paid that 4-5 times on a fresh machine. Footgun: build the
    # RoPE table first, or the first call's cache insert is a guard failure and a second compile.
    model.language_model.model.inv_freq(device)
    step_fn = torch.compile(loss_fn, dynamic=True) if cfg.sft_compile else loss_fn
    # Footgun: inductor compiles the embedding's backward (an index_put that accumulates) to atomic adds,
    # whose order varies between runs on more than one thread: one seed gave bases of 48.2% and 49.0%.
    # In deterministic mode it keeps the eager kernel (measured: identical weights twice; 500 steps 514 s, 541 before).
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:  # the mode is process-wide: put it back even if a step fails
        gen = torch.Generator().manual_seed(cfg.seed)
        log = open(os.path.join(tmp_dir, "log.jsonl"), "w")
        bar = tqdm(range(cfg.sft_steps), desc="sft")
        sizes = torch.tensor([len(b[0]) for b in blocks], dtype=torch.float)
        for step in bar:
            # A batch comes from one length block, blocks drawn by their size (every conversation equally likely).
            k = int(torch.multinomial(sizes, 1, generator=gen))
            rows_k, ids_k, tgt_k = blocks[k]
            idx = torch.randint(len(rows_k), (cfg.sft_batch_size,), generator=gen)
            pix = pixel_values[image_of[rows_k[idx]]]
            if step < cfg.sft_warmup:
                lr = cfg.sft_lr * (step + 1) / cfg.sft_warmup
            else:
                progress = (step - cfg.sft_warmup) / max(1, cfg.sft_steps - cfg.sft_warmup)
                lr = cfg.sft_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
            for g in optimizer.param_groups:
                g["lr"] = lr * g["scale"]
            loss = step_fn(ids_k[idx].to(device), tgt_k[idx].to(device), pix.to(device))
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            log.write(json.dumps({"step": step + 1, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm}) + "\n")
            bar.set_postfix(loss=f"{loss.item():.3f}")
        log.close()
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    train_seconds = time.time() - t0

    # 4. Save like any checkpoint, then measure greedy turn-1 accuracy on test.
    model.eval()
    save_vlm(model, tmp_dir)
    test_rows, _ = load_rows(os.path.join(data_dir, "test.jsonl"))
    if cfg.sft_blank_images:
        test_rows = [dataclasses.replace(r, image=blank_image(config)) for r in test_rows]
    records = rollout(model, tok, proc, test_rows, prompt="sp", rounds=1, max_new_tokens=cfg.max_new_tokens,
                      batch_size=cfg.gen_batch_size)
    acc = sum(r["turns"][0]["correct"] for r in records) / max(len(records), 1)
    result = {"test_accuracy": acc, "test_questions": len(records), "seconds": time.time() - t0,
              "train_seconds": train_seconds, "parameters": n_params, "config": sft_fingerprint(cfg)}
    write_json(os.path.join(tmp_dir, "metrics.json"), result)
    import shutil
    shutil.rmtree(base_dir, ignore_errors=True)
    os.replace(tmp_dir, base_dir)
    print(f"sft: test accuracy {100 * acc:.1f}% in {result['seconds']:.0f}s -> {base_dir}")
    return result

# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_cli(TrainConfig, argv)
    print(to_json(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.stage == "dpo":
        if not cfg.pairs:
            sys.exit("error: --stage=dpo needs --model=DIR and --pairs=FILE")
        run_dpo(cfg)
    elif cfg.stage == "sft":
        run_sft(cfg)
    elif cfg.stage == "all":
        from scl.experiment import run_experiment
        run_experiment(cfg, run_sft, run_dpo)
    else:
        sys.exit(f"error: unknown --stage={cfg.stage} (all | sft | dpo)")


if __name__ == "__main__":
    main()
