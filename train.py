"""Self-Correction Learning end to end on the built-in task, and the two training stages it runs.

    python train.py                                    # the whole experiment into runs/default/
    python train.py --stage=sft --out_dir=DIR          # the built-in task's data, tokenizer and base model
    python train.py --stage=dpo --model=DIR --pairs=FILE --out_dir=DIR   # DPO on a SelfCorSet file
    torchrun --nproc_per_node=2 train.py --stage=dpo ...                 # data parallel (gloo on CPU)

Read top to bottom: the config, the whole experiment (`run_all`), the SFT loop, and the DPO loop, which
is the method: batch -> policy and cached reference log-probs -> loss -> backward -> all-reduce -> step.
"""
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist
from tqdm import tqdm

from scl.cli import parse_cli, to_json
from scl.files import (atomic_write, fingerprint, load_checkpoint, read_json, read_jsonl, save_checkpoint,
                       write_json, write_jsonl, write_text)


@dataclass
class TrainConfig:
    """python train.py [--stage=all|sft|dpo] [--field=value ...]"""
    stage: str = "all"  # all = the whole experiment; sft = the built-in base model; dpo = DPO on a pairs file
    out_dir: str = "runs/default"  # everything a stage writes goes here
    seed: int = 0  # one seed for data, init, sampling and data order
    device: str = "auto"  # auto = cuda if available, else cpu
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    # --- the built-in task and its base model (stage sft) ---
    n_sft: int = 20000  # SFT questions
    n_construct: int = 1000  # questions SelfCorSet is built from (rollouts)
    n_test: int = 1000  # held-out questions: only ever evaluated
    sft_steps: int = 500  # optimizer steps
    sft_batch_size: int = 64  # conversations per step
    sft_lr: float = 3e-3  # peak AdamW lr: warm-up, then cosine down to a tenth
    sft_warmup: int = 60  # warm-up steps
    sft_review_fraction: float = 0.1  # SFT conversations with a review turn, so the model knows the format
    sft_compile: bool = True  # torch.compile the SFT step in bf16 (several times faster on a CPU)
    model_preset: str = "tiny"  # size of the base model (scl/base.py PRESETS)
    blank_images: bool = False  # the text-only baseline: every image of the task is empty
    # --- two-turn rollouts on construct (generate.py's code) ---
    prompt: str = "vp2"  # review prompt that builds SelfCorSet: cp | vp1 | vp2 | vp3
    samples: int = 2  # rollouts per construct question (the paper: 1)
    temperature: float = 1.0  # rollout sampling temperature (0 = greedy, the paper's LLaVA decoding)
    top_p: float = 1.0  # nucleus sampling
    gen_batch_size: int = 256  # sequences per generation batch
    max_new_tokens: int = 128  # tokens per answer
    # --- DPO (stage dpo). The paper's LoRA recipe for a 7B model is --lr=5e-5 --beta=0.1 (see README) ---
    model: str = ""  # starting model folder: the policy's init and the frozen reference
    pairs: str = ""  # selfcorset.jsonl written by generate.py
    beta: float = 1.0  # DPO temperature
    sft_alpha: float = 0.1  # weight of NLL(chosen): (1 - a)·DPO + a·NLL (the paper's sft_beta)
    lr: float = 1e-3  # peak learning rate
    epochs: float = 3.0  # passes over the pairs
    batch_size: int = 16  # pairs per optimizer step, all ranks and micro-batches together
    micro_batch_size: int = 4  # pairs per forward/backward on one rank
    warmup_ratio: float = 0.03  # linear warm-up share of the steps, then linear decay to 0
    weight_decay: float = 0.01  # AdamW weight decay (matrices only)
    grad_clip: float = 0.5  # max global gradient norm
    lora: bool = True  # LoRA adapters (merged on export) instead of full fine-tuning
    lora_r: int = 8  # LoRA rank
    lora_alpha: float = 32.0  # LoRA scale alpha / r
    lora_dropout: float = 0.05  # dropout on the adapter input
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])  # the LLM's modules
    max_length: int = 2048  # prompt + response tokens; longer pairs are skipped, never truncated
    pair_fraction: float = 1.0  # train on this share of the pairs (the paper's data-size ablation)
    share_prefix: bool = True  # run image + prompt once for chosen and rejected
    grad_checkpointing: bool = False  # recompute decoder layers in backward to save memory
    dtype: str = "float32"  # the frozen weights: float32 | bfloat16 (LoRA, optimizer, log-probs, loss stay fp32)
    save_every: int = 50  # optimizer steps between checkpoints
    resume: bool = False  # continue from out_dir/checkpoints/last (made from the same inputs)
    max_nan_steps: int = 10  # abort after this many skipped non-finite steps
    stop_after: int = 0  # stop after this many optimizer steps (0 = run to the end)
    # --- evaluation of base vs SCL on test (eval.py's code) ---
    eval_prompts: list[str] = field(default_factory=lambda: ["cp", "vp1", "vp2", "vp3"])  # review prompts
    eval_rounds: int = 3  # K of the K-round curve
    eval_scl_prompts: bool = False  # also run the review prompts for the SCL model, not only for the base


