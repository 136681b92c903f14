"""Evaluation: single-turn accuracy, what a review turn does, the K-round curve, and base vs SCL on the
same questions with a paired test. Rollouts go through selfcorrect.rollout, the code that built SelfCorSet.
Greedy decoding makes turn 1 the same under every review prompt, so it is generated once (`sp`) and
every review prompt continues it (the paper's SP column vs its CP/VP-1/2/3 columns).
"""
import dataclasses
import math
import os
import random
import sys
import time

import torch

from scl.files import fingerprint, read_json, write_json, write_jsonl, write_text
from scl.data import circular_groups, load_rows
from scl.selfcorrect import resolve_device, round_types, rollout, type_counts
from scl.weights import load_model_dir


@dataclasses.dataclass
class EvalConfig:
    """Evaluate a model: python eval.py --model=DIR --data=FILE --out_dir=DIR [--compare=DIR2]"""
    model: str  # model folder (config.json, *.safetensors, tokenizer files)
    data: str  # MCQ rows (JSONL / MMBench TSV / ScienceQA problems.json)
    out_dir: str  # gets metrics.json, report.md, PNG plots, responses_*.jsonl, skipped.jsonl
    compare: str | None = None  # a second model folder, evaluated on the same rows (base vs SCL)
    prompts: list[str] = dataclasses.field(default_factory=lambda: ["cp", "vp1", "vp2", "vp3"])  # review prompts
    compare_prompts: bool = True  # also run the review prompts and the curve for --compare (False: turn 1 only)
    rounds: int = 3  # K of the K-round curve (run with `curve_prompt`)
    curve_prompt: str = "vp2"  # review prompt repeated for the K-round curve
    limit: int | None = None  # only the first N usable rows
    batch_size: int = 256  # rollouts per generate() call
    max_new_tokens: int = 256  # per turn
    format: str | None = None  # data reader: jsonl | tsv | scienceqa | parquet; None = detect from the name
    split: str | None = None  # the split to read where a file or folder holds several
    turn1_layout: str = "scl"  # scl: hint, question, options one per line; paper: as the paper's released code
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str = "float32"  # model weights: float32 | bfloat16 | float16
    seed: int = 0  # bootstrap seed


# ---------------------------------------------------------------------------- statistics, pure

def accuracy(records, turn=0) -> float:
    return sum(r["turns"][turn]["correct"] for r in records) / max(len(records), 1)


def circular_accuracy(records, turn=0) -> float | None:
    """MMBench's circular score: a question counts only if every rotation of its options is answered
    right. None when the data has no rotated copies."""
    groups = circular_groups([r["id"] for r in records])
    if not groups:
        return None
    right = {r["id"]: r["turns"][turn]["correct"] for r in records}
    return sum(all(right[i] for i in members) for members in groups.values()) / len(groups)


def transitions(records, first=0, second=1) -> dict:
    """4-type table between two turns: counts of types 1–4 and unparsed."""
    return type_counts(round_types([r["turns"][first], r["turns"][second]])[0] for r in records)


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p: under H0 the discordant pairs (b: only A right, c: only B right) split
    Binomial(b + c, 1/2)."""
    n, k = b + c, min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def bootstrap_diff(a: list[bool], b: list[bool], n: int = 2000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap CI of accuracy(b) - accuracy(a) over the same questions (paired)."""
    rng, m = random.Random(seed), len(a)
    resamples = ([rng.randrange(m) for _ in range(m)] for _ in range(n))  # the questions, with replacement
    diffs = sorted(sum(b[i] - a[i] for i in idx) / m for idx in resamples)
    return diffs[int((1 - level) / 2 * n)], diffs[min(n - 1, int((1 + level) / 2 * n))]


