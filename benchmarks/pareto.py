r"""Success against speed for every pruning method across budgets: the curve a deployment chooses from.

Phase 1 (success): every configuration runs the same held-out episodes of every task family in the simulator on
each checkpoint of ``--models`` (the shipped reference VLA by default; ``NAME=DIRECTORY`` for others), paired with
unpruned on the same checkpoint and episodes (Newcombe's interval of the difference). Each configuration's
outcomes are cached under ``<out>/pareto_runs/`` keyed by the checkpoint's contents, the episodes and the
method's whole resolved configuration (so a changed default runs again), so an interrupted run continues where it
stopped and a grid can be extended later.

Phase 2 (speed): ``benchmarks/deployment_latency.py`` times every configuration in one process, interleaved, at a
deployment shape (default: the reference VLA's 2 x 144-patch layout with a random 256 x 32 decoder; the 128-wide
reference VLA itself is dominated by per-op overheads, so its own speedups say little about a real VLA).

Budgets: the keep ratio of every keep-ratio method (75 / 50 / 35 / 25 / 15 / 10 % by default; coverage_ranked's
fine-mode and early-stage ratios keep their proportions to it, as its latency-budget knob scales them), SpecPrune's
scale of K (``controller.alpha``), and the default of
methods without a budget. The front: the configurations that no other configuration beats in both success and
speedup, per checkpoint. Several checkpoints side by side
show how much a method's standing depends on what the policy practised in training (one panel per checkpoint, a
table per checkpoint and one table with every checkpoint's success per configuration).

Keeping a report: each row of ``pareto.json`` holds its run (``run``: the cache key, i.e. the checkpoint's path and
contents digest, the episodes and the method's spec and resolved configuration; the task families; and ``outcomes``,
'1' or '0' per episode in evaluation order: seed by seed from ``seed_start``, the families in turn).
``--seed-cache-from`` writes those outcomes into the cache before running, for rows whose key is exactly one of this
run's (the log counts the rest and says why each was skipped), so ``--cached-only`` re-renders a committed report on
a fresh machine and a grid extends elsewhere without rerunning what is known. A seeded entry holds success only.
``--carry-rows-from`` shows an earlier report's rows of the checkpoints (by name) this run does not evaluate, as
they are (for a report whose rows hold no outcomes): marked carried, with that run's command, commit and date; the
speedup is this run's where it timed the same label, else the earlier run's, marked †; the front is marked on the
speedups shown.

    python benchmarks/pareto.py --episodes-per-family 100 --out docs/benchmarks            # 300 episodes each
    python benchmarks/pareto.py --episodes-per-family 2 --methods random vla_pruner --keep-ratios 0.5 0.25 \
        --speed-steps 3 --out outputs/pareto                                                  # a smoke run
    python benchmarks/pareto.py --models shipped=reference fair=checkpoints/reference_vla_fair --out docs/benchmarks
    python benchmarks/pareto.py --models new=outputs/new_checkpoint --seed-cache-from docs/benchmarks/pareto.json \
        --carry-rows-from docs/benchmarks/pareto.json --out docs/benchmarks    # one checkpoint beside the earlier ones
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np

from specprune_ros.command_line import HelpFormatter, positive_int
from specprune_ros.core.json_documents import strict_json
from specprune_ros.evaluation.closed_loop import PolicySpec, evaluate, summarize
from specprune_ros.evaluation.statistics import paired_difference, wilson_interval
from specprune_ros.models.loading import REFERENCE_CHECKPOINT
from specprune_ros.pruning import build_method, method_config
from specprune_ros.sim import EVAL_SEED_START, TASK_FAMILIES

REPO = Path(__file__).resolve().parents[1]
KEEP_RATIOS = (0.75, 0.5, 0.35, 0.25, 0.15, 0.10)
SPECPRUNE_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
METHODS = ('specprune', 'vla_pruner', 'fastv', 'divprune', 'random', 'coverage_ranked', 'vla_cache')
BASELINE = 'none'
SPEED_FIELDS = ('speedup', 'speedup_ci95', 'kept_visual_ratio', 'total_ms')


def budget_grid(methods: list[str], keep_ratios: tuple[float, ...], scales: tuple[float, ...]) -> list[dict]:
    """One configuration per method and budget: label, method, method_config and the budget it stands for."""
    grid = [{'label': BASELINE, 'method': BASELINE, 'method_config': None, 'budget': 1.0}]
    # a method or budget named twice would run twice under one label (the JSON had both rows, the table one)
    methods, keep_ratios, scales = (list(dict.fromkeys(values)) for values in (methods, keep_ratios, scales))
    for method in methods:
        config = build_method(method).config
        if hasattr(config, 'keep_ratio'):
            grid += [{'label': f'{method} {ratio * 100:g}%', 'method': method,
                      'method_config': keep_ratio_config(method, ratio), 'budget': ratio} for ratio in keep_ratios]
        elif hasattr(getattr(config, 'controller', None), 'alpha'):
            grid += [{'label': f'{method} x{scale:g}', 'method': method,
                      'method_config': {'controller': {'alpha': scale}}, 'budget': scale} for scale in scales]
        else:
            grid.append({'label': method, 'method': method, 'method_config': None, 'budget': None})
    return grid


def keep_ratio_config(name: str, ratio: float) -> dict:
    """A keep-ratio budget for method ``name``, as the method's own budget knob sets it.

    coverage_ranked's fine-mode ratio keeps its proportion to the coarse one and its early stage is what its
    ``keep_fraction`` gives at that budget (both at most 1).
    """
    knob = build_method(name)
    config = knob.config
    settings = {'keep_ratio': ratio}
    if getattr(config, 'fine_keep_ratio', None) and config.keep_ratio:
        settings['fine_keep_ratio'] = round(min(1.0, ratio * config.fine_keep_ratio / config.keep_ratio), 4)
    if getattr(config, 'early_keep_ratio', None) and hasattr(knob, 'keep_fraction'):
        knob.set_budget(ratio)
        settings['early_keep_ratio'] = round(knob.keep_fraction('coarse', early=True), 4)
    return settings


def parse_models(specs: list[str]) -> dict[str, str]:
    """``NAME=DIRECTORY`` or a bare model (named after itself or its folder) -> {name: model}."""
    models = {}
    for spec in specs:
        name, _, model = spec.rpartition('=') if '=' in spec else (None, '', spec)
        name = name or Path(model).name or model
        if name in models:
            raise ValueError(f'two checkpoints named {name!r}; name them with NAME=DIRECTORY')
        models[name] = model
    return models


def model_key(model: str) -> str:
    """A short digest of the checkpoint's files (or the model's name when it is built in memory)."""
    folder = REFERENCE_CHECKPOINT if model == 'reference' else Path(model)
    digest = hashlib.sha1(model.encode())
    if folder.is_dir():
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def cache_key(model: str, spec: PolicySpec, episodes_per_family: int, execute_steps: Optional[int],
              digest: Optional[str] = None) -> str:
    """What makes two success runs the same: checkpoint contents, configuration with every default, episodes.

    ``digest``: the checkpoint's ``model_key`` when the caller has it already.
    """
    resolved = None if spec.method == BASELINE else asdict(method_config(spec.method, spec.method_config))
    return json.dumps({'model': digest or model_key(model), 'spec': asdict(spec), 'resolved': resolved,
                       'episodes': episodes_per_family, 'seed_start': EVAL_SEED_START,
                       'execute_steps': execute_steps}, sort_keys=True, default=str)


def success_phase(grid: list[dict], model: str, episodes_per_family: int, workers: int, cache: Path,
                  execute_steps: Optional[int], cached_only: bool = False) -> dict[str, dict]:
    """Outcomes per configuration: run, or read from the cache when the same run is there (only that if asked)."""
    cache.mkdir(parents=True, exist_ok=True)
    families = list(TASK_FAMILIES)
    results = {}
    for entry in grid:
        spec = PolicySpec(model, entry['method'], entry['method_config'], entry['label'])
        key = cache_key(model, spec, episodes_per_family, execute_steps)
        path = cache_path(cache, key)
        if path.is_file():
            results[entry['label']] = json.loads(path.read_text())
            print(f"{entry['label']}: {results[entry['label']]['summary']['overall']['success_rate']:.1%} (cached)")
            continue
        if cached_only:
            print(f"{entry['label']}: not run on {model!r} (--cached-only)")
            continue
        episodes = evaluate(spec, families, episodes_per_family, workers=workers, execute_steps=execute_steps)
        record = {'key': json.loads(key), 'summary': summarize(episodes, entry['label']),
                  'episodes': [[r.family, r.seed, bool(r.success)] for r in episodes]}
        path.write_text(strict_json(record))
        results[entry['label']] = record
    return results


def cache_path(cache: Path, key: str) -> Path:
    """Where the cache holds the outcomes of the run that ``key`` describes."""
    return cache / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def episode_order(families: list[str], episodes_per_family: int, seed_start: int) -> list[list]:
    """[family, seed] in the order the evaluation runs them, which is the order of a row's outcome string."""
    return [[family, seed_start + i] for i in range(episodes_per_family) for family in families]


