"""`python train.py` (scl/experiment.py) end to end on a miniature config: every stage runs, every
expected file is written, and a second run reuses the stages instead of recomputing them."""
import json
import os

import pytest

import train

# ~150 micro SFT steps: enough for the model to write `## X ##` answers, so flips and pairs exist and
# the DPO stage runs (seeded: 29 pairs here).
MINI = ["--n_sft=600", "--n_construct=24", "--n_test=24", "--sft_steps=150", "--sft_batch_size=16",
        "--sft_warmup=10", "--sft_lr=5e-3", "--model_preset=micro", "--sft_describe_first=false", "--sft_compile=false", "--samples=4", "--gen_batch_size=96",
        "--max_new_tokens=48", "--batch_size=4", "--micro_batch_size=4", "--epochs=1", "--eval_rounds=3",
        "--eval_prompts=cp,vp1", "--device=cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "run"
    train.main([f"--out_dir={out}"] + MINI)
    return out


def test_every_stage_writes_its_files(run):
    for rel in ("data/sft.jsonl", "data/construct.jsonl", "data/test.jsonl", "base/config.json",
                "base/model.safetensors", "base/tokenizer.json", "base/tokenizer_config.json",
                "base/preprocessor_config.json", "base/metrics.json", "selfcorrect/responses.jsonl",
                "selfcorrect/selfcorset.jsonl", "selfcorrect/summary.json", "eval/metrics.json", "eval/report.md",
                "eval/eval.png", "report.md", "metrics.json"):
        assert os.path.exists(run / rel), rel
    m = json.load(open(run / "metrics.json"))
    assert 0 <= m["base"]["test_accuracy"] <= 1 and m["seconds"] > 0 and "p_value" in m
    summary = json.load(open(run / "selfcorrect" / "summary.json"))
    assert summary["rollouts"] == 24 * 4
    assert summary["pairs"] > 0  # so the DPO stage ran, and its model was compared with the base
    r = m["selfcorset"]["reasoned"]  # the reasoning check counts what the rollouts hold
    assert r["right"] == summary["correct"]["turn1"] + summary["correct"]["turn2"]
    assert 0 <= r["right_reasoned"] <= r["right"] and 0 <= r["chosen_reasoned"] <= summary["pairs"]
    report = open(run / "report.md").read()
    assert "right answers in the rollouts" in report
    assert f"Only {summary['pairs']} pairs: on the built-in task SCL needed thousands" in report  # a few pairs
    assert os.path.exists(run / "dpo" / "model" / "model.safetensors")
    assert json.load(open(run / "dpo" / "metrics.json"))["steps"] >= 1
    assert 0 <= m["scl"]["test_accuracy"] <= 1 and 0 <= m["p_value"] <= 1
    ev = json.load(open(run / "eval" / "metrics.json"))
    first = ev.get("base") or ev["model"]
    assert set(first["prompts"]) == {"cp", "vp1"} and len(first["rounds"]["accuracy"]) == 3


def test_second_run_reuses_every_stage(run, capsys):
    before = os.path.getmtime(run / "base" / "model.safetensors")
    train.main([f"--out_dir={run}"] + MINI)
    out = capsys.readouterr().out
    assert "sft: reusing" in out and "dpo: reusing" in out and "eval: reusing" in out
    assert os.path.getmtime(run / "base" / "model.safetensors") == before


def test_saved_base_loads_in_transformers(run):
    """Issue 4, Show 4: the base model the pipeline trained is an ordinary checkpoint folder: transformers
    loads its weights (no missing or unexpected keys), tokenizer and image processor, and gives our logits
    on a real test question."""
    import torch

    import hf_fixtures as hx
    from scl.data import load_rows
    from scl.selfcorrect import conversation, load_model_dir, turn1
    from scl.tokenizer import render_chat

    transformers = hx._quiet_transformers()
    base = str(run / "base")
    ours, tok, proc = load_model_dir(base)
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        base, attn_implementation="sdpa", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    rows, _ = load_rows(str(run / "data" / "test.jsonl"))
    row = rows[0]
    messages = conversation(turn1(row), [], None)
    ids, _ = render_chat(tok, messages, ours.config.num_image_tokens, add_generation_prompt=True)
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
