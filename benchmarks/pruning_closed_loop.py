r"""Pruning methods side by side on the reference VLA: closed-loop success, and latency measured interleaved.

Phase 1 (success): every configuration runs the same held-out episodes of every task family in the
simulator (parallel worker processes, one torch thread each); success with a 95% Wilson interval, the success
difference to unpruned paired on the same episodes (Newcombe's interval) with the episodes lost and gained,
kept visual tokens, FLOPs ratio and selection overhead per configuration. A targets section checks the targets
given with ``--target LABEL=SPEEDUP:LOSS`` (default: SpecPrune within 2 points of unpruned at 1.5x, VLA-Pruner 25%
within 3 points at 1.8x) and ``--target-baselines`` (default: above random and FastV) and says per part whether
the interval clears the bar ('met'), misses it ('missed') or straddles it ('unresolved').

Phase 2 (speed): the observations the unpruned policy saw in a few closed-loop episodes are replayed through
every configuration in ONE process, round-robin step by step (each configuration keeps its own temporal
state), so the latency medians and the speedups vs unpruned are measured side by side. The paper's
self-speculation check (layers 0-1 top-k vs last-layer top-k of task attention) runs on the same replay.
Columns: latency = the whole policy step (vision stem, decoder, selection, action head); decoder ms = the
decoder layers alone (selection and attention probes excluded); selection ms = the method's hooks + probes;
speedup = ratio of the medians over every replayed step (warm-up steps, where a method does not prune yet,
included); speedup steps >= 3 = the same over the steady-state steps only (step index >= 3 of each episode, past
every method's warm-up: VLA-Pruner's first w = 3 steps, SpecPrune's first), same observations for all.

Phase 3 (speed at deployment shapes, ``--wide WIDTHxLAYERS ...``, default 512x8 and 256x32): the reference
VLA is 128 wide and 6 deep, so per-op overheads weigh more than on a real VLA, and the layers the methods keep
at full width (SpecPrune's 0-1, VLA-Pruner's 0..K-1) are a third of the decoder instead of a tenth. The same
replay runs through random-initialised copies of the reference VLA with wider / deeper decoders (the token
layout, vision stem and methods are the same; the weights are random, so only the latency, kept-token and
FLOPs columns mean anything; depth-scaled defaults such as VLA-Pruner's K and SpecPrune's layer-pruning layers
follow the depth).

    python benchmarks/pruning_closed_loop.py --episodes-per-family 34 --out outputs/benchmarks
    python benchmarks/pruning_closed_loop.py --episodes-per-family 10 --configs 'specprune (full)' \
        --target 'specprune (full)=2.0:0.05' --wide

The markdown and JSON results are written before the plot is drawn.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from specprune_ros.command_line import HelpFormatter
from specprune_ros.core.json_documents import strict_json
from specprune_ros.evaluation.closed_loop import PolicySpec, evaluate, outcome_table, run_episode, summarize
from specprune_ros.evaluation.statistics import paired_difference
from specprune_ros.models.loading import load_model, load_policy
from specprune_ros.policy.interface import Observation
from specprune_ros.policy.reference_backend import reference_policy
from specprune_ros.policy.reference_vla import ReferenceVLA
from specprune_ros.pruning import build_method, self_speculation_hit_rate
from specprune_ros.pruning.registry import method_config
from specprune_ros.sim import EVAL_SEED_START, TASK_FAMILIES, TabletopEnv

STEADY_FROM = 3   # steady state: every method's warm-up is over (VLA-Pruner's window w = 3; SpecPrune needs 1)

CONFIGS: tuple[PolicySpec, ...] = (
    PolicySpec(method='none', label='none'),
    PolicySpec(method='specprune', label='specprune (full)'),
    PolicySpec(method='specprune_static', label='specprune static only'),
    PolicySpec(method='specprune_static_layer', label='specprune +layer'),
    PolicySpec(method='specprune', method_config={'static_gathers': 1}, label='specprune one gather'),
    PolicySpec(method='specprune', method_config={'task_rows': 'text_action'}, label='specprune text+action rows'),
    PolicySpec(method='specprune', method_config={'importance_every_layer': False},
               label='specprune sparse importance'),
    PolicySpec(method='specprune', method_config={'task_rows': 'text_action', 'importance_every_layer': False},
               label='specprune text+action rows, sparse importance'),
    PolicySpec(method='specprune', method_config={'keep_regions': [[1, 0.0, 0.0, 1.0, 1.0]]},
               label='specprune, wrist camera unpruned'),
    PolicySpec(method='vla_pruner', method_config={'keep_ratio': 0.5}, label='vla_pruner 50%'),
    PolicySpec(method='vla_pruner', method_config={'keep_ratio': 0.25}, label='vla_pruner 25%'),
    PolicySpec(method='vla_pruner', method_config={'keep_ratio': 0.125}, label='vla_pruner 12.5%'),
    PolicySpec(method='fastv', method_config={'keep_ratio': 0.25}, label='fastv 25%'),
    PolicySpec(method='divprune', method_config={'keep_ratio': 0.25}, label='divprune 25%'),
    PolicySpec(method='random', method_config={'keep_ratio': 0.25}, label='random 25%'),
    PolicySpec(method='vla_cache', label='vla_cache'),
    PolicySpec(method='coverage_ranked', label='coverage_ranked'),
)


@dataclass
class _Recorder:
    """Wraps a policy and keeps every observation it was asked to act on."""

    policy: object
    seen: list

    def reset(self) -> None:
        self.policy.reset()

    def predict(self, observation: Observation):
        self.seen.append(observation)
        return self.policy.predict(observation)


def replay_observations(model: str, families: list[str], episodes: int, seed_start: int,
                        execute_steps: int | None = None) -> list[list[Observation]]:
    """Per episode, the observations the unpruned policy acted on in closed loop."""
    env = TabletopEnv()
    recorder = _Recorder(load_policy(model, 'none'), [])
    sequences = []
    for i in range(episodes):
        for family in families:
            recorder.seen = []
            run_episode(env, recorder, family, seed_start + i, execute_steps=execute_steps)
            sequences.append(recorder.seen)
    return sequences


def widened(model: str, spec: str, seed: int = 0):
    """A random-initialised copy of ``model``'s architecture with a 'WIDTHxLAYERS' decoder (MLP 3 x width)."""
    width, layers = (int(v) for v in spec.lower().split('x'))
    base = load_model(model).config
    torch.manual_seed(seed)
    heads = max(1, width // 64)
    return ReferenceVLA(replace(base, hidden_size=width, num_layers=layers, mlp_size=3 * width, num_heads=heads,
                                num_kv_heads=heads)).eval()


def measure_latency(vla, configs: tuple[PolicySpec, ...], sequences: list[list[Observation]],
                    threads: int, steady_from: int = STEADY_FROM) -> dict[str, dict]:
    """Round-robin replay through every configuration in this process.

    Medians per configuration, over all steps and over the steady-state steps (step index >= ``steady_from`` in every
    episode, the same observations for every configuration).
    """
    if not any(sequences):              # --latency-episodes 0: success only
        nan = float('nan')
        return {c.name: {'latency_ms_median': nan, 'speedup': nan, 'steady_speedup': nan, 'steady_steps': 0,
                         'selection_ms_median': nan, 'decoder_ms_median': nan, 'steps': 0} for c in configs} \
            | {'_self_speculation_hit_rate': None}
    torch.set_num_threads(threads)
    policies = {c.name: reference_policy(vla, build_method(c.method, c.method_config, seed=c.seed)) for c in configs}
    probe = reference_policy(vla, build_method('none', {'self_speculation': True}))
    samples: dict[str, list[float]] = {name: [] for name in policies}
    steady: dict[str, list[float]] = {name: [] for name in policies}
    selection: dict[str, list[float]] = {name: [] for name in policies}
    decoder: dict[str, list[float]] = {name: [] for name in policies}
    flops: dict[str, list[float]] = {name: [] for name in policies}
    kept: dict[str, list[float]] = {name: [] for name in policies}
    hits: list[float] = []
    for warm in range(2):  # warm-up: every configuration runs a couple of steps first
        for policy in policies.values():
            policy.predict(sequences[0][0])
    for sequence in sequences:
        for policy in [*policies.values(), probe]:
            policy.reset()
        for index, observation in enumerate(sequence):
            for name, policy in policies.items():
                output = policy.predict(observation)
                samples[name].append(output.latency_s)
                if index >= steady_from:
                    steady[name].append(output.latency_s)
                selection[name].append(output.record.selection_seconds + output.record.probe_seconds)
                decoder[name].append(output.record.model_seconds)
                flops[name].append(output.record.flops / output.record.flops_full)
                kept[name].append(float(np.mean(output.record.visual_kept_per_layer)))
            hit = self_speculation_hit_rate(probe.predict(observation).record)
            if not np.isnan(hit):
                hits.append(hit)
    base = statistics.median(samples[configs[0].name])
    steady_base = statistics.median(steady[configs[0].name]) if steady[configs[0].name] else float('nan')
    return {name: {'latency_ms_median': statistics.median(v) * 1e3, 'speedup': base / statistics.median(v),
                   'steady_speedup': steady_base / statistics.median(steady[name]) if steady[name] else float('nan'),
                   'steady_steps': len(steady[name]),
                   'selection_ms_median': statistics.median(selection[name]) * 1e3,
                   'decoder_ms_median': statistics.median(decoder[name]) * 1e3, 'steps': len(v),
                   'flops_ratio': float(np.mean(flops[name])), 'visual_kept': float(np.mean(kept[name]))}
            for name, v in samples.items()} | {'_self_speculation_hit_rate': float(np.mean(hits)) if hits else None}


def parse_extra(text: str) -> PolicySpec:
    """'LABEL=METHOD:JSON' (JSON optional) -> a configuration for ``--extra``."""
    label, sep, rest = text.partition('=')
    method, _, config = rest.partition(':')
    if not sep or not label.strip() or not method.strip():
        raise SystemExit(f'--extra {text!r}: expected LABEL=METHOD:JSON')
    return PolicySpec(method=method.strip(), method_config=json.loads(config) if config.strip() else None,
                      label=label.strip())


def check_configurations(args: argparse.Namespace, configs: tuple[PolicySpec, ...]) -> None:
    """Refuse, before any episode runs, what would waste or corrupt a run.

    Unknown ``--configs`` / ``--target`` labels (a typo compared nothing), an ``--extra`` label taken twice (it
    replaced that configuration's results), a method or setting no method has (it failed after the others ran),
    counts below 1.
    """
    known = [c.name for c in CONFIGS]
    for name in args.configs or ():
        if name not in known:
            raise SystemExit(f'--configs: unknown label {name!r}; known: {known}')
    labels = [c.name for c in configs]
    taken = sorted({label for label in labels if labels.count(label) > 1})
    if taken:
        raise SystemExit(f'--extra: label(s) {taken} already name a configuration')
    for name, _, _ in args.targets or ():
        if name not in labels:
            raise SystemExit(f'--target: no configuration {name!r} in this run; run: {labels}')
    for c in configs:
        try:
            method_config(c.method, c.method_config)
        except (TypeError, ValueError) as error:
            raise SystemExit(f'configuration {c.name!r}: {error}') from None
    for option in ('episodes_per_family', 'workers', 'threads'):
        if getattr(args, option) < 1:
            raise SystemExit(f"--{option.replace('_', '-')} must be at least 1")
    if args.latency_episodes < 0 or (args.execute_steps is not None and args.execute_steps < 1):
        raise SystemExit('--latency-episodes must be >= 0 and --execute-steps >= 1')


def points(delta: float, interval: list[float] | tuple[float, float]) -> str:
    """A success-rate difference and its interval in percentage points, e.g. '-4.3 (-8.1 to -0.9)'."""
    return f"{delta * 100:+.1f} ({interval[0] * 100:+.1f} to {interval[1] * 100:+.1f})"


# default targets: (config, steady speedup, allowed success loss vs none); each is also compared with the baselines
TARGETS = (('specprune (full)', 1.5, 0.02), ('vla_pruner 25%', 1.8, 0.03))
TARGET_BASELINES = ('random 25%', 'fastv 25%')


def parse_target(text: str) -> tuple[str, float, float]:
    """'LABEL=SPEEDUP:LOSS' (LOSS a fraction: 0.02 = 2 points) -> a target for ``--target``."""
    label, sep, rest = text.rpartition('=')
    speedup, colon, loss = rest.partition(':')
    try:
        if not sep or not colon or not label.strip():
            raise ValueError
        return label.strip(), float(speedup), float(loss)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected LABEL=SPEEDUP:LOSS, e.g. "vla_pruner 25%=1.8:0.03", '
                                         f'got {text!r}') from None


