"""generate.py / scl.selfcorrect.run_generate: the files a run leaves, bad rows skipped with their
reason, one-line errors, resume equal to an uninterrupted run (sampling included), --format."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import scl.selfcorrect as sc
from scl.cli import parse_cli
from test_selfcorrect import SCRIPT, loaded, make_rows, model_dir, scripted, write_jsonl  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def run(model_dir, data, out_dir, loaded=None, **flags):
    cfg = sc.GenerateConfig(model=model_dir, data=str(data), out_dir=str(out_dir), **flags)
    model, tok, proc = loaded if loaded else (None, None, None)
    return sc.run_generate(cfg, model=model, tok=tok, processor=proc)


def cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


# ---------------------------------------------------------------------------- a whole run

def test_run_writes_responses_pairs_summary_and_config(tmp_path, model_dir, loaded, monkeypatch):
    monkeypatch.setattr(sc, "generate", scripted(loaded[1], SCRIPT))
    rows = make_rows(tmp_path / "data", 4)  # the data in its own folder: image paths must be rebased
    data = write_jsonl(tmp_path / "data" / "set.jsonl", rows)
    out = tmp_path / "out"
    summary = run(model_dir, data, out, loaded, batch_size=3)

    responses = read(out / "responses.jsonl")
    assert [(r["id"], r["sample"], r["gold"], r["type"]) for r in responses] == [
        ("q0", 0, "A", 4), ("q1", 0, "B", 2), ("q2", 0, "C", 3), ("q3", 0, "D", None)]
    assert responses[1]["turns"][1] == {"text": "On review ## B ##", "answer": "B", "correct": True}
    pairs = read(out / "selfcorset.jsonl")
    assert [(p["id"], p["type"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("q1", 2, "On review ## B ##", "## A ##"), ("q2", 3, "## C ##", "Hmm ## D ##")]
    for p in pairs:  # image paths are relative to the folder of selfcorset.jsonl
        assert os.path.samefile(out / p["image"], tmp_path / "data" / "img" / f"{p['id']}.png")
    assert read(out / "skipped.jsonl") == []
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["types"] == summary["types"] == {"1": 0, "2": 1, "3": 1, "4": 1, "unparsed": 1}
    assert on_disk["accuracy"] == {"turn1": 0.25, "turn2": 0.5} and on_disk["unparsed"] == {"turn1": 1, "turn2": 0}
    assert on_disk["pairs"] == 2 and on_disk["skipped"] == 0
    assert {"seconds", "tokens_per_s", "generated_tokens"} <= set(on_disk)
    config = json.loads((out / "config.json").read_text())
    assert config["batch_size"] == 3 and config["prompt"] == "vp2" and config["fingerprint"] == on_disk["fingerprint"]


# ---------------------------------------------------------------------------- bad input

def _corrupt(folder):
    with open(os.path.join(folder, "img", "q1.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not an image")


BAD_ROWS = {  # name -> (how to spoil row q1 or add a line, a word its reason must hold)
    "missing image": (lambda rows, folder: rows[1].update(image="img/nowhere.png"), "image"),
    "corrupt image": (lambda rows, folder: _corrupt(folder), "image"),
    "no options": (lambda rows, folder: rows[1].pop("options"), "option"),
    "gold outside options": (lambda rows, folder: rows[1].update(options=["red", "green"], answer="D"), "answer"),
}


@pytest.mark.parametrize("name", list(BAD_ROWS) + ["malformed json"])
def test_a_bad_row_is_skipped_with_its_reason_and_the_rest_runs(name, tmp_path, model_dir, loaded, monkeypatch):
    monkeypatch.setattr(sc, "generate", scripted(loaded[1], SCRIPT))
    rows = make_rows(tmp_path, 4)
    extra = []
    if name == "malformed json":
        extra = ['{"id": "q9", "image": "img/q0.png", "question": "Question q9: ?"']  # cut short
    else:
        spoil, word = BAD_ROWS[name]
        spoil(rows, tmp_path)
    summary = run(model_dir, write_jsonl(tmp_path / "set.jsonl", rows, extra), tmp_path / "out", loaded)
    skipped = read(tmp_path / "out" / "skipped.jsonl")
    assert len(skipped) == 1 and summary["skipped"] == 1
    if name == "malformed json":
        assert "json" in skipped[0]["reason"].lower()
    else:
        assert skipped[0]["id"] == "q1" and word in skipped[0]["reason"].lower()
    done = [r["id"] for r in read(tmp_path / "out" / "responses.jsonl")]
    assert done == (["q0", "q1", "q2", "q3"] if name == "malformed json" else ["q0", "q2", "q3"])


def test_duplicate_ids_and_too_long_rows_are_skipped(tmp_path, model_dir, loaded, monkeypatch):
    monkeypatch.setattr(sc, "generate", scripted(loaded[1], SCRIPT))
    rows = make_rows(tmp_path, 4)
    rows[2]["question"] = "Question q2: " + "which colour is the square? " * 200
    rows.append(dict(rows[0]))
    summary = run(model_dir, write_jsonl(tmp_path / "set.jsonl", rows), tmp_path / "out", loaded)
    reasons = {s["id"]: s["reason"] for s in read(tmp_path / "out" / "skipped.jsonl")}
    assert reasons.keys() == {"q0", "q2"} and "duplicate" in reasons["q0"] and "too long" in reasons["q2"]
    assert summary["rollouts"] == 3


def test_missing_data_or_model_is_a_one_line_error(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "set.jsonl", make_rows(tmp_path, 1))
    for args in ([f"--model={model_dir}", f"--data={tmp_path}/nope.jsonl", f"--out_dir={tmp_path}/o"],
                 [f"--model={tmp_path}/no_model", f"--data={data}", f"--out_dir={tmp_path}/o"]):
        p = cli(*args)
        assert p.returncode != 0 and "Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "not found" in p.stderr, p.stderr


def test_a_bad_flag_value_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse_cli(sc.GenerateConfig, ["--model=m", "--data=d", "--out_dir=o", "--prompt=vp7"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().count("\n") == 0


# ---------------------------------------------------------------------------- resume

class Crash(Exception):
    pass


def test_resume_after_a_crash_equals_an_uninterrupted_sampled_run(tmp_path, model_dir, loaded, monkeypatch):
    data = write_jsonl(tmp_path / "set.jsonl", make_rows(tmp_path, 5))
    flags = dict(prompt="vp3", samples=2, temperature=1.0, top_p=0.95, seed=3, batch_size=3, max_new_tokens=5)
    run(model_dir, data, tmp_path / "full", loaded, **flags)

    calls, real = [0], sc.generate

    def crashing(*args, **kw):  # dies in the 4th generate() call: turn 2 of batch 2
        calls[0] += 1
        if calls[0] == 4:
            raise Crash
        return real(*args, **kw)
    monkeypatch.setattr(sc, "generate", crashing)
    with pytest.raises(Crash):
        run(model_dir, data, tmp_path / "part", loaded, **flags)
    assert len(read(tmp_path / "part" / "responses.jsonl")) == 3  # batch 1 was written as produced
    with open(tmp_path / "part" / "responses.jsonl", "a") as f:
        f.write('{"id": "q4", "sample": 1, "gold": "A", "tur')  # a line cut short by the crash
    monkeypatch.setattr(sc, "generate", real)
    summary = run(model_dir, data, tmp_path / "part", loaded, **flags)

    for name in ("responses.jsonl", "selfcorset.jsonl", "skipped.jsonl"):
        assert (tmp_path / "part" / name).read_text() == (tmp_path / "full" / name).read_text(), name
    assert summary["rollouts"] == 10
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    timing = ("seconds", "tokens_per_s", "generated_tokens")
    assert {k: v for k, v in summary.items() if k not in timing} == {k: v for k, v in full.items() if k not in timing}


def test_a_rerun_reuses_the_same_inputs_and_starts_over_on_other_ones(tmp_path, model_dir, loaded, monkeypatch):
    """Nothing is reused across inputs: other settings, other data contents or other model weights (same
    paths) redo every rollout; the same inputs redo none."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    calls, script = [0], scripted(loaded[1], SCRIPT)

    def counting(*args, **kw):
        calls[0] += 1
        return script(*args, **kw)
    monkeypatch.setattr(sc, "generate", counting)
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    rows = make_rows(tmp_path, 2)
    data = write_jsonl(tmp_path / "set.jsonl", rows)

    def rerun(**flags):
        calls[0] = 0
        run(str(model), data, tmp_path / "out", loaded, **flags)
        return calls[0]

    assert rerun() == 2  # one batch, two turns
    assert rerun() == 0  # same inputs: everything reused
    assert rerun(prompt="cp") == 2  # another setting
    assert json.loads((tmp_path / "out" / "config.json").read_text())["prompt"] == "cp"
    write_jsonl(tmp_path / "set.jsonl", [dict(rows[0], question=rows[0]["question"] + " Again?"), rows[1]])  # same path, new content
    assert rerun(prompt="cp") == 2
    weights = load_file(model / "model.safetensors")
    name = next(iter(weights))
    save_file({**weights, name: weights[name] + 1.0}, model / "model.safetensors")  # same folder, new weights
    assert rerun(prompt="cp") == 2
    assert rerun(prompt="cp") == 0
    assert len(read(tmp_path / "out" / "responses.jsonl")) == 2


