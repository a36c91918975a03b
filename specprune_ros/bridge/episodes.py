"""Episode bookkeeping and the outcome summary of a bridge run (no ROS).

The episode plan matches the ROS-free harness (``specprune_ros.evaluation.closed_loop.evaluate``): seeds
``seed_start + i`` for ``i < episodes_per_family``, families interleaved, so both score the same episodes.
Smoothness is the mean norm of the jerk of the applied end-effector velocity (second difference of the
per-period linear velocity over period^2, m/s^3); "stalled" periods are the ones without a fresh command.

An episode with ticks the policy never answered (``timeouts``: the robot held still then) stays in the statistics
and is marked in every row; an episode cut short (``interrupted``: the policy node died, the run was stopped) is
left out of them, and the summary says how many of the planned episodes completed.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from specprune_ros.core.json_documents import number_text, strict_json
from specprune_ros.evaluation.statistics import percentile, wilson_interval


@dataclass(frozen=True)
class EpisodeSpec:
    family: str
    seed: int


def episode_plan(families: Sequence[str], episodes_per_family: int, seed_start: int) -> list[EpisodeSpec]:
    """The harness's job order: for each index, every family."""
    if episodes_per_family < 0:
        raise ValueError('episodes_per_family must be >= 0')
    return [EpisodeSpec(family, int(seed_start) + i) for i in range(episodes_per_family) for family in families]


def mean_abs_jerk(linear_velocity: np.ndarray, period_s: float) -> float:
    """Mean |d^2 v / dt^2| over a (T, 3) velocity sequence (NaN when T < 3)."""
    v = np.asarray(linear_velocity, dtype=np.float64)
    if v.ndim != 2 or len(v) < 3:
        return float('nan')
    jerk = (v[2:] - 2.0 * v[1:-1] + v[:-2]) / (period_s * period_s)
    return float(np.linalg.norm(jerk, axis=1).mean())


@dataclass
class EpisodeLog:
    """Everything recorded while one episode runs (one entry per control period)."""

    spec: EpisodeSpec
    instruction: str
    start_stamp_ns: int
    period_s: float
    actions: list = field(default_factory=list)          # applied normalised 7-D actions
    twists: list = field(default_factory=list)           # applied (time-averaged) twists, m/s and rad/s
    holds: int = 0                                       # periods with a zero twist (a hold or no command)
    stale_periods: float = 0.0                           # real-time: summed stale fraction of the periods
    inferences: int = 0                                  # chunks seen for this episode
    sync_how: dict = field(default_factory=dict)         # step-synchronous: how ticks were answered
    latencies_ms: list = field(default_factory=list)     # node ~/inference: inference latency per chunk
    model_latencies_ms: list = field(default_factory=list)
    kept_ratios: list = field(default_factory=list)
    skipped_steps: int = 0                               # steps the node skipped while inferring
    resends: int = 0
    timeouts: int = 0                                    # sync: ticks nobody answered (a zero twist was applied)
    interrupted: bool = False                            # cut short before the task ended or reached max_steps
    wall_start: float = field(default_factory=time.monotonic)
    success: bool = False

    def add_period(self, action: np.ndarray, twist: np.ndarray, stale_fraction: float = 0.0,
                   how: str = '') -> None:
        self.actions.append(np.asarray(action, dtype=np.float64).copy())
        self.twists.append(np.asarray(twist, dtype=np.float64).copy())
        self.holds += int(not np.any(np.asarray(twist) != 0.0))
        self.stale_periods += float(stale_fraction)
        if how:
            self.sync_how[how] = self.sync_how.get(how, 0) + 1
        self.timeouts += int(how == 'timeout')

    def add_inference(self, values: dict) -> None:
        """One ``~/inference`` record of the policy node (string values)."""
        self.inferences += 1
        for key, target in (('inference_latency_ms', self.latencies_ms), ('model_latency_ms', self.model_latencies_ms),
                            ('kept_ratio', self.kept_ratios)):
            try:
                value = float(values.get(key, 'nan'))
            except ValueError:
                continue
            if math.isfinite(value):
                target.append(value)
        try:
            self.skipped_steps += int(values.get('skipped_steps', '0'))
        except ValueError:
            pass

    def outcome(self, sim_time_s: float, save_actions: bool = False) -> 'EpisodeOutcome':
        twists = np.asarray(self.twists).reshape(-1, 6)
        steps = len(self.actions)
        return EpisodeOutcome(
            family=self.spec.family, seed=self.spec.seed, instruction=self.instruction, success=bool(self.success),
            steps=steps, sim_time_s=float(sim_time_s), wall_time_s=time.monotonic() - self.wall_start,
            mean_abs_jerk=mean_abs_jerk(twists[:, :3], self.period_s) if steps else float('nan'),
            mean_speed=float(np.linalg.norm(twists[:, :3], axis=1).mean()) if steps else float('nan'),
            hold_fraction=self.holds / steps if steps else float('nan'),
            stale_fraction=self.stale_periods / steps if steps else float('nan'),
            inferences=self.inferences, skipped_steps=self.skipped_steps,
            latency_ms_median=percentile(self.latencies_ms, 50),
            model_latency_ms_median=percentile(self.model_latencies_ms, 50),
            kept_ratio=float(np.mean(self.kept_ratios)) if self.kept_ratios else float('nan'),
            sync_how=dict(self.sync_how), resends=self.resends, timeouts=self.timeouts,
            interrupted=bool(self.interrupted),
            actions=[[float(v) for v in a] for a in self.actions] if save_actions else None)


