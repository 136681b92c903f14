"""Evaluate a model on MCQ data: single-turn accuracy, self-correction by review prompt, K-round curve.

    python eval.py --model=DIR --data=FILE --out_dir=DIR [--prompts=cp,vp1,vp2,vp3] [--rounds=3]
    python eval.py --model=BASE --compare=SCL --data=FILE --out_dir=DIR    # base vs tuned, McNemar + CI

Writes metrics.json, report.md, eval.png, responses_<model>_<prompt>.jsonl and skipped.jsonl.
"""
from scl.cli import parse_cli, to_json
from scl.evaluate import EvalConfig, run_eval

if __name__ == "__main__":
    config = parse_cli(EvalConfig)
    print(to_json(config))
    run_eval(config)