def run_record(record: dict) -> dict:
    """A cache entry in a report row's form: its key, the task families and '1' / '0' per episode in order."""
    families = list(dict.fromkeys(family for family, _, _ in record['episodes']))
    key = record['key']
    if [[f, s] for f, s, _ in record['episodes']] != episode_order(families, key['episodes'], key['seed_start']):
        raise ValueError(f"the cached episodes of {key['spec']['label']!r} are not in evaluation order")
    return {'key': key, 'families': families,
            'outcomes': ''.join('1' if won else '0' for _, _, won in record['episodes'])}


def outcome_summary(episodes: list[list], label: str) -> dict:
    """Success overall and per family (Wilson 95% CI) from outcomes alone: the part of ``summarize`` rows use."""
    def block(wins: list[bool]) -> dict:
        low, high = wilson_interval(sum(wins), len(wins))
        return {'episodes': len(wins), 'successes': sum(wins), 'success_rate': sum(wins) / max(len(wins), 1),
                'ci95': [low, high]}
    families = sorted({family for family, _, _ in episodes})
    return {'label': label, 'overall': block([won for _, _, won in episodes]),
            'families': {f: block([won for family, _, won in episodes if family == f]) for f in families}}


def mismatch(earlier: dict, mine: Optional[dict]) -> str:
    """Why an earlier run's key is not this run's key for the same checkpoint name and label."""
    if mine is None:
        return 'not a configuration of this run'
    if earlier['spec'].get('model') != mine['spec']['model']:
        return 'another checkpoint path'
    checks = (('model', 'checkpoint contents differ'), ('episodes', 'other episodes'), ('seed_start', 'other episodes'),
              ('execute_steps', 'other execute steps'), ('resolved', 'resolved configuration differs'),
              ('spec', 'configuration differs'))
    return next((reason for field, reason in checks if earlier.get(field) != mine.get(field)), 'key differs')


