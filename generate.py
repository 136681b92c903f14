"""Self-correction rollouts and the SelfCorSet preference pairs.

    python generate.py --model=DIR --data=FILE --out_dir=DIR [--prompt=vp2] [--rounds=2] [--samples=1]
                       [--limit=N] [--batch_size=8] [--temperature=0] [--top_p=1] [--seed=0] [--format=...]

Writes out_dir/{config.json, responses.jsonl, selfcorset.jsonl, skipped.jsonl, summary.json}.
Re-running with the same out_dir resumes where the last run stopped. `--help` lists every flag.
"""
import dataclasses
import json
import sys

from scl.cli import parse_cli, to_json
from scl.selfcorrect import GenerateConfig, resolve_device, run_generate


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(GenerateConfig, argv)
    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))
    print(to_json(cfg), flush=True)
    try:
        summary = run_generate(cfg)
    except (OSError, ValueError) as e:  # missing files, broken checkpoints, bad flags: one line, no traceback
        sys.exit(f"error: {e}")
    print(json.dumps({k: summary[k] for k in ("rollouts", "accuracy", "unparsed", "types", "pairs", "skipped",
                                              "seconds", "tokens_per_s")}, indent=2))
    return summary


if __name__ == "__main__":
    main()
