"""Rendering an offline replay evaluation: markdown table, JSON, and PNG plots (latency histogram, kept
tokens over time, action error over time, frames with the kept patches drawn)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return 'n/a'
    return f'{value:.{digits}f}' if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    lines = [f"Offline replay of `{report['bag']}` with `{report['model']}`: {report['inferences']} inferences "
             f"on {report['observations']} synchronized frame sets (schedule {report['schedule']}).", '']
    det = report.get('determinism')
    if det is not None:
        lines.append(f"Determinism: unpruned run twice -> max |diff| {det['max_abs_diff']:.3g} "
                     f"({'identical' if det['identical'] else 'NOT identical'}).")
    base = report['methods'].get('none', {})
    if 'vs_recorded_chunks' in base:
        rec = base['vs_recorded_chunks']
        lines.append(f"Unpruned vs the recorded chunks: max |diff| {rec['max_abs']:.3g}, "
                     f"{rec['exact_steps']}/{rec['compared']} chunks reproduced exactly.")
    lines.append('')
    header = ('| method | kept visual tokens | latency median ms | p95 ms | speedup | FLOPs | chunk MAE vs unpruned '
              '| first-action L2 | max abs | gripper flips |')
    has_recorded = any('vs_recorded_actions' in m for m in report['methods'].values())
    has_chunks = any('vs_recorded_chunks' in m for m in report['methods'].values())
    if has_recorded:
        header += ' MAE vs recorded actions |'
    if has_chunks:
        header += ' MAE vs recorded chunks |'
    lines += [header, '|' + '---|' * (header.count('|') - 1)]
    for name, m in report['methods'].items():
        dev = m['vs_unpruned']
        kept = m['kept_visual_tokens']['mean']
        row = (f"| {name} | {_fmt(kept, 1)} / {m['visual_tokens']} | {_fmt(m['latency_ms']['median'], 2)} "
               f"| {_fmt(m['latency_ms']['p95'], 2)} | {_fmt(m['speedup'], 2)}x | {_fmt(m['flops_ratio'] * 100, 0)}% "
               f"| {_fmt(dev['chunk_mae'], 4)} | {_fmt(dev['first_action_l2'], 4)} | {_fmt(dev['max_abs'], 3)} "
               f"| {dev['gripper_flips']} |")
        if has_recorded:
            row += f" {_fmt(m.get('vs_recorded_actions', {}).get('first_action_mae'), 4)} |"
        if has_chunks:
            row += f" {_fmt(m.get('vs_recorded_chunks', {}).get('chunk_mae'), 4)} |"
        lines.append(row)
    if report.get('notes'):
        lines += ['', 'Notes: ' + '; '.join(report['notes']) + '.']
    return '\n'.join(lines) + '\n'


def _plain(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith('_')}


def plot(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = report['methods']
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    values = [m['series']['latency_ms'] for m in methods.values()]
    bins = np.linspace(0.0, max(max(v) for v in values) * 1.05 + 1e-6, 40)
    for (name, _), series in zip(methods.items(), values):
        ax.hist(series, bins=bins, alpha=0.5, label=f'{name} (median {np.median(series):.1f} ms)')
    ax.set_xlabel('model latency per inference (ms)')
    ax.set_ylabel('inferences')
    ax.legend(fontsize=8)
    ax.set_title('Latency')
    paths.append(_save(fig, out_dir / 'latency_hist.png'))

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, m in methods.items():
        if m['series']['kept']:
            ax.plot(range(len(m['series']['kept'])), m['series']['kept'], label=name, lw=1)
    ax.set_xlabel('inference')
    ax.set_ylabel('kept visual tokens (mean over layers)')
    ax.set_title('Kept visual tokens over time')
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / 'kept_tokens.png'))

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, m in methods.items():
        if name == 'none':
            continue
        ax.plot(m['vs_unpruned']['per_step_mae'], label=f'{name} vs unpruned', lw=1)
    base = methods.get('none', {})
    if 'vs_recorded_actions' in base:
        ax.plot(base['vs_recorded_actions']['per_step_mae'], 'k--', lw=1, label='unpruned vs recorded (first action)')
    ax.set_xlabel('inference')
    ax.set_ylabel('mean |action difference| (normalised)')
    ax.set_title('Action error over time')
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / 'action_error.png'))

    examples = report.get('_examples') or {}
    rows = [(name, pics) for name, pics in examples.items() if pics]
    if rows:
        cols = max(len(pics) for _, pics in rows)
        fig, axes = plt.subplots(len(rows), cols, figsize=(3.2 * cols, 1.9 * len(rows)), squeeze=False)
        for r, (name, pics) in enumerate(rows):
            for c in range(cols):
                ax = axes[r][c]
                ax.axis('off')
                if c < len(pics):
                    j, picture = pics[c]
                    ax.imshow(picture)
                    ax.set_title(f'{name} @ inference {j}', fontsize=8)
        fig.suptitle('Kept patches (pruned ones darkened)', fontsize=10)
        paths.append(_save(fig, out_dir / 'kept_patches.png'))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: str | Path, name: str = 'replay', plots: bool = True) -> dict[str, Path]:
    """``<name>.md``, ``<name>.json`` and the PNGs in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out_dir / f'{name}.md', out_dir / f'{name}.json'
    md_path.write_text(markdown(report))
    json_path.write_text(json.dumps({'created': time.strftime('%Y-%m-%d %H:%M:%S'), **_plain(report)}, indent=2,
                                    default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))
    paths = {'markdown': md_path, 'json': json_path}
    if plots:
        for path in plot(report, out_dir):
            paths[path.stem] = path
    return paths
