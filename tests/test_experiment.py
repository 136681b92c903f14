"""`python train.py` end to end on a miniature config: every stage runs and writes its files; a re-run
with the same inputs reuses every stage in seconds; new base weights (same path, same settings) redo
every stage made from them; the base model is an ordinary checkpoint transformers loads."""
import json
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import train

# ~150 micro SFT steps: enough for the model to write `## X ##` answers, so flips and pairs exist and
# the DPO stage runs.
MINI = ["--n_sft=600", "--n_construct=24", "--n_test=24", "--sft_steps=150", "--sft_batch_size=16",
        "--sft_warmup=10", "--sft_lr=5e-3", "--model_preset=micro", "--sft_compile=false", "--samples=4",
        "--gen_batch_size=96", "--max_new_tokens=100", "--batch_size=4", "--micro_batch_size=4", "--epochs=1",
        "--eval_rounds=3", "--eval_prompts=cp,vp1", "--device=cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "run"
    train.main([f"--out_dir={out}"] + MINI)
    return out


def test_every_stage_writes_its_files(run):
    for rel in ("data/sft.jsonl", "data/construct.jsonl", "data/test.jsonl", "base/config.json",
                "base/model.safetensors", "base/tokenizer.json", "base/tokenizer_config.json",
                "base/preprocessor_config.json", "base/metrics.json", "selfcorrect/responses.jsonl",
                "selfcorrect/selfcorset.jsonl", "selfcorrect/summary.json", "dpo/model/model.safetensors",
                "dpo/log.jsonl", "dpo/dpo.png", "eval/metrics.json", "eval/report.md", "eval/eval.png", "report.md",
                "metrics.json"):
        assert os.path.exists(run / rel), rel
    m = json.load(open(run / "metrics.json"))
    summary = json.load(open(run / "selfcorrect" / "summary.json"))
    assert summary["rollouts"] == 24 * 4
    assert summary["pairs"] > 0 and m["dpo"]["steps"] >= 1  # so the DPO stage ran and SCL was compared
    r = m["selfcorset"]["reasoned"]  # the reasoning check counts what the rollouts hold
    assert r["right"] == summary["correct"]["turn1"] + summary["correct"]["turn2"]
    assert 0 <= r["right_reasoned"] <= r["right"] and 0 <= r["chosen_reasoned"] <= summary["pairs"]
    c = m["eval"]["comparison"]
    assert c["questions"] == 24 and 0 <= c["p_value"] <= 1
    assert set(m["eval"]["base"]["prompts"]) == {"cp", "vp1"} and len(m["eval"]["base"]["rounds"]["accuracy"]) == 3
    report = open(run / "report.md").read()
    assert "| base (SFT) |" in report and "| SCL (DPO on SelfCorSet) |" in report and "| vp1 |" in report
    config = json.load(open(run / "dpo" / "config.json"))
    assert config["lr"] == 1e-3 and config["beta"] == 1.0  # the flags' values are the values used


def test_an_unchanged_rerun_reuses_every_stage_in_seconds(run, capsys):
    before = {p: os.path.getmtime(run / p) for p in ("base/model.safetensors", "dpo/model/model.safetensors",
                                                      "eval/metrics.json")}
    t0 = time.time()
    result = train.main([f"--out_dir={run}"] + MINI)
    assert time.time() - t0 <= 10
    out = capsys.readouterr().out
    assert "sft: reusing" in out and "dpo: reusing" in out and "eval: reusing" in out
    assert result["selfcorset"]["generated_tokens"] == 0  # every rollout was already on disk
    assert all(os.path.getmtime(run / p) == t for p, t in before.items())


def test_new_base_weights_redo_every_stage_made_from_them(run, tmp_path, capsys):
    """A copy of the run reuses everything (fingerprints hash contents, not paths); the same copy with
    one base weight changed keeps the SFT stage (its inputs are settings) and redoes the rest."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    train.main([f"--out_dir={copy}"] + MINI)
    assert capsys.readouterr().out.count("reusing") == 4  # sft, rollouts, dpo, eval
    weights = load_file(copy / "base" / "model.safetensors")
    name = "language_model.lm_head.weight"
    save_file({**weights, name: weights[name] * 1.5}, copy / "base" / "model.safetensors", metadata={"format": "pt"})
    result = train.main([f"--out_dir={copy}"] + MINI)
    out = capsys.readouterr().out
    assert "sft: reusing" in out and "dpo: reusing" not in out and "eval: reusing" not in out
    assert "starting over" in out and result["selfcorset"]["generated_tokens"] > 0
    old = json.load(open(run / "eval" / "metrics.json"))
    assert result["eval"]["fingerprint"] != old["fingerprint"]
    assert result["dpo"]["fingerprint"] != json.load(open(run / "dpo" / "metrics.json"))["fingerprint"]


def test_saved_base_loads_in_transformers(run):
    """The base model the pipeline trained is an ordinary checkpoint folder: transformers loads its
    weights (no missing or unexpected keys), tokenizer and image processor, and gives our logits on a
    real test question."""
    import hf_fixtures as hx
    from scl.data import load_rows
    from scl.selfcorrect import conversation, turn1
    from scl.tokenizer import render_chat
    from scl.weights import load_model_dir

    transformers = hx._quiet_transformers()
    base = str(run / "base")
    ours, tok, proc = load_model_dir(base)
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        base, attn_implementation="sdpa", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    rows, _ = load_rows(str(run / "data" / "test.jsonl"))
    row = rows[0]
    ids, _ = render_chat(tok, conversation(turn1(row), [], None), ours.config.num_image_tokens,
                         add_generation_prompt=True)
    hf_tok = transformers.AutoTokenizer.from_pretrained(base)
    text = tok.backend.decode(ids, skip_special_tokens=False)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids  # same vocabulary and specials
    pixel_values = proc([row.image])  # (1, 3, S, S)
    hf_pixels = transformers.CLIPImageProcessorPil.from_pretrained(base)(row.image, return_tensors="pt")["pixel_values"]
    assert (hf_pixels - pixel_values).abs().max() <= 1e-5
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        want = hf(input_ids=input_ids, pixel_values=pixel_values).logits
        got = ours(input_ids, pixel_values=pixel_values)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