# ---------------------------------------------------------------------------- the CLI end to end

def test_cli_end_to_end_on_a_tiny_model_with_format_flag(tmp_path, model_dir):
    # A JSONL file under a name that says nothing: --format tells the reader what it is.
    data = write_jsonl(tmp_path / "rows.data", make_rows(tmp_path, 3))
    p = cli(f"--model={model_dir}", f"--data={data}", f"--out_dir={tmp_path}/out", "--format=jsonl",
            "--max_new_tokens=4", "--batch_size=2", "--limit=2", "--rounds=3")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout[:p.stdout.index("}") + 1])["format"] == "jsonl"  # the resolved config, first
    responses = read(tmp_path / "out" / "responses.jsonl")
    assert [r["id"] for r in responses] == ["q0", "q1"] and all(len(r["turns"]) == 3 for r in responses)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rollouts"] == 2 and set(summary["accuracy"]) == {"turn1", "turn2", "turn3"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["device"] in ("cpu", "cuda")
    assert parse_cli(sc.GenerateConfig, ["--model=m", "--data=d", "--out_dir=o", "--format=tsv"]).format == "tsv"


def test_an_undetectable_format_asks_for_the_format_flag(tmp_path, model_dir, loaded):
    data = write_jsonl(tmp_path / "rows.data", make_rows(tmp_path, 1))
    with pytest.raises(ValueError, match="format"):
        run(model_dir, data, tmp_path / "out", loaded)


