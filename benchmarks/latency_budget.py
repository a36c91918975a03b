#!/usr/bin/env python3
"""The latency budget in real-time simulation, with and without injected CPU load.

The simulator steps every 0.1 s of wall-clock time while the policy node infers (``scripts/measure_realtime.py``'s
real-time mode). For each load condition (none; ``--load-procs`` busy processes beside the node) and each
configuration (unpruned; a fixed token budget; the unpruned model with ``latency_budget_ms``, DivPrune taking over
when needed; the same holding only the chunk deadline) the same episodes run, and this process listens to the
node's ``~/inference`` records:

    success (Wilson 95% CI), deadline misses (chunks that arrived after the chunk before them had run out, so the
    robot had no action for a while; ``chunk_scheduler.late_chunks``) and the share of time without an action,
    steps over the latency budget, hold % (periods with a zero twist), stale % (periods without a fresh command),
    mean |jerk| of the applied velocity, model latency p50 / p90, inference (request to chunk) p98, kept ratio.

The chunk deadline depends on how early the next inference starts: with chunks of 8 steps of 0.1 s held at most
``max_chunk_age_s`` (0.6 s) and a new inference every ``--replan-every-steps`` (5) steps, the next chunk has
0.6 - 0.5 = 0.1 s from its observation to arrive.

    python benchmarks/latency_budget.py --episodes-per-family 2 --families pick place push --out docs/benchmarks
    python benchmarks/latency_budget.py --controller-overhead     # the budget's own cost per inference
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticStatus

from specprune_ros.bridge.settings import TASK_FAMILIES
from specprune_ros.command_line import HelpFormatter, add_families_argument
from specprune_ros.control.chunk_scheduler import ChunkSettings, late_chunks
from specprune_ros.control.latency_budget import BudgetSettings, LatencyBudget
from specprune_ros.core.json_documents import strict_json
from specprune_ros.pruning.registry import build_method
from specprune_ros.ros.output_messages import values_of
from specprune_ros.ros.ros_helpers import BackgroundExecutor
from specprune_ros.ros.sim_runner import SimRun, run_simulation


class InferenceListener:
    """Records the policy node's ``~/inference`` values in DDS domain ``domain``."""

    def __init__(self, domain: int) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain)
        self.node = rclpy.create_node('latency_budget_listener', context=self.context)
        self.records: list[dict] = []
        self.node.create_subscription(DiagnosticStatus, '/specprune_node/inference',
                                      lambda message: self.records.append(values_of(message)), 100)
        self.spinner = BackgroundExecutor(self.node)

    def close(self) -> None:
        self.spinner.stop()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def configurations(budget_ms: float, fixed_ratio: float, horizon_ms: float) -> dict[str, tuple[dict, dict]]:
    """Label -> (launch arguments, policy parameters).

    'chunk deadline': a latency budget as long as the chunk horizon binds never, so only the chunk deadline does.
    """
    return {
        'unpruned': ({'method': 'none'}, {}),
        f'fixed divprune {fixed_ratio:g}': ({'method': 'divprune', 'method_config': f'{{keep_ratio: {fixed_ratio}}}'},
                                            {}),
        f'latency budget {budget_ms:g} ms': ({'method': 'none'}, {'latency_budget_ms': float(budget_ms)}),
        'chunk deadline': ({'method': 'none'}, {'latency_budget_ms': float(horizon_ms)}),
    }


def stamp_seconds(text: str) -> float:
    return float(text) if text not in ('', 'n/a') else float('nan')