@dataclass
class EpisodeOutcome:
    family: str
    seed: int
    instruction: str
    success: bool
    steps: int
    sim_time_s: float
    wall_time_s: float
    mean_abs_jerk: float
    mean_speed: float
    hold_fraction: float
    stale_fraction: float
    inferences: int
    skipped_steps: int
    latency_ms_median: float
    model_latency_ms_median: float
    kept_ratio: float
    sync_how: dict = field(default_factory=dict)
    resends: int = 0
    timeouts: int = 0                       # ticks applied as a zero twist because the policy never answered
    interrupted: bool = False               # cut short: not scored (left out of the success statistics)
    actions: Optional[list] = None          # applied actions (with save_actions)

    @property
    def status(self) -> str:
        """'interrupted', 'success' or 'failure', with the timed-out ticks when there were any."""
        if self.interrupted:
            return 'interrupted'
        text = 'success' if self.success else 'failure'
        return f'{text} with {self.timeouts} ticks timed out' if self.timeouts else text

    def as_values(self) -> dict[str, str]:
        """Flat string values (the ``~/episode`` DiagnosticStatus key-values)."""
        out = {}
        for key, value in asdict(self).items():
            if key == 'actions':
                continue
            if isinstance(value, float):
                out[key] = f'{value:.6g}'
            elif isinstance(value, dict):
                out[key] = json.dumps(value, sort_keys=True)
            else:
                out[key] = str(value).lower() if isinstance(value, bool) else str(value)
        return out


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float('nan')


def summarize_outcomes(outcomes: Sequence[EpisodeOutcome], label: str = '', mode: str = '',
                       planned: Optional[int] = None) -> dict:
    """Per-family and overall success (Wilson 95% CI) and the motion / latency aggregates.

    Interrupted episodes are listed but left out of every statistic; ``planned`` (default: the episodes given)
    against ``completed_episodes`` says whether the run is complete.
    """
    def block(items: Sequence[EpisodeOutcome]) -> dict:
        wins = sum(o.success for o in items)
        low, high = wilson_interval(wins, len(items))
        return {'episodes': len(items), 'successes': wins, 'success_rate': wins / max(len(items), 1),
                'timeouts': sum(o.timeouts for o in items),
                'episodes_with_timeouts': sum(o.timeouts > 0 for o in items),
                'ci95': [low, high], 'mean_length': _nanmean([o.steps for o in items]),
                'mean_abs_jerk': _nanmean([o.mean_abs_jerk for o in items]),
                'mean_speed': _nanmean([o.mean_speed for o in items]),
                'hold_fraction': _nanmean([o.hold_fraction for o in items]),
                'stale_fraction': _nanmean([o.stale_fraction for o in items]),
                'latency_ms_median': _nanmean([o.latency_ms_median for o in items]),
                'model_latency_ms_median': _nanmean([o.model_latency_ms_median for o in items]),
                'kept_ratio': _nanmean([o.kept_ratio for o in items]),
                'skipped_steps_per_episode': _nanmean([o.skipped_steps for o in items])}
    scored = [o for o in outcomes if not o.interrupted]
    planned = len(outcomes) if planned is None else int(planned)
    families = sorted({o.family for o in scored})
    return {'label': label, 'mode': mode, 'planned_episodes': planned, 'completed_episodes': len(scored),
            'interrupted_episodes': len(outcomes) - len(scored), 'complete': len(scored) == planned,
            'overall': block(scored), 'families': {f: block([o for o in scored if o.family == f]) for f in families},
            'episodes': [{**asdict(o), 'status': o.status} for o in outcomes]}


