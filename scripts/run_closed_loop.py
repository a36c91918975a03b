#!/usr/bin/env python3
"""Closed-loop evaluation of the reference VLA (optionally pruned) in the simulated tabletop tasks.

    python scripts/run_closed_loop.py --episodes-per-family 50 --method none --out outputs/eval
    python scripts/run_closed_loop.py --episodes-per-family 2 --record outputs/eval/episode.png

Prints a markdown table (success with 95% CI, mean episode length, model-step latency) and writes JSON + MD.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specprune_ros.bridge.settings import TASK_FAMILIES
from specprune_ros.command_line import HelpFormatter, add_families_argument, positive_int, yaml_mapping
from specprune_ros.evaluation.closed_loop import (PolicySpec, evaluate, prepare_report_directory, record_episode,
                                                  summarize, write_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--model', default='reference', help="'reference', 'tiny-random' or a checkpoint directory")
    parser.add_argument('--method', default='none', help='pruning method (see specprune_ros.pruning)')
    parser.add_argument('--method-config', type=yaml_mapping, default=None,
                        help="the method's settings as YAML (or JSON), e.g. '{keep_ratio: 0.25}'")
    parser.add_argument('--execute-steps', type=positive_int, default=None,
                        help='actions executed per chunk, at most its length (default: all 8)')
    add_families_argument(parser, TASK_FAMILIES, None, default_text='all')
    parser.add_argument('--episodes-per-family', type=positive_int, default=10, help='episodes of each family')
    parser.add_argument('--seed-start', type=int, default=None, help='default: the held-out EVAL_SEED_START')
    parser.add_argument('--workers', type=positive_int, default=2, help='worker processes (1: in this process)')
    parser.add_argument('--out', type=Path, default=Path('outputs/eval'),
                        help='directory for the JSON and markdown report')
    parser.add_argument('--record', type=Path, default=None, help='also save a PNG strip + GIF of one episode here')
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from specprune_ros.sim import EVAL_SEED_START   # after parsing: the simulator loads MuJoCo, --help need not
    families = args.families or list(TASK_FAMILIES)
    spec = PolicySpec(model=args.model, method=args.method, method_config=args.method_config)
    from specprune_ros.policy.errors import CheckpointError
    try:
        prepare_report_directory(args.out)      # an unwritable --out fails now, not after the episodes
    except OSError as error:
        print(f'error: --out {args.out}: {error}', file=sys.stderr)
        return 2
    try:
        results = evaluate(spec, families, args.episodes_per_family, seed_start=args.seed_start,
                           workers=args.workers, execute_steps=args.execute_steps)
    except (CheckpointError, ValueError, KeyError, RuntimeError) as error:
        print(f'error: {type(error).__name__}: {error}', file=sys.stderr)
        return 2
    summary = summarize(results, label=spec.name)
    seed_start = args.seed_start if args.seed_start is not None else EVAL_SEED_START
    run = {'model': args.model, 'method': args.method, 'method_config': args.method_config, 'families': families,
           'episodes_per_family': args.episodes_per_family, 'seed_start': seed_start,
           'execute_steps': args.execute_steps}
    json_path, md_path = write_report([summary], args.out, name=f'closed_loop_{spec.name}', run=run)
    print(md_path.read_text())
    print(f'wrote {json_path} and {md_path}')
    if args.record is not None:
        episode = record_episode(spec, families[0], seed_start, args.record, execute_steps=args.execute_steps)
        print(f"recorded {families[0]} seed {seed_start} ({'success' if episode.success else 'failure'}) to "
              f'{args.record}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