def compare(records_a, records_b, seed=0) -> dict:
    """Base (a) vs tuned (b), turn 1 on the same questions: accuracies, discordant counts, McNemar p, 95% CI."""
    by_id = {r["id"]: r for r in records_b}
    common = [r for r in records_a if r["id"] in by_id]
    a = [r["turns"][0]["correct"] for r in common]
    b = [by_id[r["id"]]["turns"][0]["correct"] for r in common]
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    lo, hi = bootstrap_diff(a, b, seed=seed) if common else (0.0, 0.0)
    return {"questions": len(common), "accuracy_a": sum(a) / max(len(a), 1), "accuracy_b": sum(b) / max(len(b), 1),
            "difference": (sum(b) - sum(a)) / max(len(a), 1), "only_a_right": only_a, "only_b_right": only_b,
            "p_value": mcnemar(only_a, only_b), "ci95": [lo, hi]}


# ---------------------------------------------------------------------------- one model

def evaluate_model(model, tok, processor, rows, cfg: EvalConfig, name: str, prompts: list[str]) -> tuple[dict, dict]:
    """Rollouts of every review prompt on `rows` (greedy); returns (metrics, records per prompt)."""
    curve = cfg.curve_prompt if prompts else "sp"  # no review prompts: the curve is turn 1 alone
    reviews = {p: 2 for p in prompts} | ({curve: max(cfg.rounds, 2)} if prompts else {})
    runs = rollout(model, tok, processor, rows, prompts={"sp": 1, **reviews}, max_new_tokens=cfg.max_new_tokens,
                   batch_size=cfg.batch_size, layout=cfg.turn1_layout)
    for p, recs in runs.items():
        write_jsonl(os.path.join(cfg.out_dir, f"responses_{name}_{p}.jsonl"), recs)
    first, n_turns = runs["sp"], len(runs[curve][0]["turns"])  # run_eval stops before an empty data set
    metrics = {"questions": len(first), "test_accuracy": accuracy(first), "circular_accuracy": circular_accuracy(first),
               "unparsed_rate": sum(r["turns"][0]["answer"] is None for r in first) / len(first),
               "prompts": {p: {"turn1_accuracy": accuracy(runs[p], 0), "turn2_accuracy": accuracy(runs[p], 1),
                               "transitions": transitions(runs[p])} for p in prompts},
               "rounds": {"prompt": curve, "accuracy": [accuracy(runs[curve], k) for k in range(n_turns)]}}
    return metrics, runs


# ---------------------------------------------------------------------------- report

