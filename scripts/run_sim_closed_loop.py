#!/usr/bin/env python3
r"""Simulation testing over real ROS topics: the policy node + the sim bridge (+ a bag recorder), as processes.

This is what ``ros2 launch specprune_ros sim.launch.py`` starts, for machines without ``ros2 launch``:

    python scripts/run_sim_closed_loop.py --model reference --method specprune --mode sync \
        --episodes-per-family 10 --summary outputs/sim/specprune_sync
    python scripts/run_sim_closed_loop.py --model reference --method none --mode realtime --families pick \
        --episodes-per-family 5 --record-bag outputs/bags/sim_run

Prints one line per finished episode, then the bridge's markdown summary (success with 95% CI, jerk, holds,
model latency on the wall clock, and in real-time mode the node's observation-to-chunk latency), and writes
JSON + MD: by default to outputs/sim/<label or method>_<mode>_<time>/summary.{json,md}, the process logs
next to it. Exit code: the bridge's (0 when every episode ran; 2 when it could not start or the policy node went
away, 130 when interrupted, e.g. because the policy node exited: the summary then marks the interrupted episode
and lists planned vs completed episodes).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from specprune_ros.bridge.episodes import summary_base
from specprune_ros.bridge.settings import TASK_FAMILIES
from specprune_ros.command_line import HelpFormatter, add_families_argument
from specprune_ros.ros.sim_runner import SimRun, parse_assignments, run_simulation
from specprune_ros.sim import EVAL_SEED_START


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--model', default='', help="'reference', 'tiny-random' or a checkpoint directory")
    parser.add_argument('--method', default='', help='pruning method (none, specprune, vla_pruner, ...)')
    parser.add_argument('--method-config', default='', help="the method's knobs as YAML, e.g. '{keep_ratio: 0.25}'")
    parser.add_argument('--device', default='', help="torch device of the node (default: the params file's)")
    parser.add_argument('--params-file', default='', help='policy node params (default config/specprune.yaml)')
    parser.add_argument('--sim-params-file', default='', help='bridge + sim overrides (default config/sim_bridge.yaml)')
    parser.add_argument('--mode', choices=('sync', 'realtime'), default='',
                        help="sync (the sim waits for each command) or realtime (default: the sim params file's)")
    add_families_argument(parser, TASK_FAMILIES, None, default_text="the sim params file's")
    parser.add_argument('--episodes-per-family', default='',
                        help="episodes of each family (default: the sim params file's)")
    parser.add_argument('--seed-start', default='', help="first episode seed (default: the sim params file's)")
    parser.add_argument('--max-steps', default='',
                        help='stop episodes after this many steps (0: the task limit; default: the sim params file)')
    parser.add_argument('--label', default='', help='name of the run in the summary (default: the method)')
    parser.add_argument('--summary', default='', help='write <path>.json and <path>.md '
                        '(default: outputs/sim/<label or method>_<mode>_<time>/summary)')
    parser.add_argument('--log-dir', type=Path, default=None,
                        help='process logs (default: a logs directory next to the summary)')
    parser.add_argument('--domain-id', type=int, default=None, help='ROS_DOMAIN_ID for the processes')
    parser.add_argument('--torch-threads', type=int, default=1, help='torch threads of the node')
    parser.add_argument('--record-bag', type=Path, default=None, help='also record the run to this bag directory')
    parser.add_argument('--storage', choices=('mcap', 'sqlite3'), default='mcap', help='storage format of --record-bag')
    parser.add_argument('--policy-param', action='append', default=[], metavar='NAME=VALUE',
                        help='extra policy node parameter (repeatable)')
    parser.add_argument('--bridge-param', action='append', default=[], metavar='NAME=VALUE',
                        help='extra sim bridge parameter (repeatable)')
    parser.add_argument('--timeout', type=float, default=6 * 3600.0, help='give up after this many seconds')
    return parser


def default_run_directory(args: argparse.Namespace) -> Path:
    """outputs/sim/<label or method>_<mode>_<time>: where a run without --summary keeps its files."""
    name = '_'.join(part for part in (args.label or args.method or 'default', args.mode) if part)
    return Path('outputs') / 'sim' / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seed_start and int(args.seed_start) < EVAL_SEED_START:
        print(f'warning: --seed-start {args.seed_start} is below {EVAL_SEED_START}: those layouts are the training '
              "demonstrations' (collect_demos.py), not held-out ones", file=sys.stderr)
    if not args.summary:
        run_directory = default_run_directory(args)
        args.summary = str(run_directory / 'summary')
        args.log_dir = args.log_dir or run_directory / 'logs'
    elif args.log_dir is None:
        base = summary_base(args.summary)
        args.log_dir = base.with_name(base.name + '_logs')
    arguments = {'model': args.model, 'method': args.method, 'method_config': args.method_config,
                 'device': args.device, 'params_file': args.params_file, 'sim_params_file': args.sim_params_file,
                 'mode': args.mode, 'families': ','.join(args.families or ()),
                 'episodes_per_family': args.episodes_per_family,
                 'seed_start': args.seed_start, 'max_steps': args.max_steps, 'label': args.label,
                 'summary_path': args.summary}
    try:
        run = SimRun(arguments={k: v for k, v in arguments.items() if v},
                     policy_parameters=parse_assignments(args.policy_param),
                     bridge_parameters=parse_assignments(args.bridge_param), domain_id=args.domain_id,
                     torch_threads=args.torch_threads, log_dir=args.log_dir, record_bag=args.record_bag,
                     record_storage=args.storage, timeout_s=args.timeout,
                     progress=lambda line: print(line, flush=True))
        result = run_simulation(run)
    except ValueError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    summary = result['summary']
    if result['problem']:
        print(f"error: {result['problem']}", file=sys.stderr)
    if summary is None:
        print('the bridge wrote no summary; its log ends with:\n' + result['outputs'].get('sim_bridge', ''),
              file=sys.stderr)
        print('policy node log ends with:\n' + result['outputs'].get('specprune_node', ''), file=sys.stderr)
        return result['returncode'] or 1
    md_path = Path(result['summary_path']).with_suffix('.md')
    print(md_path.read_text() if md_path.is_file() else summary)
    print(f"summary: {result['summary_path']}; logs: {result['logs']}")
    if args.record_bag is not None:
        print(f'bag: {args.record_bag}')
    return result['returncode'] or 0


if __name__ == '__main__':
    sys.exit(main())