def seed_row(row: dict, wanted: dict[str, dict], cache: Path, source: Path) -> str:
    """Write one report row's outcomes into the cache when its key is one of this run's; 'seeded' or why not."""
    run = row.get('run')
    if not run:
        return 'no outcomes in the row (an older report)'
    key = json.dumps(run['key'], sort_keys=True, default=str)
    if key not in wanted:
        return mismatch(run['key'], wanted.get((row['checkpoint'], row['label'])))
    if run['families'] != list(TASK_FAMILIES):
        return 'other task families'
    order = episode_order(run['families'], run['key']['episodes'], run['key']['seed_start'])
    if len(run['outcomes']) != len(order) or set(run['outcomes']) - {'0', '1'}:
        return 'outcomes do not cover the episodes'
    episodes = [[family, seed, won == '1'] for (family, seed), won in zip(order, run['outcomes'])]
    path = cache_path(cache, key)
    if path.is_file():
        held = [won for _, _, won in json.loads(path.read_text())['episodes']]
        same = held == [won for _, _, won in episodes]
        return 'already in the cache' if same else 'the cache holds other outcomes for the key (kept those)'
    record = {'key': run['key'], 'summary': outcome_summary(episodes, run['key']['spec']['label']),
              'episodes': episodes, 'seeded_from': str(source)}
    path.write_text(strict_json(record))
    return 'seeded'