def summarize_log(rows: list[dict], keys, path: str) -> dict:
    """A training log's steps and the means of its first and last tenth of steps per metric; the PNG at
    `path` has one panel per metric against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, key in zip(axes, keys):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows])
        ax.set(title=key, xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    k = max(1, len(rows) // 10)
    return {"steps": len(rows), **{f"{when}/{key}": sum(r[key] for r in part) / len(part)
                                   for key in keys for when, part in (("first", rows[:k]), ("last", rows[-k:]))}}


def plot_rounds(metrics_by_model: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, m in metrics_by_model.items():
        acc = m["rounds"]["accuracy"]
        ax1.plot(range(1, len(acc) + 1), [100 * a for a in acc], marker="o", label=name)
    first = next(iter(metrics_by_model.values()))
    ax1.set(xlabel="turn", ylabel="accuracy (%)", title=f"K-round self-correction ({first['rounds']['prompt']})")
    ax1.legend()
    prompts = list(first["prompts"])
    width = 0.8 / len(metrics_by_model)
    for j, (name, m) in enumerate(metrics_by_model.items()):
        if not m["prompts"]:  # a compared model evaluated on turn 1 only
            continue
        xs = [i + j * width for i in range(len(prompts))]
        ax2.bar(xs, [m["prompts"][p]["transitions"]["2"] for p in prompts], width, label=f"{name}: wrong→right")
        ax2.bar(xs, [-m["prompts"][p]["transitions"]["3"] for p in prompts], width, label=f"{name}: right→wrong")
    ax2.axhline(0, color="black", lw=0.5)
    ax2.set_xticks([i + width * (len(metrics_by_model) - 1) / 2 for i in range(len(prompts))], prompts)
    ax2.set_title("review turn: wrong→right (up) vs right→wrong (down)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _row(*cells) -> str:  # a markdown table row
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


def report_markdown(metrics_by_model: dict, comparison: dict | None) -> str:
    lines = ["# Evaluation", "", "## Single-turn accuracy", "", "| model | questions | accuracy | unparsed |",
             "|---|---|---|---|"]
    for name, m in metrics_by_model.items():
        lines.append(_row(name, m["questions"], _pct(m["test_accuracy"]), _pct(m["unparsed_rate"])))
    circular = {n: m["circular_accuracy"] for n, m in metrics_by_model.items() if m.get("circular_accuracy") is not None}
    if circular:  # MMBench-style data: a question counts only when every rotation of its options is right
        lines += ["", "Circular accuracy (all rotations of a question right): " + ", ".join(
            f"{n} {_pct(a)}" for n, a in circular.items()) + "."]
    if comparison:
        c = comparison
        lines += ["", f"Difference {100 * c['difference']:+.1f} points (95% bootstrap CI {100 * c['ci95'][0]:+.1f} to "
                      f"{100 * c['ci95'][1]:+.1f}); only base right {c['only_a_right']}, only tuned right "
                      f"{c['only_b_right']}; McNemar exact p = {c['p_value']:.3g}."]
    lines += ["", "## Intrinsic self-correction (turn 2 after a review prompt)", "",
              "| model | prompt | turn 1 | turn 2 | right→right | wrong→right | right→wrong | wrong→wrong | unparsed |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, m in metrics_by_model.items():
        for p, v in m["prompts"].items():
            counts = [v["transitions"][k] for k in ("1", "2", "3", "4", "unparsed")]
            lines.append(_row(name, p, _pct(v["turn1_accuracy"]), _pct(v["turn2_accuracy"]), *counts))
    K = max(len(m["rounds"]["accuracy"]) for m in metrics_by_model.values())
    lines += ["", "## K-round curve", "", "| model | " + " | ".join(f"turn {k + 1}" for k in range(K)) + " |",
              "|---|" + "---|" * K]
    lines += [_row(name, *map(_pct, m["rounds"]["accuracy"])) for name, m in metrics_by_model.items()]
    lines += ["", "![rounds and transitions](eval.png)", ""]
    return "\n".join(lines)


def experiment_report(result: dict) -> str:
    """The results of `python train.py` as markdown: base vs SCL, SelfCorSet, the review turn, times."""
    ev, sc = result["eval"], result["selfcorset"]
    c, base = ev.get("comparison"), ev.get("base") or ev["model"]
    lines = ["# SCL on the built-in task", "", "| model | single-turn test accuracy |", "|---|---|",
             _row("base (SFT)", _pct(base["test_accuracy"]))]
    if c:
        lines += [_row("SCL (DPO on SelfCorSet)", _pct(ev["scl"]["test_accuracy"])), "",
                  f"Difference {100 * c['difference']:+.1f} points, 95% bootstrap CI [{100 * c['ci95'][0]:+.1f}, "
                  f"{100 * c['ci95'][1]:+.1f}], McNemar exact p = {c['p_value']:.3g} ({c['questions']} test "
                  f"questions; only base right {c['only_a_right']}, only SCL right {c['only_b_right']})."]
    else:
        lines += ["", "No SCL model: the base model's rollouts gave no wrong→right or right→wrong flips."]
    acc = sc["accuracy"]
    lines += ["", f"SelfCorSet: {sc['rollouts']} rollouts on construct, turn 1 {_pct(acc['turn1'])} → turn 2 "
                  f"{_pct(acc.get('turn2', 0))}, types 1/2/3/4 = {'/'.join(str(sc['types'][k]) for k in '1234')}"
                  f" ({sc['types']['unparsed']} unparsed), {sc['pairs']} pairs."]
    r = sc["reasoned"]  # train.py counts it for every run
    lines += ["", f"Right answers that carry the task's reference reasoning: {r['right_reasoned']} of {r['right']} "
                  f"in the rollouts; chosen responses {r['chosen_reasoned']} of {sc['pairs']}, rejected "
                  f"{r['rejected_reasoned']}."]
    an = result.get("analysis", {})
    if "scl" in an:
        b, t = an["base"], an["scl"]
        kinds = ("reasoned", "misread", "slip", "letter", "format")
        lines += ["", "## Why: what the answers are made of (test, single turn, greedy)", "",
                  "| model | " + " | ".join(kinds) + " | right answers reasoned |", "|---" * (len(kinds) + 2) + "|"]
        for name, a in (("base", b), ("SCL", t)):
            lines.append(_row(name, *(a["kinds"].get(k, 0) for k in kinds), f"{a['right_reasoned']} of {a['right']}"))
        lines += ["", "Kinds: reasoned = the reading, every step and the letter right; misread = a cell described "
                      "wrong; slip = the reading right, then a wrong step (a cell listed, a count, the object looked "
                      "up); letter = reading and steps right, the value or letter wrong.", "",
                  _row("gold letter", *b["accuracy_by_letter"]), "|---" * 5 + "|"]
        for name, a in (("base", b), ("SCL", t)):
            lines.append(_row(f"{name} accuracy", *map(_pct, a["accuracy_by_letter"].values())))
            lines.append(_row(f"{name} answered", *(a["answered"].get(k, 0) for k in b["accuracy_by_letter"])))
    lines += ["", "## What a review turn does to the base model (test, greedy)", "",
              "| prompt | turn 1 | turn 2 | wrong→right | right→wrong |", "|---|---|---|---|---|"]
    for p, v in base["prompts"].items():
        t = v["transitions"]
        lines.append(_row(p, _pct(v["turn1_accuracy"]), _pct(v["turn2_accuracy"]), t["2"], t["3"]))
    lines += ["", f"Stage times (s): {result['stage_seconds']}; total {result['seconds']:.0f} s.", "",
              "Details: eval/report.md; plots: eval/eval.png, dpo/dpo.png.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the whole evaluation

def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate cfg.model (and cfg.compare on the same rows); reuse out_dir when its fingerprint matches."""
    t0 = time.time()
    device = torch.device(resolve_device(cfg.device))
    try:
        rows, skipped = load_rows(cfg.data, format=cfg.format, limit=cfg.limit, split=cfg.split)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not rows:
        sys.exit(f"error: no usable rows in {cfg.data} ({len(skipped)} skipped)")
    models = [cfg.model] + ([cfg.compare] if cfg.compare else [])
    setting = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("model", "compare", "data", "out_dir",
                                                                               "device")}
    key = fingerprint(setting, files=[cfg.data, *sorted({r.image_path for r in rows if r.image_path})], models=models)
    done = read_json(os.path.join(cfg.out_dir, "metrics.json"))
    if done and done.get("fingerprint") == key:
        print(f"eval: reusing {cfg.out_dir} (made from the same models, data and settings)")
        return done
    os.makedirs(cfg.out_dir, exist_ok=True)
    write_json(os.path.join(cfg.out_dir, "config.json"), dataclasses.asdict(cfg))
    write_jsonl(os.path.join(cfg.out_dir, "skipped.jsonl"), skipped)
    labels = ["base", "scl"] if cfg.compare else ["model"]
    metrics, runs = {}, {}
    for label, path in zip(labels, models):
        try:
            model, tok, proc = load_model_dir(path, dtype=getattr(torch, cfg.dtype), device=device)
        except (OSError, ValueError) as e:  # missing folder, CheckpointError, ConfigError: one line, no traceback
            sys.exit(f"error: {e}")
        prompts = cfg.prompts if label == labels[0] or cfg.compare_prompts else []
        metrics[label], runs[label] = evaluate_model(model, tok, proc, rows, cfg, label, prompts)
        print(f"eval: {label} single-turn accuracy {100 * metrics[label]['test_accuracy']:.1f}% "
              f"on {len(rows)} questions", flush=True)
    comparison = compare(runs[labels[0]]["sp"], runs[labels[1]]["sp"], seed=cfg.seed) if cfg.compare else None
    out = {**metrics, "skipped": len(skipped), "seconds": round(time.time() - t0, 1), "fingerprint": key}
    if comparison:
        out["comparison"] = comparison
    plot_rounds(metrics, os.path.join(cfg.out_dir, "eval.png"))
    write_text(os.path.join(cfg.out_dir, "report.md"), report_markdown(metrics, comparison))
    write_json(os.path.join(cfg.out_dir, "metrics.json"), out)  # last: its fingerprint marks the stage done
    return out