# Settings each stage's output depends on: with the contents of its input files, its reuse key.
SFT_FIELDS = ("seed", "n_sft", "n_construct", "n_test", "sft_steps", "sft_batch_size", "sft_lr", "sft_warmup",
              "sft_review_fraction", "sft_compile", "model_preset", "blank_images")
DPO_FIELDS = ("seed", "beta", "sft_alpha", "lr", "epochs", "batch_size", "micro_batch_size", "warmup_ratio",
              "weight_decay", "grad_clip", "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
              "max_length", "pair_fraction", "share_prefix", "dtype")


def pick_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


# -----------------------------------------------------------------------------
# The whole experiment

def run_all(cfg: TrainConfig) -> dict:
    """Base model -> rollouts and SelfCorSet on construct -> DPO -> base vs SCL on test -> report.md.
    Every stage is the code a user runs by hand (train.py --stage=sft|dpo, generate.py, eval.py)."""
    from scl.evaluate import EvalConfig, experiment_report, run_eval
    from scl.selfcorrect import GenerateConfig, run_generate
    from scl.task import answer_analysis, reasoning_counts

    t0, out, seconds = time.time(), cfg.out_dir, {}
    data, base = os.path.join(out, "data"), os.path.join(out, "base")

    def timed(name, fn, *args):
        t = time.time()
        result = fn(*args)
        seconds[name] = round(time.time() - t, 1)
        return result

    sft = timed("sft", run_sft, cfg)
    gen = GenerateConfig(model=base, data=os.path.join(data, "construct.jsonl"), out_dir=os.path.join(out, "selfcorrect"),
                         prompt=cfg.prompt, rounds=2, samples=cfg.samples, temperature=cfg.temperature, top_p=cfg.top_p,
                         seed=cfg.seed, batch_size=cfg.gen_batch_size, max_new_tokens=cfg.max_new_tokens,
                         device=cfg.device)
    selfcorset = timed("rollouts", run_generate, gen)
    selfcorset["reasoned"] = reasoning_counts(gen.data, os.path.join(gen.out_dir, "responses.jsonl"))
    dpo_cfg = replace(cfg, stage="dpo", model=base, pairs=os.path.join(gen.out_dir, "selfcorset.jsonl"),
                      out_dir=os.path.join(out, "dpo"))
    dpo = timed("dpo", run_dpo, dpo_cfg) if selfcorset["pairs"] else {"steps": 0}
    scl = os.path.join(dpo_cfg.out_dir, "model") if selfcorset["pairs"] else None  # no flips, no SCL model
    ev = EvalConfig(model=base, compare=scl, data=os.path.join(data, "test.jsonl"), out_dir=os.path.join(out, "eval"),
                    prompts=cfg.eval_prompts, rounds=cfg.eval_rounds, compare_prompts=cfg.eval_scl_prompts,
                    curve_prompt=cfg.prompt, batch_size=cfg.gen_batch_size, max_new_tokens=cfg.max_new_tokens,
                    device=cfg.device, seed=cfg.seed)
    evaluation = timed("eval", run_eval, ev)
    analysis = {name: answer_analysis(ev.data, os.path.join(ev.out_dir, f"responses_{name}_sp.jsonl"))
                for name in (("base", "scl") if scl else ("model",))}  # why the accuracies differ
    result = {"sft": sft, "selfcorset": selfcorset, "dpo": dpo, "eval": evaluation, "analysis": analysis,
              "stage_seconds": seconds, "seconds": round(time.time() - t0, 1)}
    write_json(os.path.join(out, "metrics.json"), result)
    text = experiment_report(result)
    write_text(os.path.join(out, "report.md"), text)
    print("\n" + text)
    return result