def seed_cache(sources: list[Path], grid: list[dict], models: dict[str, str], episodes_per_family: int,
               execute_steps: Optional[int], cache: Path) -> Counter:
    """Fill the cache with earlier reports' outcomes whose key is exactly one of this run's; counts per result."""
    cache.mkdir(parents=True, exist_ok=True)
    wanted = {}                 # this run's key -> its dict, and (checkpoint name, label) -> its dict
    for name, model in models.items():
        digest = model_key(model)
        for entry in grid:
            spec = PolicySpec(model, entry['method'], entry['method_config'], entry['label'])
            key = cache_key(model, spec, episodes_per_family, execute_steps, digest)
            wanted[key] = wanted[(name, entry['label'])] = json.loads(key)
    counts = Counter()
    for source in sources:
        for row in json.loads(Path(source).read_text())['rows']:
            counts[seed_row(row, wanted, cache, source)] += 1
    skipped = sum(counts.values()) - counts['seeded']
    print(f"seeded the cache with {counts['seeded']} configurations from {', '.join(map(str, sources))}; "
          f"skipped {skipped}" + ''.join(f'\n  {n}: {reason}' for reason, n in counts.items() if reason != 'seeded'))
    return counts


def carry_rows(path: Path, evaluated: set[str], speed: dict) -> tuple[list[dict], dict]:
    """An earlier report's rows of checkpoints this run does not evaluate, and the runs they come from.

    Success and intervals stay the earlier run's (``carried_from``); the speed is this run's where it timed the same
    label, else the earlier one (``speed_from``: the run that timed it). The front is marked again on the speeds kept.
    """
    report = json.loads(Path(path).read_text())
    meta = report['meta']
    source = f"{meta['commit']} {meta['date']}"
    sources = {**meta.get('carried', {}), source: {k: meta[k] for k in ('command', 'commit', 'date')}}
    rows = []
    for earlier in (r for r in report['rows'] if r['checkpoint'] not in evaluated):
        row = {**earlier, 'carried_from': earlier.get('carried_from', source)}
        if row['label'] in speed:
            row.update({field: speed[row['label']].get(field) for field in SPEED_FIELDS})
            row.pop('speed_from', None)
        elif row.get('speedup') is not None:
            row.setdefault('speed_from', source)
        rows.append(row)
    for checkpoint in dict.fromkeys(r['checkpoint'] for r in rows):
        mark_front([r for r in rows if r['checkpoint'] == checkpoint])
    used = {r[k] for r in rows for k in ('carried_from', 'speed_from') if k in r}
    retimed = sum('speed_from' not in r and r.get('speedup') is not None for r in rows)
    print(f"carried {len(rows)} rows of {', '.join(dict.fromkeys(r['checkpoint'] for r in rows)) or 'no checkpoint'} "
          f"from {path} ({source}): {retimed} with this run's speed, {sum('speed_from' in r for r in rows)} with an "
          f"earlier one; left out {len(report['rows']) - len(rows)} rows of checkpoints this run evaluates")
    return rows, {k: v for k, v in sources.items() if k in used}


def report_json(report: dict) -> str:
    """The report indented, with each row's ``run`` (cache key and outcomes) on one line to keep the file readable."""
    runs, rows = {}, []
    for index, row in enumerate(report['rows']):
        if 'run' in row:
            marker = f'@run{index}@'
            runs[json.dumps(marker)] = json.dumps(row['run'], sort_keys=True)
            row = {**row, 'run': marker}
        rows.append(row)
    text = strict_json({**report, 'rows': rows}, indent=2)
    for marker, run in runs.items():
        text = text.replace(marker, run, 1)
    return text


