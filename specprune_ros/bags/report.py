"""Rendering an offline replay evaluation.

Markdown table, JSON, and PNG plots (latency per method as box plots, kept tokens and action error per inference with
the policy resets marked, frames with the kept patches drawn and each camera named).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from specprune_ros.core.json_documents import number_text, strict_json


def _fmt(value, digits: int = 3) -> str:
    return number_text(value, f'.{digits}f', missing='n/a') if isinstance(value, float) or value is None else str(value)


def recorded_by(report: dict) -> str:
    """Which method and model drove the robot when the bag was recorded (the node's ``~/inference`` records)."""
    sources = report.get('recorded_by') or []
    if not sources:
        return ('Recorded by: unknown (the bag has no inference records of the policy node: a scripted expert, '
                'a teleoperator or another controller, or the topic was not recorded).')
    parts = [f"method `{s['method']}` with model `{s['model']}` ({s['inferences']} inferences)" for s in sources]
    return 'Recorded by: ' + '; '.join(parts) + '.'


def speedup_cell(name: str, m: dict) -> str:
    """'1.42x (1.30-1.55, n=40/40)'; the baseline and runs that kept every visual token claim no speedup."""
    if name == 'none':
        return 'baseline'
    low, high = m.get('speedup_ci95', (float('nan'), float('nan')))
    base_n, n = m.get('speedup_samples', (0, 0))
    if not m.get('pruned', True):
        return (f"unpruned (all {m['visual_tokens']} tokens kept; latency ratio {_fmt(m['speedup'], 2)}x, "
                f"{_fmt(low, 2)}-{_fmt(high, 2)}, n={base_n}/{n})")
    return f"{_fmt(m['speedup'], 2)}x ({_fmt(low, 2)}-{_fmt(high, 2)}, n={base_n}/{n})"


def markdown(report: dict) -> str:
    lines = [f"Offline replay of `{report['bag']}` with `{report['model']}`: {report['inferences']} inferences "
             f"on {report['observations']} synchronized frame sets (schedule {report['schedule']}).",
             recorded_by(report), '']
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
    header = ('| method | kept visual tokens | latency median ms | p95 ms | speedup (95% CI, samples) | FLOPs '
              '| chunk MAE vs unpruned | first-action xyz L2 | max abs | gripper flips |')
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
               f"| {_fmt(m['latency_ms']['p95'], 2)} | {speedup_cell(name, m)} | {_fmt(m['flops_ratio'] * 100, 0)}% "
               f"| {_fmt(dev['chunk_mae'], 4)} | {_fmt(dev['first_action_l2'], 4)} | {_fmt(dev['max_abs'], 3)} "
               f"| {dev['gripper_flips']} |")
        if has_recorded:
            row += f" {_fmt(m.get('vs_recorded_actions', {}).get('first_action_mae'), 4)} |"
        if has_chunks:
            row += f" {_fmt(m.get('vs_recorded_chunks', {}).get('chunk_mae'), 4)} |"
        lines.append(row)
    lines += ['', 'Speedup: median latency of unpruned over the method\'s, with a 95% bootstrap interval and the '
              'inferences behind each median (the methods ran one after another in this process, not interleaved).']
    if report.get('notes'):
        lines += ['', 'Notes: ' + '; '.join(report['notes']) + '.']
    return '\n'.join(lines) + '\n'


def _plain(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith('_')}


def _mark_resets(ax, report: dict) -> None:
    """Dashed vertical lines where the policy was reset (episode starts, instruction changes, gaps)."""
    for k, index in enumerate(report.get('resets') or []):
        if index > 0:
            ax.axvline(index - 0.5, color='0.5', ls='--', lw=0.8,
                       label='policy reset (new episode)' if k == 1 else None)


def plot(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = report['methods']
    names = list(methods)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(names)))
    values = [m['series']['latency_ms'] or [float('nan')] for m in methods.values()]
    ax.boxplot(values, orientation='horizontal', showfliers=True, widths=0.6,
               medianprops={'color': 'C1', 'lw': 2}, flierprops={'markersize': 3})
    ax.set_yticks(range(1, len(names) + 1),
                  [f"{name} (median {np.nanmedian(v):.1f} ms, n={len(v)})" for name, v in zip(names, values)])
    ax.invert_yaxis()
    ax.set_xlabel('model latency per inference (ms)')
    ax.set_title('Latency per method (box: quartiles, whiskers: 1.5 IQR)')
    ax.grid(axis='x', alpha=0.3)
    paths.append(_save(fig, out_dir / 'latency.png'))

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, m in methods.items():
        if m['series']['kept']:
            ax.plot(range(len(m['series']['kept'])), m['series']['kept'], label=name, lw=1)
    _mark_resets(ax, report)
    ax.set_xlabel('inference')
    ax.set_ylabel('kept visual tokens (mean over layers)')
    ax.set_title('Kept visual tokens over time')
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / 'kept_tokens.png'))

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, m in methods.items():
        if name == 'none':
            continue
        ax.plot(m['vs_unpruned']['per_step_mae'], label=f'{name} vs unpruned', lw=1)
    base = methods.get('none', {})
    if 'vs_recorded_actions' in base:
        ax.plot(base['vs_recorded_actions']['per_step_mae'], 'k--', lw=1, label='unpruned vs recorded (first action)')
    _mark_resets(ax, report)
    ax.set_xlabel('inference')
    ax.set_ylabel('mean |action difference| (normalised)')
    ax.set_title('Action error over time')
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / 'action_error.png'))

    examples = report.get('_examples') or {}
    rows = [(name, pics) for name, pics in examples.items() if pics]
    cameras = list(report.get('camera_sizes') or {})
    if rows:
        cols = max(len(pics) for _, pics in rows)
        fig, axes = plt.subplots(len(rows), cols, figsize=(3.4 * cols, 2.1 * len(rows)), squeeze=False)
        for r, (name, pics) in enumerate(rows):
            for c in range(cols):
                ax = axes[r][c]
                ax.axis('off')
                if c < len(pics):
                    j, picture = pics[c]
                    ax.imshow(picture)
                    ax.set_title(f'{name} @ inference {j}', fontsize=8)
                    _label_cameras(ax, picture, report.get('policy_cameras') or cameras)
        fig.suptitle('Kept patches (pruned ones darkened; cameras left to right as labelled)', fontsize=10)
        paths.append(_save(fig, out_dir / 'kept_patches.png'))
    return paths


def _label_cameras(ax, picture: np.ndarray, cameras: list) -> None:
    """The camera name under each panel of a side-by-side picture (equal widths)."""
    if not cameras:
        return
    width = picture.shape[1] / len(cameras)
    for k, camera in enumerate(cameras):
        ax.text((k + 0.5) * width, picture.shape[0] + 2, camera, ha='center', va='top', fontsize=7)


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
    json_path.write_text(strict_json({'created': time.strftime('%Y-%m-%d %H:%M:%S'), **_plain(report)}, indent=2,
                                     default=str))
    paths = {'markdown': md_path, 'json': json_path}
    if plots:
        for path in plot(report, out_dir):
            paths[path.stem] = path
    return paths
