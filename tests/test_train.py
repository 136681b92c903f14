"""train.py --stage=dpo: the plain loop's promises on a tiny random model.

Resume replays the uninterrupted run bit for bit; torchrun with 2 ranks (gloo) equals one process with
the same global batch; a non-finite step is skipped and counted, and too many abort with a message;
bad pairs are skipped with reasons; a missing or empty pairs file stops with one line.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import train
from tests.test_selfcorrect import make_model_dir, make_rows, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model folder and a SelfCorSet file of 12 hand-written pairs."""
    root = tmp_path_factory.mktemp("dpo")
    model = make_model_dir(root / "model")
    rows = make_rows(root, n=12)
    pairs = []
    for i, r in enumerate(rows):
        from scl.prompts import turn1_message
        right, wrong = r["answer"], "ABCD"[("ABCD".index(r["answer"]) + 1) % 4]
        pairs.append({"id": r["id"], "image": r["image"], "prompt": turn1_message(r["question"], r["options"]),
                      "chosen": f"The square is {r['options']['ABCD'.index(right)]}. ## {right} ##",
                      "rejected": f"The square is {r['options']['ABCD'.index(wrong)]}. ## {wrong} ##",
                      "type": 2 + i % 2})
    path = write_jsonl(root / "selfcorset.jsonl", pairs)
    return root, model, path


def config(root, model, pairs, out, **kw):
    base = dict(stage="dpo", model=model, pairs=pairs, out_dir=str(root / out), lr=1e-3, epochs=2.0, batch_size=4,
                micro_batch_size=2, save_every=100, device="cpu", max_new_tokens=16)
    return train.TrainConfig(**{**base, **kw})


def losses(out_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(out_dir, "log.jsonl"))]


def test_dpo_learns_and_exports_a_plain_checkpoint(setup):
    root, model, pairs = setup
    cfg = config(root, model, pairs, "learn", epochs=6.0, lr=3e-3)
    result = train.run_dpo(cfg)
    log = [json.loads(line) for line in open(os.path.join(cfg.out_dir, "log.jsonl"))]
    assert log[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # step 1: policy == reference
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "step"):
        assert key in log[0]
    assert result["last/rewards/margins"] > result["first/rewards/margins"]
    assert result["last/loss"] < result["first/loss"]
    from scl.weights import load_vlm
    exported = load_vlm(os.path.join(cfg.out_dir, "model"))  # merged LoRA: plain names, strict load
    assert not any("lora" in n for n, _ in exported.named_parameters())
    assert os.path.exists(os.path.join(cfg.out_dir, "dpo.png"))


def test_resume_replays_the_uninterrupted_run_bitwise(setup):
    root, model, pairs = setup
    straight = config(root, model, pairs, "straight", epochs=2.0)  # 12 pairs / 4 = 3 steps per epoch: 6 steps
    train.run_dpo(straight)
    first = config(root, model, pairs, "resumed", epochs=2.0, stop_after=3)
    train.run_dpo(first)
    assert len(losses(first.out_dir)) == 3
    train.run_dpo(config(root, model, pairs, "resumed", epochs=2.0, resume=True))
    assert losses(first.out_dir) == losses(straight.out_dir)  # bitwise, dropout RNG included
    a = open(os.path.join(straight.out_dir, "model", "model.safetensors"), "rb").read()
    b = open(os.path.join(first.out_dir, "model", "model.safetensors"), "rb").read()
    assert a == b


def test_non_finite_steps_are_skipped_counted_and_abort(setup, monkeypatch):
    root, model, pairs = setup
    import scl.dpo
    real = scl.dpo.dpo_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        loss, m = real(*a, **k)
        calls["n"] += 1
        if calls["n"] in (3, 4):  # both micro-batches of the second step
            return loss * float("nan"), {**m, "loss": float("nan")}
        return loss, m

    monkeypatch.setattr(scl.dpo, "dpo_loss", flaky)
    cfg = config(root, model, pairs, "nan", epochs=1.0)
    train.run_dpo(cfg)
    steps = [json.loads(line)["step"] for line in open(os.path.join(cfg.out_dir, "log.jsonl"))]
    assert steps == [1, 3]  # step 2 skipped
    calls["n"] = 0
    with pytest.raises(SystemExit, match="non-finite"):
        train.run_dpo(config(root, model, pairs, "nan2", epochs=1.0, max_nan_steps=1))


def test_bad_pairs_are_skipped_with_reasons(setup, tmp_path):
    root, model, pairs = setup
    rows = [json.loads(line) for line in open(pairs)]
    bad = [dict(rows[0], chosen="  "), dict(rows[1], image="img/missing.png"), dict(rows[2], prompt="word " * 3000)]
    path = write_jsonl(root / "bad.jsonl", rows[3:] + bad, extra_lines=["{not json"])
    cfg = config(root, model, path, "bad", epochs=1.0)
    result = train.run_dpo(cfg)
    reasons = [json.loads(line)["reason"] for line in open(os.path.join(cfg.out_dir, "skipped.jsonl"))]
    assert result["pairs_skipped"] == 4
    assert any("empty chosen" in r for r in reasons)
    assert any("unreadable" in r for r in reasons)
    assert any("max_length" in r for r in reasons)
    assert any("malformed" in r for r in reasons)