# -----------------------------------------------------------------------------
# SFT: the built-in task's base model, trained from scratch

def run_sft(cfg: TrainConfig) -> dict:
    """Task files in out_dir/data/; tokenizer, base model, log and metrics in out_dir/base/."""
    from scl import base
    from scl.weights import save_vlm

    base_dir = os.path.join(cfg.out_dir, "base")
    key = fingerprint({k: getattr(cfg, k) for k in SFT_FIELDS})
    done = read_json(os.path.join(base_dir, "metrics.json"))
    if done and done.get("fingerprint") == key:
        print(f"sft: reusing {base_dir} (made with the same settings)")
        return done
    t0, device = time.time(), pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    tmp = base_dir + ".tmp"  # the finished folder appears only when complete
    model, blocks, pixel_values, image_of = base.prepare_sft(cfg, os.path.join(cfg.out_dir, "data"), tmp)
    model.to(device)
    optimizer = base.sft_optimizer(model, cfg.sft_lr)

    def loss_fn(ids, targets, pix):  # bf16 autocast when compiled on CPU (always on CUDA), fp32 logits
        on = device.type == "cuda" or cfg.sft_compile
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on):
            logits = model(ids, pixel_values=pix)  # (B, T, V)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    # One graph for every block length (dynamic shapes): a cold compile costs 30-70 s on 2 cores, so one
    # static graph per block would pay that several times. Footgun: build the RoPE table before
    # compiling, or the first call's cache insert fails a guard and compiles a second graph.
    model.language_model.model.inv_freq(device)
    step_fn = torch.compile(loss_fn, dynamic=True) if cfg.sft_compile else loss_fn
    # Footgun: inductor compiles the embedding's backward to atomic adds whose order varies between runs
    # on several threads, so one seed gave different bases; deterministic mode keeps the eager kernel.
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    gen, log = torch.Generator().manual_seed(cfg.seed), open(os.path.join(tmp, "log.jsonl"), "w")
    sizes = torch.tensor([len(rows) for rows, _, _ in blocks], dtype=torch.float)
    try:  # the mode is process-wide: put it back even if a step fails
        for step in (bar := tqdm(range(cfg.sft_steps), desc="sft")):
            # A batch comes from one length block, blocks drawn by size: every conversation equally likely.
            rows, ids, targets = blocks[int(torch.multinomial(sizes, 1, generator=gen))]
            idx = torch.randint(len(rows), (cfg.sft_batch_size,), generator=gen)
            lr = base.sft_lr_at(step, cfg.sft_steps, cfg.sft_warmup, cfg.sft_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["scale"]
            loss = step_fn(ids[idx].to(device), targets[idx].to(device), pixel_values[image_of[rows[idx]]].to(device))
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            log.write(json.dumps({"step": step + 1, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm}) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        log.close()
    save_vlm(model.eval(), tmp)
    result = {"fingerprint": key, "seconds": round(time.time() - t0, 1), "final_loss": loss.item(),
              "parameters": sum(p.numel() for p in model.parameters())}
    write_json(os.path.join(tmp, "metrics.json"), result)
    atomic_write(base_dir, lambda t: os.replace(tmp, t))
    print(f"sft: {result['parameters'] / 1e6:.2f}M parameters, loss {result['final_loss']:.3f}, "
          f"{result['seconds']:.0f} s -> {base_dir}")
    return result


# -----------------------------------------------------------------------------
# DPO on SelfCorSet. Data parallel by hand: torchrun sets RANK and WORLD_SIZE, each rank scores its
# share of a step's pairs, and one all_reduce sums the flattened gradients (what DDP does, visibly).

def init_distributed(device) -> tuple[int, int]:
    if "RANK" not in os.environ:
        return 0, 1
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then linear decay to 0 (the paper's ms-swift `linear` schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def run_dpo(cfg: TrainConfig) -> dict:
    """DPO from cfg.model on cfg.pairs; the tuned model (LoRA merged) is written to out_dir/model/."""
    from scl.dpo import read_pairs, reference_logps
    from scl.evaluate import summarize_log
    from scl.lora import add_lora, merge_lora
    from scl.weights import CheckpointError, copy_processor_files, load_model_dir, save_vlm

    device = pick_device(cfg.device)
    rank, world = init_distributed(device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
    if not os.path.isfile(cfg.pairs):
        sys.exit(f"error: pairs file not found: {cfg.pairs!r} (pass --pairs=FILE)")
    if not cfg.lora and cfg.dtype != "float32":  # AdamW's small steps would round away in 16-bit weights
        sys.exit(f"error: --dtype={cfg.dtype} trains LoRA adapters (kept in fp32) only: pass --lora=true or --dtype=float32")
    try:
        model, tok, proc = load_model_dir(cfg.model, dtype=getattr(torch, cfg.dtype), device=device)
    except (OSError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    pairs, skipped = read_pairs(cfg.pairs, tok, proc, model.config.num_image_tokens, cfg.max_length)
    images = sorted({p["image_path"] for p in pairs})
    key = fingerprint({k: getattr(cfg, k) for k in DPO_FIELDS}, files=[cfg.pairs, *images], models=[cfg.model])
    out = cfg.out_dir
    done = read_json(os.path.join(out, "metrics.json"))
    if done and done.get("fingerprint") == key and os.path.isdir(os.path.join(out, "model")):
        print(f"dpo: reusing {out} (made from the same model, pairs and settings)")
        return done
    if not pairs:
        sys.exit(f"error: no usable pairs in {cfg.pairs} ({len(skipped)} skipped, first reason: "
                 f"{skipped[0]['reason'] if skipped else 'empty file'})")
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    if rank == 0:
        write_json(os.path.join(out, "config.json"), asdict(cfg))
        write_text(os.path.join(out, "skipped.jsonl"), "".join(json.dumps(s) + "\n" for s in skipped))
    n = max(1, round(len(pairs) * cfg.pair_fraction))  # a seeded subset, in file order
    train = [pairs[i] for i in sorted(random.Random(cfg.seed).sample(range(len(pairs)), n))]

    # The reference: the frozen starting model, scored once (before any adapter exists) and cached by the
    # fingerprint of the model and the pairs file.
    ref_key = fingerprint({"max_length": cfg.max_length, "dtype": cfg.dtype}, files=[cfg.pairs, *images],
                          models=[cfg.model])
    cached = read_json(os.path.join(out, "reference_logps.json")) or {}
    reference = {k: tuple(v) for k, v in cached.get("logps", {}).items()}
    if cached.get("fingerprint") != ref_key or any(p["id"] not in reference for p in train):
        reference = reference_logps(model, train, tok.pad_token_id, cfg.micro_batch_size, cfg.share_prefix)
        if rank == 0:
            write_json(os.path.join(out, "reference_logps.json"), {"fingerprint": ref_key, "logps": reference})

    # Trainable parameters: LoRA adapters on the LLM's q/k/v (the paper), or everything.
    torch.manual_seed(cfg.seed)  # the adapters' init
    if cfg.lora:
        add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=tuple(cfg.lora_targets))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # by name, as checkpoints store them
    model.language_model.model.grad_checkpointing = cfg.grad_checkpointing
    optimizer = torch.optim.AdamW([
        {"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}], lr=cfg.lr)
    log = train_dpo(cfg, model, params, optimizer, train, reference, tok.pad_token_id, key, rank, world)
    if log is None:  # stopped early (--stop_after): the checkpoint holds the run
        return {}

    # Export: adapters folded into the weights, a plain checkpoint any LLaVA loader reads.
    if world > 1:  # every rank must hold the same weights, or the all_reduce was wrong
        flat = torch.cat([p.detach().reshape(-1).double() for p in params.values()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if not all(torch.equal(g, gathered[0]) for g in gathered):
            sys.exit("error: ranks ended with different weights")
    if rank != 0:
        return {}
    if cfg.lora:
        merge_lora(model)
    export = os.path.join(out, "model")
    save_vlm(model.eval(), export)
    copy_processor_files(cfg.model, export)
    result = summarize_log(log, ("loss", "rewards/margins", "rewards/accuracies"), os.path.join(out, "dpo.png"))
    result.update(fingerprint=key, pairs_train=len(train), pairs_skipped=len(skipped), seconds=round(time.time() - t0, 1))
    write_json(os.path.join(out, "metrics.json"), result)
    print(f"dpo: {len(train)} pairs, {result['steps']} steps, {result['seconds']:.0f} s -> {export}")
    return result


def train_dpo(cfg, model, params, optimizer, pairs, reference, pad_id, key, rank, world):
    """The loop. Returns the metrics of every step, or None when stopped by --stop_after."""
    from scl.dpo import batch_loss

    steps_per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    total = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    warmup = max(1, round(cfg.warmup_ratio * total))
    ckpt, log_path = os.path.join(cfg.out_dir, "checkpoints", "last"), os.path.join(cfg.out_dir, "log.jsonl")
    start, nan_steps, log = 0, 0, []
    if cfg.resume and os.path.isdir(ckpt):
        trainable, state = load_checkpoint(ckpt)
        if state.get("fingerprint") != key:
            sys.exit(f"error: {ckpt} was made from other inputs (model, pairs or settings); drop --resume")
        model.load_state_dict(trainable, strict=False)  # the trainable tensors, in place
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, nan_steps = state["step"], state["nan_steps"]
        log = [r for r in read_jsonl(log_path) if r["step"] <= start]
    if rank == 0:
        write_jsonl(log_path, log)  # a fresh log, or the resumed run's steps so far
    model.train()
    for step in (bar := tqdm(range(start, total), desc="dpo", disable=rank != 0, initial=start, total=total)):
        # A fixed permutation per epoch, so a resumed run sees the same batches.
        epoch, i = divmod(step, steps_per_epoch)
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        group = [pairs[j] for j in order[i * cfg.batch_size:(i + 1) * cfg.batch_size].tolist()]
        sums = {}
        for m in range(rank * cfg.micro_batch_size, len(group), world * cfg.micro_batch_size):  # this rank's share
            chunk = group[m:m + cfg.micro_batch_size]
            loss, metrics = batch_loss(model, chunk, reference, pad_id, beta=cfg.beta, sft_alpha=cfg.sft_alpha,
                                       share_prefix=cfg.share_prefix)
            (loss * len(chunk) / len(group)).backward()  # summed over micro-batches and ranks: the batch mean
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * len(chunk)
        # All ranks agree on the step: gradients and metrics summed, one finiteness test.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        keys = sorted(sums)
        stats = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=flat.device)
        if dist.is_initialized():
            dist.all_reduce(flat)
            dist.all_reduce(stats)
        metrics = {k: v / len(group) for k, v in zip(keys, stats.tolist())}
        if not (torch.isfinite(flat).all() and math.isfinite(metrics["loss"])):
            nan_steps += 1
            optimizer.zero_grad(set_to_none=True)
            print(f"dpo: step {step + 1} is not finite, skipped ({nan_steps}/{cfg.max_nan_steps})")
            if nan_steps >= cfg.max_nan_steps:
                sys.exit(f"error: {nan_steps} non-finite DPO steps; lower --lr or check the pairs")
            continue
        for p, g in zip(params.values(), flat.split([p.numel() for p in params.values()])):
            p.grad = g.view_as(p).to(p.dtype)
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip).item()
        lr = lr_at(step, total, warmup, cfg.lr)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.append({**metrics, "step": step + 1, "lr": lr, "grad_norm": grad_norm, "epoch": (step + 1) / steps_per_epoch})
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", margin=f"{metrics['rewards/margins']:.3f}")
        done, stop = step + 1, cfg.stop_after and step + 1 - start >= cfg.stop_after
        if rank == 0:
            with open(log_path, "a") as f:  # a line per step: a crash loses at most the step in flight
                f.write(json.dumps(log[-1]) + "\n")
            if done % cfg.save_every == 0 or done == total or stop:
                state = {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "step": done,
                         "nan_steps": nan_steps, "fingerprint": key}
                save_checkpoint(ckpt, params, state)
        if stop and done < total:
            return None
    return log


# -----------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_cli(TrainConfig, argv)
    print(to_json(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    stages = {"all": run_all, "sft": run_sft, "dpo": run_dpo}
    if cfg.stage not in stages:
        sys.exit(f"error: unknown --stage={cfg.stage} (all | sft | dpo)")
    return stages[cfg.stage](cfg)


if __name__ == "__main__":
    main()