def speed_phase(grid: list[dict], shape: list[str], steps: int, threads: int) -> tuple[dict, dict, list]:
    """The latency harness's rows per configuration label (one interleaved run in its own process); none at 0 steps."""
    if steps <= 0:
        return {}, {'device': 'not measured', 'command': '--speed-steps 0'}, [{'shape': 'no speed phase'}]
    extras = [f"{e['label']}={e['method']}:{json.dumps(e['method_config'] or {})}" for e in grid
              if e['label'] != BASELINE]
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, str(REPO / 'benchmarks' / 'deployment_latency.py'), *shape, '--steps', str(steps),
                   '--threads', str(threads), '--methods', BASELINE, '--no-reference', '--no-plot', '--out', folder,
                   '--name', 'pareto_speed']
        for extra in extras:
            command += ['--extra', extra]
        subprocess.run(command, check=True, cwd=REPO)
        report = json.loads((Path(folder) / 'pareto_speed.json').read_text())
    return {row['label']: row for row in report['rows']}, report['meta'], report['shapes']


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Labels not beaten in both coordinates (speedup, success) by another point; sorted by speedup."""
    front = []
    for label, speed, success in points:
        beaten = any(s >= speed and w >= success and (s > speed or w > success) for _, s, w in points)
        if not beaten:
            front.append((speed, label))
    return [label for _, label in sorted(front)]


def mark_front(rows: list[dict]) -> None:
    """Set ``on_front`` on one checkpoint's rows (rows without a speed are not on it)."""
    front = pareto_front([(r['label'], r['speedup'], r['success']) for r in rows if r['speedup'] is not None])
    for row in rows:
        row['on_front'] = row['label'] in front


def rows_for(grid: list[dict], success: dict, speed: dict, checkpoint: str) -> list[dict]:
    """One row per configuration on one checkpoint: paired difference, front, and its outcomes (``run``)."""
    if BASELINE not in success:
        print(f'{checkpoint}: no unpruned outcomes to pair with; no rows')
        return []
    unpruned = np.array([won for _, _, won in success[BASELINE]['episodes']])
    rows = []
    for entry in (e for e in grid if e['label'] in success):
        record = success[entry['label']]
        won = np.array([w for _, _, w in record['episodes']])
        delta = paired_difference(won, unpruned)
        overall = record['summary']['overall']
        timing = speed.get(entry['label'], {})
        rows.append({'checkpoint': checkpoint, 'label': entry['label'], 'method': entry['method'],
                     'budget': entry['budget'],
                     'success': overall['success_rate'], 'success_ci95': overall['ci95'],
                     'episodes': overall['episodes'], 'delta_vs_none': delta[0], 'delta_ci95': list(delta[1:]),
                     **{field: timing.get(field) for field in SPEED_FIELDS}})
    mark_front(rows)
    for row in rows:                                     # the outcomes last, after the figures a reader looks for
        row['run'] = run_record(success[row['label']])
    return rows