def run_one(args: argparse.Namespace, label: str, arguments: dict, parameters: dict, load: str) -> dict:
    busy = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(args.load_procs)] \
        if load == 'busy' else []
    listener = InferenceListener(args.domain_id)
    try:
        launch = {'model': args.model, 'mode': 'realtime', 'families': ','.join(args.families),
                  'episodes_per_family': str(args.episodes_per_family), 'seed_start': str(args.seed_start),
                  'max_steps': str(args.max_steps), 'label': label, **arguments}
        policy = {'replan_every_steps': args.replan_every_steps, 'max_chunk_age_s': args.max_chunk_age_s,
                  **parameters}
        result = run_simulation(SimRun(arguments=launch, policy_parameters=policy, domain_id=args.domain_id,
                                       torch_threads=1, log_dir=args.logs / f'{load}_{label}'.replace(' ', '_'),
                                       timeout_s=3600))
    finally:
        listener.close()
        for process in busy:
            process.kill()
            process.wait()
    if result['summary'] is None:
        raise RuntimeError(f'{load} {label}: no summary\n' + json.dumps(result['outputs'], indent=1))
    overall = result['summary']['summary']['overall']
    model_ms = np.array([float(r['model_latency_ms']) for r in listener.records if 'model_latency_ms' in r])
    kept = [float(r['kept_ratio']) for r in listener.records if r.get('kept_ratio', 'n/a') != 'n/a']
    inference_ms = np.array([float(r['inference_latency_ms']) for r in listener.records
                             if 'inference_latency_ms' in r])
    chunks = [(stamp_seconds(r.get('observation_time', '')), stamp_seconds(r.get('accepted_time', '')),
               r.get('steps_since_reset') == '1') for r in listener.records]
    late = late_chunks(chunks, args.chunk_steps, ChunkSettings(period_s=args.period_s,
                                                               max_chunk_age_s=args.max_chunk_age_s))
    records = args.logs / 'records' / f'{load}_{label}.json'.replace(' ', '_')
    records.parent.mkdir(parents=True, exist_ok=True)
    records.write_text(json.dumps(listener.records))
    return {'load': load, 'config': label, 'episodes': overall['episodes'], 'successes': overall['successes'],
            'success_rate': overall['success_rate'], 'ci95': overall['ci95'],
            'deadline_misses': late.late_fraction, 'late_time': late.late_time_fraction,
            'late_chunks': late.late, 'chunks_after_first': late.chunks,
            'over_budget': float(np.mean(model_ms > args.budget_ms)) if len(model_ms) else float('nan'),
            'inference_ms_p98': float(np.percentile(inference_ms, 98)) if len(inference_ms) else float('nan'),
            'hold_fraction': overall['hold_fraction'], 'stale_fraction': overall['stale_fraction'],
            'mean_abs_jerk': overall['mean_abs_jerk'], 'inferences': int(len(model_ms)),
            'model_ms_p50': float(np.percentile(model_ms, 50)) if len(model_ms) else float('nan'),
            'model_ms_p90': float(np.percentile(model_ms, 90)) if len(model_ms) else float('nan'),
            'kept_ratio': float(np.mean(kept)) if kept else float('nan')}


def table(rows: list[dict], budget_ms: float) -> str:
    lines = ['| load | config | success | 95% CI | deadline misses (late chunks) | time without action % '
             f'| model step > {budget_ms:g} ms | hold % | stale % | mean abs jerk m/s^3 | model p50 / p90 ms '
             '| inference p98 ms | kept ratio | inferences |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['load']} | {r['config']} | {r['success_rate'] * 100:.0f}% "
                     f"({r['successes']}/{r['episodes']}) | {r['ci95'][0] * 100:.0f}-{r['ci95'][1] * 100:.0f}% "
                     f"| {r['deadline_misses'] * 100:.1f}% ({r['late_chunks']}/{r['chunks_after_first']}) "
                     f"| {r['late_time'] * 100:.1f} | {r['over_budget'] * 100:.1f}% "
                     f"| {r['hold_fraction'] * 100:.1f} | {r['stale_fraction'] * 100:.1f} | {r['mean_abs_jerk']:.2f} "
                     f"| {r['model_ms_p50']:.1f} / {r['model_ms_p90']:.1f} | {r['inference_ms_p98']:.1f} "
                     f"| {r['kept_ratio']:.3f} | {r['inferences']} |")
    return '\n'.join(lines)


