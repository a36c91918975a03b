r"""The GPU speed targets read off the deployment harness's JSON: met or missed, for every run and shape given.

Targets at the OpenVLA-OFT 7B shape on a GPU: the unpruned executor at most 1.05x the time of transformers' SDPA
forward of the same weights; SpecPrune at least 1.6x and VLA-Pruner 25% at least 2.0x over the unpruned executor;
each method's selection at most 3% of its decoder time. A speedup is read twice: the whole step (vision backbones
and action head included, which no method prunes: its ceiling is the run's "total ideal") and the decoder with the
selection (what the pruning itself buys). ``scripts/gpu_benchmark.sh`` ends with it:

    python benchmarks/gpu_targets.py outputs/gpu_benchmark/deployment_latency.json \
        outputs/gpu_benchmark/deployment_latency_cuda_graphs.json --out outputs/gpu_benchmark/targets.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from specprune_ros.command_line import HelpFormatter
from specprune_ros.core.json_documents import is_missing

# by label; a configuration of SpecPrune beside its defaults (e.g. 'specprune, exact counts') is read
# against SpecPrune's bar
SPEEDUP_TARGETS = {'specprune': 1.6, 'vla_pruner 25%': 2.0}
SELECTION_SHARE_TARGET = 0.03
EXECUTOR_OVER_TRANSFORMERS_TARGET = 1.05
BASELINE = 'none'


def _verdict(value: Optional[float], bar: float, at_most: bool = False) -> str:
    if is_missing(value):
        return 'not measured'
    met = value <= bar if at_most else value >= bar
    return 'met' if met else 'missed'


def _number(value: Optional[float], unit: str = 'x') -> str:
    if is_missing(value):
        return '-'
    return f'{100 * value:.1f}%' if unit == '%' else f'{value:.2f}{unit}'


def speedup_target(label: str) -> Optional[float]:
    """The speedup bar of a configuration's label, or None where no speed target applies."""
    return SPEEDUP_TARGETS.get(label.split(',')[0])


def target_rows(report: dict, run: str) -> list[dict]:
    """One row per target and shape of one harness report (``run`` names the report in the table)."""
    rows: list[dict] = []
    shapes: dict[str, dict[str, dict]] = {}
    for row in report.get('rows', []):
        shapes.setdefault(row['shape'], {})[row['label']] = row
    for shape, by_label in shapes.items():
        versus = by_label.get(BASELINE, {}).get('speedup_vs_transformers')
        if versus:                      # a run with transformers' own forward beside the executor
            ratio = 1.0 / versus
            rows.append({'run': run, 'shape': shape,
                         'target': "unpruned executor / transformers' SDPA forward (time)",
                         'bar': f'<= {EXECUTOR_OVER_TRANSFORMERS_TARGET:.2f}', 'value': _number(ratio, ''),
                         'verdict': _verdict(ratio, EXECUTOR_OVER_TRANSFORMERS_TARGET, at_most=True)})
        for label, row in by_label.items():
            bar = speedup_target(label)
            if bar is None:
                continue
            for reading, key, ceiling in (('whole step', 'speedup', 'total_ideal_speedup'),
                                          ('decoder and selection', 'decoder_speedup', 'flops_ideal_speedup')):
                value = row.get(key)
                rows.append({'run': run, 'shape': shape, 'target': f'{label} speedup, {reading}',
                             'bar': f'>= {bar:.1f}x (ideal {_number(row.get(ceiling))})', 'value': _number(value),
                             'verdict': _verdict(value, bar)})
        for label, row in by_label.items():
            share = row.get('selection_share_of_decoder')
            if label == BASELINE or share is None:
                continue
            rows.append({'run': run, 'shape': shape, 'target': f'{label} selection / decoder',
                         'bar': f'<= {100 * SELECTION_SHARE_TARGET:.0f}%', 'value': _number(share, '%'),
                         'verdict': _verdict(share, SELECTION_SHARE_TARGET, at_most=True)})
    return rows


def markdown(rows: list[dict], sources: list[str]) -> str:
    lines = ['# GPU targets', '', 'Read off: ' + ', '.join(f'`{source}`' for source in sources), '',
             '| run | shape | target | bar | measured | verdict |', '|---|---|---|---|---|---|']
    lines += [f"| {r['run']} | {r['shape']} | {r['target']} | {r['bar']} | {r['value']} | {r['verdict']} |"
              for r in rows]
    return '\n'.join(lines) + '\n'


def main(argv: Optional[list[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('reports', nargs='+', type=Path, help="the harness's JSON files (missing ones are skipped)")
    parser.add_argument('--out', type=Path, help='also write the table here')
    args = parser.parse_args(argv)
    rows: list[dict] = []
    sources = []
    for path in args.reports:
        if not path.exists():
            print(f'gpu_targets: {path} is missing (that run did not finish); left out')
            continue
        rows += target_rows(json.loads(path.read_text()), path.stem)
        sources.append(str(path))
    text = markdown(rows, sources)
    print(text, end='')
    if args.out is not None:
        args.out.write_text(text)
    return text


if __name__ == '__main__':
    main()
