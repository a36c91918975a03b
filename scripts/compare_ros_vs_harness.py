#!/usr/bin/env python3
r"""Acceptance check: the closed loop over ROS topics scores the same as the ROS-free harness.

Policy node + sim bridge in step-synchronous mode against ``scripts/run_closed_loop.py``, on the same seeds.

    python scripts/compare_ros_vs_harness.py --model reference --method none --episodes-per-family 10 \
        --out outputs/compare

Both run the same episodes (families x seeds from --seed-start) with the same execution scheme (a chunk of 8
executed open loop, then re-plan). Prints both success rates with 95% Wilson intervals, per-episode agreement,
and writes ``ros_vs_harness.json`` / ``.md``. Exits 1, saying why, when the ROS run failed (non-zero exit code)
or did not complete exactly the harness's episodes (an interrupted run, a different plan).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from specprune_ros.bridge.settings import TASK_FAMILIES
from specprune_ros.command_line import HelpFormatter, add_families_argument
from specprune_ros.core.json_documents import strict_json


class ActionCheck:
    """The harness's execution loop, keeping every applied action to compare with what the sim bridge applied.

    As ``closed_loop.run_episode``: a chunk executed open loop, then re-plan.
    """

    def __init__(self, model: str, method: str, method_config) -> None:
        import torch
        torch.set_num_threads(1)
        from specprune_ros.models.loading import load_policy
        from specprune_ros.sim import TabletopEnv
        self.env = TabletopEnv(image_size=96)
        self.policy = load_policy(model, method, method_config)

    def actions(self, family: str, seed: int, steps: int) -> np.ndarray:
        from specprune_ros.policy.interface import Observation
        observation = self.env.reset(seed=seed, family=family)
        self.policy.reset()
        actions, executed, done = [], None, False
        while not done and len(actions) < steps:
            output = self.policy.predict(Observation(images=observation.images, instruction=observation.instruction,
                                                     proprio=observation.proprio, executed_actions=executed))
            for action in output.actions:
                observation, done, _ = self.env.step(action)
                actions.append(action)
                if done or len(actions) == steps:
                    break
            executed = output.actions
        return np.asarray(actions, dtype=np.float64)


def ros_run_problems(returncode: int, ros_summary: dict, expected: list[tuple[str, int]]) -> list[str]:
    """Why the ROS run cannot be compared with the harness's episodes ``expected`` (empty: it can)."""
    problems = []
    if returncode != 0:
        problems.append(f'the ROS run exited with code {returncode}')
    episodes = ros_summary.get('episodes', [])
    interrupted = [(e['family'], e['seed']) for e in episodes if e.get('interrupted')]
    completed = [(e['family'], e['seed']) for e in episodes if not e.get('interrupted')]
    if interrupted:
        problems.append(f'ROS episodes interrupted (not scored): {interrupted}')
    missing = [key for key in expected if key not in completed]
    extra = [key for key in completed if key not in expected]
    if missing:
        problems.append(f'{len(missing)} of {len(expected)} harness episodes have no completed ROS episode: {missing}')
    if extra:
        problems.append(f'ROS episodes the harness did not run: {extra}')
    if len(set(completed)) != len(completed):
        problems.append('the ROS run repeated episodes')
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--model', default='reference', help="'reference', 'tiny-random' or a checkpoint directory")
    parser.add_argument('--method', default='none', help='pruning method')
    parser.add_argument('--method-config', default='', help='YAML mapping of the method knobs')
    add_families_argument(parser, TASK_FAMILIES, list(TASK_FAMILIES))
    parser.add_argument('--episodes-per-family', type=int, default=5, help='episodes of each family')
    parser.add_argument('--seed-start', type=int, default=1_000_000,
                        help='first episode seed (1000000: the held-out evaluation seeds)')
    parser.add_argument('--max-steps', type=int, default=0, help='cap episodes (0: the task limits)')
    parser.add_argument('--workers', type=int, default=1, help='harness worker processes')
    parser.add_argument('--domain-id', type=int, default=79, help='ROS_DOMAIN_ID of the node and the bridge')
    parser.add_argument('--out', type=Path, default=Path('outputs/compare'), help='directory for the comparison report')
    parser.add_argument('--no-check-actions', dest='check_actions', action='store_false', default=True,
                        help='skip re-running the harness loop to compare every applied action (default: compare)')
    args = parser.parse_args()

    import yaml

    from specprune_ros.evaluation.closed_loop import PolicySpec, evaluate, summarize
    from specprune_ros.evaluation.statistics import wilson_interval
    from specprune_ros.ros.sim_runner import SimRun, run_simulation
    method_config = yaml.safe_load(args.method_config) if args.method_config else None
    started = time.perf_counter()
    results = evaluate(PolicySpec(model=args.model, method=args.method, method_config=method_config),
                       args.families, args.episodes_per_family, seed_start=args.seed_start, workers=args.workers,
                       max_steps=args.max_steps or None)
    harness = summarize(results, label=f'harness {args.method}')
    harness_seconds = time.perf_counter() - started

    started = time.perf_counter()
    arguments = {'model': args.model, 'method': args.method, 'mode': 'sync', 'families': ','.join(args.families),
                 'episodes_per_family': str(args.episodes_per_family), 'seed_start': str(args.seed_start),
                 'max_steps': str(args.max_steps), 'label': f'ros {args.method}'}
    if args.method_config:
        arguments['method_config'] = args.method_config
    run = run_simulation(SimRun(arguments=arguments, domain_id=args.domain_id, log_dir=args.out / 'logs',
                                bridge_parameters={'save_actions': True}, timeout_s=24 * 3600))
    ros_seconds = time.perf_counter() - started
    if run['summary'] is None:
        print('the ROS run produced no summary:\n' + json.dumps(run['outputs'], indent=1), file=sys.stderr)
        return 1
    ros = run['summary']['summary']
    problems = ros_run_problems(run['returncode'], ros, [(r.family, r.seed) for r in results])

    by_key = {(r.family, r.seed): r for r in results}
    rows, agree = [], 0
    checker = ActionCheck(args.model, args.method, method_config) if args.check_actions else None
    for episode in ros['episodes']:
        if episode.get('interrupted'):
            continue
        reference = by_key.get((episode['family'], episode['seed']))
        same = reference is not None and reference.success == episode['success'] and reference.steps == episode['steps']
        agree += int(same)
        row = {'family': episode['family'], 'seed': episode['seed'], 'ros_success': episode['success'],
               'ros_steps': episode['steps'], 'harness_success': None if reference is None else reference.success,
               'harness_steps': None if reference is None else reference.steps, 'identical': same}
        if checker is not None and episode.get('actions'):
            ros_actions = np.asarray(episode['actions'])
            harness_actions = checker.actions(episode['family'], episode['seed'], len(ros_actions))
            steps = min(len(ros_actions), len(harness_actions))
            diff = np.abs(ros_actions[:steps] - harness_actions[:steps]).max(axis=1)
            row['max_action_diff'] = float(diff.max()) if steps else float('nan')
            row['first_diverging_step'] = int(np.argmax(diff > 1e-6)) if (diff > 1e-6).any() else None
        rows.append(row)
    h, r = harness['overall'], ros['overall']
    lines = [f'Model {args.model}, method {args.method}, {len(rows)} episodes ({args.episodes_per_family} per family '
             f'of {", ".join(args.families)}, seeds from {args.seed_start}).', '',
             '| run | success | 95% CI | mean length | wall time |', '|---|---|---|---|---|',
             f"| ROS-free harness | {h['success_rate'] * 100:.1f}% ({h['successes']}/{h['episodes']}) "
             f"| {h['ci95'][0] * 100:.1f}-{h['ci95'][1] * 100:.1f}% | {h['mean_length']:.1f} "
             f"| {harness_seconds:.0f} s |",
             f"| ROS topics, sync | {r['success_rate'] * 100:.1f}% ({r['successes']}/{r['episodes']}) "
             f"| {r['ci95'][0] * 100:.1f}-{r['ci95'][1] * 100:.1f}% | {r['mean_length']:.1f} | {ros_seconds:.0f} s |",
             '', f'Episodes with the same outcome and length in both: {agree}/{len(rows)}.',
             *([f"Applied actions, ROS vs harness: max |diff| {max(r['max_action_diff'] for r in rows):.3g} over all "
                f"steps; episodes diverging beyond 1e-6: {sum(r['first_diverging_step'] is not None for r in rows)}."]
               if rows and all('max_action_diff' in r for r in rows) else []),
             f"Sync protocol counters: {ros.get('sync_counters')}.",
             *(['', 'NOT COMPARABLE: ' + '; '.join(problems) + f" (logs: {run['logs']})"] if problems else [])]
    low, high = wilson_interval(agree, len(rows))
    document = {'model': args.model, 'method': args.method, 'method_config': method_config,
                'harness': harness, 'ros': {k: v for k, v in ros.items() if k != 'episodes'}, 'episodes': rows,
                'identical_episodes': agree, 'identical_ci95': [low, high],
                'seconds': {'harness': harness_seconds, 'ros': ros_seconds},
                'ros_returncode': run['returncode'], 'problems': problems}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'ros_vs_harness.json').write_text(strict_json(document, indent=2))
    (args.out / 'ros_vs_harness.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    print(f"wrote {args.out / 'ros_vs_harness.json'} and .md")
    if problems:
        print('error: the ROS run is not comparable with the harness: ' + '; '.join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