@pytest.mark.parametrize("content", [None, ""])
def test_missing_or_empty_pairs_file_is_one_line_error(setup, tmp_path, content):
    root, model, _ = setup
    path = tmp_path / "pairs.jsonl"
    if content is not None:
        path.write_text(content)
    proc = subprocess.run([sys.executable, "train.py", "--stage=dpo", f"--model={model}", f"--pairs={path}",
                           f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


def test_torchrun_two_ranks_equals_one_process(setup):
    root, model, pairs = setup
    common = [f"--model={model}", f"--pairs={pairs}", "--stage=dpo", "--lr=1e-3", "--epochs=2", "--batch_size=4",
              "--micro_batch_size=2", "--lora_dropout=0", "--device=cpu", "--threads=1"]
    one = root / "one"
    subprocess.run([sys.executable, "train.py", f"--out_dir={one}"] + common, cwd=ROOT, check=True,
                   capture_output=True)
    two = root / "two"
    with socket.socket() as s:  # a port free now, not a fixed one another job may hold
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           "train.py", f"--out_dir={two}"] + common, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6
    assert json.load(open(two / "metrics.json"))["steps"] == 6  # the ranks ended in sync, or the run would stop
    assert sorted(os.listdir(one)) == sorted(os.listdir(two))  # rank 1 wrote nothing extra


def test_gradient_checkpointing_gives_the_same_losses(setup):
    root, model, pairs = setup
    plain = config(root, model, pairs, "ckpt_off", epochs=1.0, lora_dropout=0.0)
    ckpt = config(root, model, pairs, "ckpt_on", epochs=1.0, lora_dropout=0.0, grad_checkpointing=True)
    train.run_dpo(plain)
    train.run_dpo(ckpt)
    assert max(abs(a - b) for a, b in zip(losses(plain.out_dir), losses(ckpt.out_dir))) < 1e-6


@pytest.mark.slow
def test_compiled_sft_repeats_bit_for_bit(tmp_path):
    """The same seed gives the same base model: two compiled SFT runs (2 threads) write identical logs.
    Without deterministic mode inductor's atomic adds in the embedding backward made them drift by step 2."""
    if torch.get_num_threads() < 2:
        pytest.skip("atomic adds only race with 2+ threads")
    kw = dict(stage="sft", n_sft=400, n_construct=8, n_test=8, sft_steps=5, sft_batch_size=32, sft_warmup=2,
              model_preset="micro", sft_compile=True, max_new_tokens=8, device="cpu")
    logs = []
    for name in ("a", "b"):
        train.run_sft(train.TrainConfig(out_dir=str(tmp_path / name), **kw))
        logs.append((tmp_path / name / "base" / "log.jsonl").read_text())
    assert logs[0] == logs[1]
    assert not torch.are_deterministic_algorithms_enabled()  # the mode is set for the SFT loop only


def test_bf16_dpo_learns_with_fp32_scores_close_to_the_fp32_model(setup):
    """--dtype=bfloat16: the frozen weights in bf16, adapters, optimizer, log-probs and loss in fp32. The
    run learns (loss falls, margins grow), its step-0 reference log-probs are within 0.01 nats per
    response token of the fp32 model's, and the export is a bf16 checkpoint."""
    from scl.dpo import read_pairs, reference_logps
    from scl.weights import load_model_dir, load_vlm

    root, model, pairs = setup
    # Every step is the whole set (12 pairs), so the loss is measured on the same pairs each time. Few
    # steps: on a model this small bf16 matmuls cost more than fp32 ones (per-call overhead).
    cfg = config(root, model, pairs, "bf16", epochs=5.0, lr=1e-2, batch_size=12, micro_batch_size=6,
                 dtype="bfloat16")
    train.run_dpo(cfg)
    log = [json.loads(line) for line in open(os.path.join(cfg.out_dir, "log.jsonl"))]
    assert len(log) == 5
    assert abs(log[0]["rewards/margins"]) < 1e-3  # step 1: policy == reference up to bf16 batch order
    assert log[-1]["loss"] < log[0]["loss"] - 0.02
    assert log[-1]["rewards/margins"] > log[0]["rewards/margins"] + 0.05
    from scl.files import load_checkpoint
    trainable, state = load_checkpoint(os.path.join(cfg.out_dir, "checkpoints", "last"))
    assert trainable and all(v.dtype == torch.float32 for v in trainable.values())  # the adapters
    moments = [s for st in state["optimizer"]["state"].values() for s in st.values() if s.dim()]
    assert moments and all(s.dtype == torch.float32 for s in moments)  # AdamW's exp_avg, exp_avg_sq
    exported = load_vlm(os.path.join(cfg.out_dir, "model"), dtype=torch.bfloat16)
    assert json.load(open(os.path.join(cfg.out_dir, "model", "config.json")))["dtype"] == "bfloat16"
    assert not any("lora" in n for n, _ in exported.named_parameters())

    fp32, tok, proc = load_model_dir(model)
    encoded, _ = read_pairs(pairs, tok, proc, fp32.config.num_image_tokens, cfg.max_length)
    want = reference_logps(fp32, encoded, tok.pad_token_id, batch_size=4)
    got = json.load(open(os.path.join(cfg.out_dir, "reference_logps.json")))["logps"]
    for p in encoded:
        for side, k in (("chosen", 0), ("rejected", 1)):
            assert abs(got[p["id"]][k] - want[p["id"]][k]) / len(p[f"{side}_ids"]) < 0.01, (p["id"], side)