def controller_overhead(steps: int = 2000) -> str:
    """Median and p95 wall time of one decide + observe pair (what the node adds per inference when on)."""
    budget = LatencyBudget(BudgetSettings(budget_s=0.06), {'divprune': build_method('divprune')}, 'divprune')
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        decision = budget.decide()
        knob = 0.5 if decision.knob is None else decision.knob
        flops = 1e9 * (0.2 + 0.8 * knob)
        latency = (0.01 + 6e-11 * flops) * float(np.exp(rng.normal(0.0, 0.1)))
        budget.observe(decision, latency, type('Record', (), {'flops': flops, 'flops_full': 1e9,
                                                              'model_seconds': latency - 0.01})(), 'n/a')
        times.append(time.perf_counter() - started)
    micro = np.array(times[100:]) * 1e6
    return f'latency budget decide + observe: p50 {np.median(micro):.0f} us, p95 {np.percentile(micro, 95):.0f} us'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--model', default='reference', help="'reference', 'tiny-random' or a checkpoint directory")
    parser.add_argument('--budget-ms', type=float, default=60.0, help='latency_budget_ms of the budgeted node')
    parser.add_argument('--fixed-ratio', type=float, default=0.25, help='keep ratio of the fixed-budget config')
    parser.add_argument('--loads', nargs='+', choices=('none', 'busy'), default=['none', 'busy'],
                        help='machine loads to run every configuration under')
    parser.add_argument('--load-procs', type=int, default=1, help='busy processes beside the node under load')
    add_families_argument(parser, TASK_FAMILIES, ['pick'], noun='simulator task families')
    parser.add_argument('--episodes-per-family', type=int, default=3, help='episodes per family and configuration')
    parser.add_argument('--seed-start', type=int, default=1_000_000, help='first episode seed (held-out seeds)')
    parser.add_argument('--max-steps', type=int, default=0, help='control steps per episode (0: the task default)')
    parser.add_argument('--replan-every-steps', type=int, default=5, help="the node's replan_every_steps")
    parser.add_argument('--max-chunk-age-s', type=float, default=0.6, help="the node's max_chunk_age_s")
    parser.add_argument('--chunk-steps', type=int, default=8, help="the model's chunk size (reference VLA: 8)")
    parser.add_argument('--period-s', type=float, default=0.1, help="the model's control period")
    parser.add_argument('--domain-id', type=int, default=87, help='ROS_DOMAIN_ID of the simulated run')
    parser.add_argument('--out', type=Path, default=Path('outputs/latency_budget'),
                        help='folder for latency_budget.md and .json (docs/benchmarks: the documented table)')
    parser.add_argument('--logs', type=Path, default=Path('outputs/latency_budget/logs'),
                        help="folder for the runs' logs and the nodes' ~/inference records")
    parser.add_argument('--configs', nargs='+', default=[], help='run only configurations whose label has one of '
                        "these words (e.g. 'budget')")
    parser.add_argument('--controller-overhead', action='store_true', help='only time the budget itself')
    args = parser.parse_args()
    if args.controller_overhead:
        print(controller_overhead())
        return 0

    rows = []
    load_before = ', '.join(f'{v:.1f}' for v in os.getloadavg())
    for load in args.loads:
        horizon_ms = 1e3 * min(args.chunk_steps * args.period_s, args.max_chunk_age_s)
        for label, (arguments, parameters) in configurations(args.budget_ms, args.fixed_ratio, horizon_ms).items():
            if args.configs and not any(word in label for word in args.configs):
                continue
            started = time.perf_counter()
            rows.append(run_one(args, label, arguments, parameters, load))
            print(table(rows[-1:], args.budget_ms).splitlines()[-1], f'({time.perf_counter() - started:.0f} s)',
                  flush=True)
    horizon_s = min(args.chunk_steps * args.period_s, args.max_chunk_age_s)
    deadline_ms = 1e3 * (horizon_s - args.replan_every_steps * args.period_s)
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
    text = ('# Latency budget and chunk deadline in real-time simulation\n\n'
            f'Command: `python benchmarks/latency_budget.py {" ".join(sys.argv[1:])}`  \n'
            f'Commit: {commit or "n/a"}; date: {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}\n\n'
            f'Model {args.model}; {args.episodes_per_family} episodes per family of {", ".join(args.families)} from '
            f'seed {args.seed_start}, real time; chunks of {args.chunk_steps} steps of {args.period_s:g} s held at '
            f'most {args.max_chunk_age_s:g} s, a new inference every {args.replan_every_steps} steps: the next chunk '
            f'is due {deadline_ms:.0f} ms after its observation. Load busy = {args.load_procs} busy process(es) '
            f'beside the node; load average of the machine before the run {load_before}, after '
            f'{", ".join(f"{v:.1f}" for v in os.getloadavg())}.\n\n' + table(rows, args.budget_ms) + '\n')
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'latency_budget.md').write_text(text)
    (args.out / 'latency_budget.json').write_text(strict_json(rows, indent=2))
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