def target_lines(outcomes: dict[str, list[bool]], speed: dict, wide: dict,
                 targets=TARGETS, baselines=TARGET_BASELINES) -> list[str]:
    """One line per target.

    The paired success differences and the steady speedups, with a verdict per part: 'met' (the whole interval clears
    the bar), 'missed' (the whole interval misses it) or 'unresolved' (the interval straddles it: more episodes needed).
    """
    def verdict(low: float, high: float, bar: float) -> str:
        return 'met' if low >= bar else 'missed' if high < bar else 'unresolved'

    lines = []
    for name, speedup_target, allowed_loss in targets:
        if name not in outcomes:
            continue
        delta, low, high = paired_difference(outcomes[name], outcomes['none'])
        parts = [f"success vs none {points(delta, (low, high))}, within {allowed_loss * 100:.0f} points: "
                 f"{verdict(low, high, -allowed_loss)}"]
        for baseline in baselines:
            if baseline in outcomes:
                d, lo, hi = paired_difference(outcomes[name], outcomes[baseline])
                parts.append(f"vs {baseline} {points(d, (lo, hi))}, above: {verdict(lo, hi, 1e-9)}")
        speeds = {'reference': speed} | wide
        parts.append('steady speedup ' + ', '.join(f"{shape} {s[name]['steady_speedup']:.2f}x" for shape, s in
                                                   speeds.items()) + f' (target {speedup_target:.1f}x)')
        lines.append(f"- **{name}**: " + '; '.join(parts))
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """Success (with its interval) against speedup.

    Intervals touching 0% or 100% and rows without a finite speedup are drawn as they can be (error bars never negative;
    no speedup: left out).
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if not (np.isfinite(row['speedup']) and np.isfinite(row['success'])):
            continue
        low, high = row['ci95']
        below, above = max(row['success'] - low, 0.0) * 100, max(high - row['success'], 0.0) * 100
        ax.errorbar(row['speedup'], row['success'] * 100, yerr=[[below], [above]], fmt='o', capsize=3)
        ax.annotate(row['config'], (row['speedup'], row['success'] * 100), fontsize=7, xytext=(4, 3),
                    textcoords='offset points')
    ax.set_xlabel('model-step speedup vs unpruned (interleaved medians)')
    ax.set_ylabel('closed-loop success % (95% CI)')
    ax.set_title('Pruning methods on the reference VLA')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--model', default='reference', help="'reference', 'tiny-random' or a checkpoint directory")
    parser.add_argument('--episodes-per-family', type=int, default=34, help='34 x 3 families = 102 per configuration')
    parser.add_argument('--latency-episodes', type=int, default=2,
                        help='episodes per family replayed for latency (0: success only, at no shape)')
    parser.add_argument('--execute-steps', type=int, default=None,
                        help='actions executed per chunk before re-planning (default: the whole chunk of 8)')
    parser.add_argument('--workers', type=int, default=2, help='worker processes in the success phase')
    parser.add_argument('--threads', type=int, default=2, help='torch threads in the latency phase')
    parser.add_argument('--configs', nargs='*', default=None, help='labels to run (default: all)')
    parser.add_argument('--extra', action='append', default=[], metavar='LABEL=METHOD:JSON',
                        help="an extra configuration, e.g. 'specprune alpha 2=specprune:{\"controller\": "
                        "{\"alpha\": 2}}' (repeatable; always run, with --configs too)")
    parser.add_argument('--wide', nargs='*', default=['512x8', '256x32'],
                        help="also time the methods on random 'WIDTHxLAYERS' decoders (deployment-like shapes; "
                        "latency only); none given: skip")
    parser.add_argument('--target', action='append', type=parse_target, default=None, dest='targets',
                        metavar='LABEL=SPEEDUP:LOSS',
                        help='a target: configuration LABEL at a steady speedup of SPEEDUP with at most LOSS '
                        '(fraction) less success than unpruned (repeatable; default: ' + ', '.join(
                            f"'{n}={s}:{loss}'".replace('%', '%%') for n, s, loss in TARGETS) + ')')
    parser.add_argument('--target-baselines', nargs='*', default=list(TARGET_BASELINES),
                        help='configurations every target must beat in success')
    parser.add_argument('--out', type=Path, default=Path('outputs/benchmarks'),
                        help='directory for the markdown, JSON and PNG results')
    args = parser.parse_args(argv)

    families = list(TASK_FAMILIES)
    extra = tuple(parse_extra(text) for text in args.extra)
    configs = tuple(c for c in CONFIGS if args.configs is None or c.name in args.configs or c.name == 'none')
    configs += extra
    configs = tuple(PolicySpec(args.model, c.method, c.method_config, c.label) for c in configs)
    check_configurations(args, configs)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    episodes = {c.name: evaluate(c, families, args.episodes_per_family, workers=args.workers,
                                 execute_steps=args.execute_steps) for c in configs}
    summaries = {name: summarize(results, name) for name, results in episodes.items()}
    outcomes = {name: [bool(r.success) for r in results] for name, results in episodes.items()}
    sequences = replay_observations(args.model, families, args.latency_episodes, EVAL_SEED_START + 500_000,
                                    args.execute_steps)
    speed = measure_latency(load_model(args.model), configs, sequences, args.threads)
    # the wide decoders replay the same steps: none with --latency-episodes 0
    wide = {spec: measure_latency(widened(args.model, spec), configs, sequences, args.threads)
            for spec in (args.wide if any(sequences) else ())}

    rows = []
    unpruned = np.array(outcomes['none'])
    for c in configs:
        s = summaries[c.name]['overall']
        won = np.array(outcomes[c.name])
        delta = paired_difference(won, unpruned)
        rows.append({'config': c.name, 'success': s['success_rate'], 'ci95': s['ci95'], 'episodes': s['episodes'],
                     'delta_vs_none': delta[0], 'delta_ci95': list(delta[1:]),
                     'lost_vs_none': int(np.sum(unpruned & ~won)), 'gained_vs_none': int(np.sum(~unpruned & won)),
                     'families': {f: v['success_rate'] for f, v in summaries[c.name]['families'].items()},
                     'visual_kept': s['mean_visual_kept'], 'flops_ratio': s['flops_ratio'], **speed[c.name]})
    hit_rate = speed['_self_speculation_hit_rate']
    lines = [f"Model {args.model!r}, {args.episodes_per_family} held-out episodes per family x {len(families)} "
             f"families per configuration, {args.execute_steps or 8} actions executed per chunk; latency: "
             f"{sum(map(len, sequences))} replayed steps per configuration, interleaved, {args.threads} threads."
             + (' Self-speculation (layers 0-1 top-k in last-layer top-k, text attention): '
                f'{hit_rate:.1%}' if hit_rate is not None else ''),
             '',
             '| config | success (95% CI) | vs none, paired (95% CI) | lost / gained | ' + ' | '.join(families)
             + ' | visual kept (mean/layer) | FLOPs | '
             f'latency ms | speedup | speedup steps >= {STEADY_FROM} | decoder ms | selection ms |',
             '|---|---|---|---|' + '---|' * len(families) + '---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['config']} | {r['success'] * 100:.1f}% "
                     f"({r['ci95'][0] * 100:.0f}-{r['ci95'][1] * 100:.0f}) | "
                     f"{points(r['delta_vs_none'], r['delta_ci95'])} | {r['lost_vs_none']} / {r['gained_vs_none']} | "
                     + ' | '.join(f"{r['families'][f] * 100:.0f}%" for f in families)
                     + f" | {r['visual_kept']:.0f} | {r['flops_ratio'] * 100:.0f}% | {r['latency_ms_median']:.1f} | "
                       f"{r['speedup']:.2f}x | {r['steady_speedup']:.2f}x | {r['decoder_ms_median']:.1f} | "
                       f"{r['selection_ms_median']:.2f} |")
    lines += ['', 'Targets (success differences paired on the same episodes; Newcombe 95% intervals):', '',
              *target_lines(outcomes, speed, wide, tuple(args.targets or TARGETS), tuple(args.target_baselines))]
    lines += ['', 'How the episodes ended (all families; `sim/outcomes.py`):', '',
              outcome_table([summaries[c.name] for c in configs], per_family=False)]
    for spec, latency in wide.items():
        lines += ['', f'Latency on a random-initialised {spec} decoder (same layout, methods and replayed steps; '
                      'success does not apply):', '',
                  '| config | visual kept (mean/layer) | FLOPs | latency ms | speedup | '
                  f'speedup steps >= {STEADY_FROM} | decoder ms | selection ms |',
                  '|---|---|---|---|---|---|---|---|']
        lines += [f"| {c.name} | {latency[c.name]['visual_kept']:.0f} | {latency[c.name]['flops_ratio'] * 100:.0f}% | "
                  f"{latency[c.name]['latency_ms_median']:.1f} | {latency[c.name]['speedup']:.2f}x | "
                  f"{latency[c.name]['steady_speedup']:.2f}x | "
                  f"{latency[c.name]['decoder_ms_median']:.1f} | {latency[c.name]['selection_ms_median']:.2f} |"
                  for c in configs]
    table = '\n'.join(lines)
    (args.out / 'pruning_closed_loop.md').write_text(table + '\n')
    (args.out / 'pruning_closed_loop.json').write_text(strict_json(
        {'rows': rows, 'summaries': summaries, 'outcomes': outcomes,
         'episode_keys': [[r.family, r.seed] for r in episodes['none']], 'wide': wide,
         'self_speculation_hit_rate': speed['_self_speculation_hit_rate'],
         'minutes': (time.time() - started) / 60}, indent=2))
    print(table)
    written = 'md,json'
    try:
        plot(rows, args.out / 'pruning_closed_loop.png')
        written += ',png'
    except Exception as error:   # the results are on disk already; a plot must not lose the run
        print(f'warning: the plot failed ({type(error).__name__}: {error}); the results are in the md and json')
    print(f"\nwrote {args.out}/pruning_closed_loop.{{{written}}} in {(time.time() - started) / 60:.1f} min")


if __name__ == '__main__':
    main()