def markdown_summary(summaries: Sequence[dict]) -> str:
    """One row per family and overall.

    Model ms: the model call on the wall clock; inference ms: observation to accepted chunk on the node's clock (sim
    time in step-synchronous mode, where the clock waits: not shown). Timeouts: ticks the policy never answered
    (episodes with any). A run that did not complete every planned episode gets a line under the table.
    """
    lines = ['| config | mode | family | success | 95% CI | mean length | mean abs jerk m/s^3 | hold % | stale % '
             '| model ms (median) | inference ms (median) | kept ratio | timeouts (episodes) |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    notes = []
    for summary in summaries:
        for family, s in [*summary['families'].items(), ('all', summary['overall'])]:
            inference = 'n/a (sim clock)' if summary['mode'] == 'sync' else number_text(s['latency_ms_median'])
            low, high = (number_text(bound, scale=100) for bound in s['ci95'])
            lines.append(
                f"| {summary['label']} | {summary['mode']} | {family} | {number_text(s['success_rate'], scale=100)}% "
                f"({s['successes']}/{s['episodes']}) | {low}-{high}% | {number_text(s['mean_length'])} "
                f"| {number_text(s['mean_abs_jerk'], '.2f')} | {number_text(s['hold_fraction'], scale=100)} "
                f"| {number_text(s['stale_fraction'], scale=100)} | {number_text(s.get('model_latency_ms_median'))} "
                f"| {inference} | {number_text(s['kept_ratio'], '.3f')} "
                f"| {s.get('timeouts', 0)} ({s.get('episodes_with_timeouts', 0)}) |")
        planned = summary.get('planned_episodes', summary['overall']['episodes'])
        completed = summary.get('completed_episodes', summary['overall']['episodes'])
        if completed != planned:
            notes.append(f"INCOMPLETE {summary['label']} {summary['mode']}: {completed} of {planned} planned episodes "
                         f"completed ({summary.get('interrupted_episodes', 0)} interrupted, left out of the "
                         'statistics)')
    return '\n'.join(lines + ([''] + notes if notes else []))


def summary_base(path: str | Path) -> Path:
    """The summary's path without ``.json`` / ``.md``; any other dot stays part of the name (``keep0.25``)."""
    path = Path(path)
    return path.with_suffix('') if path.suffix in ('.json', '.md') else path


def summary_files(path: str | Path) -> tuple[Path, Path]:
    """``<path>.json`` and ``<path>.md`` for a summary path given with either suffix or none."""
    base = summary_base(path)
    return base.with_name(base.name + '.json'), base.with_name(base.name + '.md')


def write_summary(summary: dict, path: Path, extra: Optional[dict] = None) -> tuple[Path, Path]:
    """``<path>.json`` and ``<path>.md`` (``path`` may carry either suffix or none)."""
    json_path, md_path = summary_files(path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    document = {'created': time.strftime('%Y-%m-%d %H:%M:%S'), **(extra or {}), 'summary': summary}
    json_path.write_text(strict_json(document, indent=2))
    md_path.write_text(markdown_summary([summary]) + '\n')
    return json_path, md_path