def test_tsv_rows_get_their_image_written_beside_the_pairs(tmp_path, model_dir, loaded, monkeypatch):
    import base64
    import io
    monkeypatch.setattr(sc, "generate", scripted(loaded[1], SCRIPT))
    lines = ["index\tquestion\tA\tB\tC\tD\tanswer\timage"]
    for r in make_rows(tmp_path, 4):
        buf = io.BytesIO()
        Image.open(tmp_path / r["image"]).save(buf, format="PNG")
        lines.append("\t".join([r["id"], r["question"], *r["options"], r["answer"],
                                base64.b64encode(buf.getvalue()).decode()]))
    (tmp_path / "bench.tsv").write_text("\n".join(lines) + "\n")  # MMBench layout, detected from the name
    run(model_dir, tmp_path / "bench.tsv", tmp_path / "out", loaded)
    pairs = read(tmp_path / "out" / "selfcorset.jsonl")
    assert [p["id"] for p in pairs] == ["q1", "q2"]
    for p in pairs:  # a file under out_dir/images/, holding the row's own picture
        assert p["image"].startswith("images/")
        with Image.open(tmp_path / "out" / p["image"]) as im, Image.open(tmp_path / "img" / f"{p['id']}.png") as src:
            assert im.convert("RGB").getpixel((0, 0)) == src.convert("RGB").getpixel((0, 0))