def speed_cell(row: dict, interval: bool) -> str:
    """A row's speedup; marked when an earlier run timed it (a carried row whose label this run did not time)."""
    if row['speedup'] is None:
        return '-'
    low, high = row.get('speedup_ci95') or (None, None)         # no interval from a single timed step
    shown = interval and low is not None and high is not None
    text = f"{row['speedup']:.2f}x" + (f" ({low:.2f}-{high:.2f})" if shown else '')
    return text + (' †' if row.get('speed_from') else '')


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = ['# Success against speed, every method across budgets', '',
             f"Command: `{meta['command']}`  ", f"Commit: {meta['commit']}; date: {meta['date']}  ",
             f"Success: {meta['success']}  ", f"Speed: {meta['speed']}"]
    checkpoints = list(dict.fromkeys(r['checkpoint'] for r in rows))
    carried = {c: list(dict.fromkeys(r['carried_from'] for r in rows if r['checkpoint'] == c))
               for c in checkpoints if any('carried_from' in r for r in rows if r['checkpoint'] == c)}
    names = {c: f'{c} (carried)' if c in carried else c for c in checkpoints}
    if carried:
        lines += ['', f"Carried: the rows of {', '.join(carried)} are an earlier report's, not run again here: "
                  'success and intervals as that run measured them, the speedup this run\'s where it timed the same '
                  'configuration, else the earlier run\'s (marked †), and the front marked on those speedups. '
                  'Earlier runs:', '']
        lines += [f"- commit {run['commit']}, {run['date']}: `{run['command']}`" for run in meta['carried'].values()]
    order = sorted({r['label']: r for r in rows}.values(),
                   key=lambda r: (r['method'] != BASELINE, r['method'], -(r['budget'] or 0)))
    if len(checkpoints) > 1:
        lines += ['', '## Every checkpoint', '', 'Success, and in brackets the paired difference from unpruned on the '
                  'same checkpoint (points).', '',
                  '| config | speedup | ' + ' | '.join(names[c] for c in checkpoints) + ' |',
                  '|---|---|' + '---|' * len(checkpoints)]
        by_key = {(r['checkpoint'], r['label']): r for r in rows}
        for first in order:
            cells = [by_key.get((c, first['label'])) for c in checkpoints]
            cells = ['-' if r is None else f"{r['success']:.1%} ({r['delta_vs_none'] * 100:+.1f})"
                     + (' *' if r['on_front'] else '') for r in cells]
            lines.append(f"| {first['label']} | {speed_cell(first, interval=False)} | " + ' | '.join(cells) + ' |')
        lines += ['', '`*`: on that checkpoint\'s front.']
    for checkpoint in checkpoints:
        if len(checkpoints) > 1:
            origin = ', '.join(meta['carried'][run]['commit'] + ', ' + meta['carried'][run]['date']
                               for run in carried.get(checkpoint, []))
            lines += ['', f'## {checkpoint}' + (f' (carried from {origin})' if origin else '')]
        lines += ['', '| config | success (95% CI) | vs none, paired (95% CI) | speedup (95% CI) | kept visual '
                  '| front |', '|---|---|---|---|---|---|']
        mine = {r['label']: r for r in rows if r['checkpoint'] == checkpoint}
        for r in (mine[o['label']] for o in order if o['label'] in mine):
            speed = speed_cell(r, interval=True)
            kept = '-' if r['kept_visual_ratio'] is None else f"{r['kept_visual_ratio']:.0%}"
            low, high = (x * 100 for x in r['delta_ci95'])
            lines.append(f"| {r['label']} | {r['success']:.1%} ({r['success_ci95'][0]:.0%}-"
                         f"{r['success_ci95'][1]:.0%}) | {r['delta_vs_none'] * 100:+.1f} ({low:+.1f} to {high:+.1f}) | "
                         f"{speed} | {kept} | {'yes' if r['on_front'] else ''} |")
    return '\n'.join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib                                    # plotting only: keep the import off the measuring path
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    checkpoints = list(dict.fromkeys(r['checkpoint'] for r in rows))
    figure, axes = plt.subplots(1, len(checkpoints), figsize=(6.5 * len(checkpoints), 5), sharey=True, squeeze=False)
    methods = sorted({r['method'] for r in rows})
    colours = {m: plt.get_cmap('tab10')(i % 10) for i, m in enumerate(methods)}
    for axis, checkpoint in zip(axes[0], checkpoints):
        mine = [r for r in rows if r['checkpoint'] == checkpoint and r['speedup'] is not None]
        for method in methods:
            curve = sorted((r for r in mine if r['method'] == method), key=lambda r: r['speedup'])
            axis.plot([r['speedup'] for r in curve], [r['success'] * 100 for r in curve], marker='o',
                      color=colours[method], label=method)
        front = sorted((r for r in mine if r['on_front']), key=lambda r: r['speedup'])
        axis.plot([r['speedup'] for r in front], [r['success'] * 100 for r in front], 'k--', lw=1, label='front')
        carried = any('carried_from' in r for r in rows if r['checkpoint'] == checkpoint)
        axis.set_title(checkpoint + (' (carried)' if carried else '') if len(checkpoints) > 1 else '')
        axis.set_xlabel('speedup over unpruned at the deployment shape')
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel('closed-loop success (%)')
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def git_commit() -> str:
    result = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, cwd=REPO)
    return result.stdout.strip() or 'unknown'


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--models', nargs='+', default=['reference'],
                        help="checkpoints: 'reference' or a reference-VLA checkpoint directory, each optionally "
                             "NAME=MODEL")
    parser.add_argument('--methods', nargs='+', default=list(METHODS), help='registered methods to sweep')
    parser.add_argument('--keep-ratios', type=float, nargs='+', default=list(KEEP_RATIOS),
                        help='budgets of the keep-ratio methods')
    parser.add_argument('--specprune-scales', type=float, nargs='+', default=list(SPECPRUNE_SCALES),
                        help="SpecPrune's scale of K (controller.alpha)")
    parser.add_argument('--episodes-per-family', type=positive_int, default=100,
                        help='100 x 3 families = 300 per config')
    parser.add_argument('--workers', type=positive_int, default=2, help='worker processes in the success phase')
    parser.add_argument('--execute-steps', type=positive_int, default=None,
                        help='actions executed per chunk (default: 8)')
    parser.add_argument('--speed-shape', default='reference', help="the latency harness's --shape")
    parser.add_argument('--speed-width', type=int, default=256, help='decoder width of the speed phase')
    parser.add_argument('--speed-layers', type=int, default=32, help='decoder depth of the speed phase')
    parser.add_argument('--speed-steps', type=int, default=12, help='timed steps per configuration (0: success only)')
    parser.add_argument('--threads', type=int, default=2, help='torch threads in the speed phase')
    parser.add_argument('--out', type=Path, default=Path('outputs/benchmarks'), help='folder for pareto.*')
    parser.add_argument('--cached-only', action='store_true',
                        help='report only configurations whose outcomes are in the cache; run none')
    parser.add_argument('--cache', type=Path, default=None, help='outcome cache (default: <out>/pareto_runs)')
    parser.add_argument('--seed-cache-from', type=Path, nargs='+', default=[], metavar='PARETO_JSON',
                        help="before running, write into the cache the outcomes that earlier pareto.json rows hold, "
                             "for configurations whose key (checkpoint path and contents, episodes, resolved config) "
                             "is exactly one of this run's")
    parser.add_argument('--carry-rows-from', type=Path, default=None, metavar='PARETO_JSON',
                        help="show an earlier pareto.json's rows of checkpoints (by name) this run does not "
                             "evaluate, as they are, marked as carried (this run's speed where it timed the same "
                             "label)")
    args = parser.parse_args(argv)
    started = time.time()
    grid = budget_grid(args.methods, tuple(args.keep_ratios), tuple(args.specprune_scales))
    models = parse_models(args.models)
    cache = args.cache or args.out / 'pareto_runs'
    if args.seed_cache_from:
        seed_cache(args.seed_cache_from, grid, models, args.episodes_per_family, args.execute_steps, cache)
    success = {name: success_phase(grid, model, args.episodes_per_family, args.workers, cache, args.execute_steps,
                                   args.cached_only)
               for name, model in models.items()}
    shape = ['--shape', args.speed_shape, '--width', str(args.speed_width), '--layers', str(args.speed_layers)]
    ran = [entry for entry in grid if any(entry['label'] in outcomes for outcomes in success.values())]
    speed, speed_meta, shapes = speed_phase(ran, shape, args.speed_steps, args.threads)
    rows = [row for name in models for row in rows_for(grid, success[name], speed, name)]
    carried, earlier = carry_rows(args.carry_rows_from, set(models), speed) if args.carry_rows_from else ([], {})
    rows += carried
    command = ' '.join(argv if argv is not None else sys.argv[1:])
    meta = {'command': f'python benchmarks/pareto.py {command}'.strip(), 'commit': git_commit(),
            'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
            'success': ', '.join(f"{name}: {model!r} ({model_key(model)})" for name, model in models.items())
                       + f"; {args.episodes_per_family} held-out "
                       f"episodes per family x {len(TASK_FAMILIES)} families per configuration from seed "
                       f"{EVAL_SEED_START}, paired with unpruned",
            'speed': f"{shapes[0]['shape']} on {speed_meta['device']}, {args.speed_steps} timed steps per "
                     f"configuration, interleaved ({speed_meta['command']})",
            'minutes': (time.time() - started) / 60, **({'carried': earlier} if earlier else {})}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'pareto.json').write_text(report_json({'meta': meta, 'rows': rows}) + '\n')
    table = markdown(meta, rows)
    (args.out / 'pareto.md').write_text(table + '\n')
    if rows:
        plot(rows, args.out / 'pareto.png')
    else:
        print('no configuration has outcomes (with --cached-only: none of these runs is in the cache); no plot')
    print(table)
    print(f'wrote {args.out}/pareto.{{json,md{",png" if rows else ""}}} in {meta["minutes"]:.1f} min')
    return {'meta': meta, 'rows': rows}


if __name__ == '__main__':
    main()
