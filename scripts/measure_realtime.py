#!/usr/bin/env python3
r"""What latency costs: closed-loop episodes where the simulator does not wait for the policy.

The same episodes in real-time mode (the simulator steps every 0.1 s of wall-clock time while the policy node infers)
for the unpruned policy and pruning methods; optionally step-synchronous too.

    python scripts/measure_realtime.py --model reference --methods none specprune vla_pruner \
        --families pick --episodes-per-family 5 --out outputs/realtime

Reports per method and mode: success (95% CI), mean |jerk| of the applied end-effector velocity, the share of
periods the robot held (zero twist) or had no fresh command, the node's inference latency and kept tokens.
A faster (pruned) policy should hold less and move more smoothly in real-time mode.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from specprune_ros.bridge.settings import TASK_FAMILIES
from specprune_ros.command_line import HelpFormatter, add_families_argument
from specprune_ros.control.parameters import NodeParameters
from specprune_ros.core.json_documents import strict_json


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--model', default='reference', help="'reference', 'tiny-random' or a checkpoint directory")
    parser.add_argument('--methods', nargs='+', default=['none', 'specprune'], help='pruning methods to run')
    parser.add_argument('--method-config', action='append', default=[], metavar="METHOD='{...}'",
                        help="a method's knobs as YAML, e.g. vla_pruner='{keep_ratio: 0.25}'")
    parser.add_argument('--modes', nargs='+', choices=('realtime', 'sync'), default=['realtime'],
                        help='bridge modes to run')
    add_families_argument(parser, TASK_FAMILIES, ['pick'])
    parser.add_argument('--episodes-per-family', type=int, default=3, help='episodes of each family')
    parser.add_argument('--seed-start', type=int, default=1_000_000,
                        help='first episode seed (1000000: the held-out evaluation seeds)')
    parser.add_argument('--max-steps', type=int, default=0,
                        help='stop episodes after this many steps (0: the task limit)')
    parser.add_argument('--replan-every-steps', type=int, default=0, help='override the sim config (8)')
    parser.add_argument('--param', action='append', default=[], metavar='NAME=VALUE',
                        help="a policy node parameter as YAML, e.g. latency_budget_ms=600 (late chunks: "
                        'benchmarks/latency_budget.py counts them)')
    parser.add_argument('--torch-threads', type=int, default=1, help='torch threads of the node')
    parser.add_argument('--domain-id', type=int, default=78, help='ROS_DOMAIN_ID of the processes')
    parser.add_argument('--out', type=Path, default=Path('outputs/realtime'),
                        help='directory for realtime.md and realtime.json')
    args = parser.parse_args()

    from specprune_ros.bridge.episodes import markdown_summary
    from specprune_ros.ros.sim_runner import SimRun, run_simulation
    configs = {}
    for item in args.method_config:
        name, _, value = item.partition('=')
        configs[name] = value
    defaults, parameters = NodeParameters(), {}
    for item in args.param:
        name, _, text = item.partition('=')
        value = yaml.safe_load(text)
        if isinstance(getattr(defaults, name, None), float) and isinstance(value, int):
            value = float(value)                  # a double parameter refuses an integer override
        parameters[name] = value
    summaries, runs = [], {}
    for mode in args.modes:
        for method in args.methods:
            arguments = {'model': args.model, 'method': method, 'mode': mode, 'families': ','.join(args.families),
                         'episodes_per_family': str(args.episodes_per_family), 'seed_start': str(args.seed_start),
                         'max_steps': str(args.max_steps), 'label': method}
            if method in configs:
                arguments['method_config'] = configs[method]
            policy = {'replan_every_steps': args.replan_every_steps} if args.replan_every_steps else {}
            policy.update(parameters)
            started = time.perf_counter()
            result = run_simulation(SimRun(arguments=arguments, policy_parameters=policy, domain_id=args.domain_id,
                                           torch_threads=args.torch_threads,
                                           log_dir=args.out / 'logs' / f'{mode}_{method}', timeout_s=24 * 3600))
            if result['summary'] is None:
                print(f'{mode} {method}: no summary\n' + json.dumps(result['outputs'], indent=1), file=sys.stderr)
                return 1
            summary = result['summary']['summary']
            summaries.append(summary)
            runs[f'{mode}/{method}'] = {'summary': summary, 'seconds': time.perf_counter() - started}
            print(markdown_summary([summary]).splitlines()[-1], flush=True)
    text = (f'Model {args.model}; {args.episodes_per_family} episodes per family of {", ".join(args.families)} from '
            f'seed {args.seed_start}; mean abs jerk of the applied velocity, hold = periods with a zero twist, '
            'stale = periods without a fresh command.\n\n' + markdown_summary(summaries) + '\n')
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'realtime.md').write_text(text)
    (args.out / 'realtime.json').write_text(strict_json(runs, indent=2))
    print(text)
    print(f"wrote {args.out / 'realtime.md'} and .json")
    return 0


if __name__ == '__main__':
    sys.exit(main())
