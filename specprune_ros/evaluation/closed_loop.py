"""Closed-loop evaluation of a policy in the simulated tabletop tasks (no ROS involved).

Each inference yields a chunk of 8 actions that are executed open loop (as OpenVLA-OFT does), then the
policy sees the next observation together with the actions it just executed (the SpecPrune controller
reads them). Episodes run in parallel worker processes, one torch thread each.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from specprune_ros.core.json_documents import number_text, strict_json
from specprune_ros.evaluation.statistics import percentile, wilson_interval
from specprune_ros.models.loading import load_policy
from specprune_ros.policy.interface import Observation
from specprune_ros.sim import EVAL_SEED_START, TabletopEnv
from specprune_ros.sim.outcomes import OUTCOMES, OutcomeTracker, count_outcomes
from specprune_ros.sim.visualize import save_gif, save_strip


@dataclass(frozen=True)
class PolicySpec:
    """Everything a worker process needs to build the same policy (see ``models.loading.load_policy``)."""

    model: str = 'reference'
    method: str = 'none'
    method_config: Optional[dict] = None
    label: str = ''
    seed: int = 0

    @property
    def name(self) -> str:
        return self.label or self.method


@dataclass
class EpisodeResult:
    family: str
    seed: int
    success: bool
    steps: int
    latencies_s: list[float] = field(default_factory=list)
    visual_kept: list[float] = field(default_factory=list)      # mean kept visual tokens per layer, per inference
    flops_ratio: list[float] = field(default_factory=list)
    selection_s: list[float] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)              # controller mode per inference, if any
    outcome: str = ''                                           # how it ended (``sim.outcomes.OUTCOMES``)
    non_finite_chunks: int = 0                                  # chunks with NaN / Inf: held one step instead
    frames: Optional[list] = None                               # observations, when recording


def run_episode(env, policy, family: str, seed: int, execute_steps: Optional[int] = None,
                record_frames: bool = False, max_steps: Optional[int] = None) -> EpisodeResult:
    """One episode: infer a chunk, execute ``execute_steps`` of it (default: all), repeat until done.

    ``max_steps`` cuts the episode short of the task's own step limit (quick checks). A chunk with NaN or Inf is
    not executed: the arm holds one step (no motion, the gripper as last commanded), as the policy node holds, and
    the policy is asked again. ``execute_steps`` must be 1 .. the chunk length (a longer one is refused, not cut).
    """
    check_episode_options(execute_steps, max_steps)
    observation = env.reset(seed=seed, family=family)
    policy.reset()
    state = env.sim_state()
    tracker = OutcomeTracker.begin(env.task, state)
    result = EpisodeResult(family=family, seed=seed, success=False, steps=0,
                           frames=[observation] if record_frames else None)
    executed: Optional[np.ndarray] = None
    done = False
    while not done:
        output = policy.predict(Observation(images=observation.images, instruction=observation.instruction,
                                            proprio=observation.proprio, executed_actions=executed))
        record = output.record
        result.latencies_s.append(output.latency_s)
        if record is not None:
            result.visual_kept.append(record.mean_visual_kept)
            result.flops_ratio.append(record.flops / record.flops_full)
            result.selection_s.append(record.selection_seconds + record.probe_seconds)
            if 'mode' in record.info:
                result.modes.append(str(record.info['mode']))
        if execute_steps is not None and execute_steps > len(output.actions):
            raise ValueError(f'execute_steps {execute_steps} exceeds the policy\'s chunk of {len(output.actions)} '
                             'actions')
        chunk = output.actions[: execute_steps or len(output.actions)]
        if not np.isfinite(chunk).all():
            result.non_finite_chunks += 1
            chunk = np.zeros((1, chunk.shape[-1]), dtype=np.float32)
            chunk[0, 6] = -1.0 if executed is None else executed[-1][6]
        for index, action in enumerate(chunk):
            # only the observation after the chunk's last action is looked at (rendering is ~15 ms a step)
            observation, done, success = env.step(action, render=record_frames or index == len(chunk) - 1)
            result.steps += 1
            result.success = bool(success)
            state = env.sim_state()
            tracker.update(state)
            if record_frames:
                result.frames.append(observation)
            done = done or (max_steps is not None and result.steps >= max_steps)
            if done:
                break
        executed = chunk
    result.outcome = tracker.outcome(state, result.success)   # the state after the last step
    return result


def check_episode_options(execute_steps: Optional[int], max_steps: Optional[int]) -> None:
    """Raise ValueError for an ``execute_steps`` or ``max_steps`` below 1 (None: the chunk, the task's limit)."""
    for name, value in (('execute_steps', execute_steps), ('max_steps', max_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f'{name} must be a positive integer or None, got {value!r}')


_WORKER: dict = {}


def _init_worker(spec: PolicySpec, image_size: int, threads: int, episode_options: dict,
                 keep_error: bool = False) -> None:
    """Load the policy and the simulator.

    ``keep_error`` (worker processes): a failure is kept and raised by every job, so the caller sees the real error
    instead of a broken process pool.
    """
    try:
        torch.set_num_threads(threads)
        _WORKER['policy'] = load_policy(spec.model, spec.method, spec.method_config, seed=spec.seed)
        _WORKER['env'] = TabletopEnv(image_size=image_size)
        _WORKER['options'] = episode_options
    except Exception as error:
        if not keep_error:
            raise
        _WORKER['error'] = error


def _run_job(job: tuple[str, int]) -> EpisodeResult:
    if 'error' in _WORKER:
        raise _WORKER['error']
    family, seed = job
    return run_episode(_WORKER['env'], _WORKER['policy'], family, seed, **_WORKER['options'])


def evaluate(spec: PolicySpec, families: Sequence[str], episodes_per_family: int, seed_start: Optional[int] = None,
             workers: int = 2, image_size: int = 96, progress: bool = True, execute_steps: Optional[int] = None,
             max_steps: Optional[int] = None) -> list[EpisodeResult]:
    """Run ``episodes_per_family`` held-out episodes of each family; seeds start at EVAL_SEED_START.

    ``execute_steps``: actions executed per chunk before re-planning (default: the whole chunk).
    """
    options = {'execute_steps': execute_steps, 'max_steps': max_steps}
    check_episode_options(execute_steps, max_steps)
    if isinstance(episodes_per_family, bool) or not isinstance(episodes_per_family, int) or episodes_per_family < 1:
        raise ValueError(f'episodes_per_family must be a positive integer, got {episodes_per_family!r}')
    if not families:
        raise ValueError('no task family to evaluate')
    start = EVAL_SEED_START if seed_start is None else seed_start
    if len(set(families)) != len(families):
        raise ValueError(f'families {list(families)} name a family twice: its episodes would count twice')
    jobs = [(family, start + i) for i in range(episodes_per_family) for family in families]
    bar = tqdm(total=len(jobs), desc=f'eval {spec.name}', unit='ep', disable=not progress, dynamic_ncols=True)
    results: list[EpisodeResult] = []
    if workers <= 1:
        _init_worker(spec, image_size, threads=1, episode_options=options)
        for job in jobs:
            results.append(_run_job(job))
            bar.update(1)
    else:
        try:
            with ProcessPoolExecutor(workers, mp_context=get_context('spawn'), initializer=_init_worker,
                                     initargs=(spec, image_size, 1, options, True)) as pool:
                for result in pool.map(_run_job, jobs):
                    results.append(result)
                    bar.update(1)
        except BrokenProcessPool as error:
            raise RuntimeError(f'a worker process of {spec.name} died (out of memory, or a crash in native code); '
                               'run with --workers 1 to see where') from error
    bar.close()
    return results


def summarize(results: Sequence[EpisodeResult], label: str = '') -> dict:
    """Per-family and overall success (Wilson 95% CI), episode length, latency, kept tokens, FLOPs ratio."""
    def block(rs: Sequence[EpisodeResult]) -> dict:
        wins = sum(r.success for r in rs)
        low, high = wilson_interval(wins, len(rs))
        latencies = [x for r in rs for x in r.latencies_s]
        kept = [x for r in rs for x in r.visual_kept]
        flops = [x for r in rs for x in r.flops_ratio]
        selection = [x for r in rs for x in r.selection_s]
        return {'episodes': len(rs), 'successes': wins, 'success_rate': wins / max(len(rs), 1),
                'ci95': [low, high], 'mean_length': float(np.mean([r.steps for r in rs])) if rs else float('nan'),
                'latency_ms_median': percentile(latencies, 50) * 1e3, 'latency_ms_p95': percentile(latencies, 95) * 1e3,
                'mean_visual_kept': float(np.mean(kept)) if kept else float('nan'),
                'flops_ratio': float(np.mean(flops)) if flops else float('nan'),
                'selection_ms_median': percentile(selection, 50) * 1e3,
                'non_finite_chunks': sum(r.non_finite_chunks for r in rs),
                'outcomes': count_outcomes([r.outcome for r in rs if r.outcome])}
    families = sorted({r.family for r in results})
    return {'label': label, 'overall': block(results),
            'families': {f: block([r for r in results if r.family == f]) for f in families}}


def markdown_table(summaries: Sequence[dict]) -> str:
    """One row per (configuration, family) plus an overall row."""
    lines = ['| config | family | success | 95% CI | mean length | latency median ms | p95 ms | visual kept | FLOPs |',
             '|---|---|---|---|---|---|---|---|---|']
    for summary in summaries:
        rows = [*summary['families'].items(), ('all', summary['overall'])]
        for family, s in rows:
            low, high = (number_text(bound, scale=100) for bound in s['ci95'])
            lines.append(f"| {summary['label']} | {family} "
                         f"| {number_text(s['success_rate'], scale=100)}% ({s['successes']}/{s['episodes']}) "
                         f"| {low}-{high}% | {number_text(s['mean_length'])} | {number_text(s['latency_ms_median'])} "
                         f"| {number_text(s['latency_ms_p95'])} | {number_text(s['mean_visual_kept'])} "
                         f"| {number_text(s['flops_ratio'], '.0f', 100)}% |")
    return '\n'.join(lines)


def outcome_table(summaries: Sequence[dict], per_family: bool = True) -> str:
    """How the episodes ended, one row per (configuration, family) or per configuration: counts per outcome."""
    def blocks(summary: dict) -> list[tuple[str, dict]]:
        return [*(summary['families'].items() if per_family else ()), ('all', summary['overall'])]
    seen = [name for name in OUTCOMES
            if any(name in block.get('outcomes', {}) for summary in summaries for _, block in blocks(summary))]
    lines = ['| config | family | ' + ' | '.join(seen) + ' |', '|---|---|' + '---|' * len(seen)]
    for summary in summaries:
        for family, s in blocks(summary):
            counts = s.get('outcomes', {})
            lines.append(f"| {summary['label']} | {family} | " + ' | '.join(str(counts.get(n, 0)) for n in seen) + ' |')
    return '\n'.join(lines)


def prepare_report_directory(out_dir: Path) -> None:
    """Create ``out_dir`` (or raise OSError) before an evaluation, not after it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f'{out_dir}: not writable')


def write_report(summaries: Sequence[dict], out_dir: Path, name: str = 'closed_loop',
                 run: Optional[dict] = None) -> tuple[Path, Path]:
    """``<name>.json`` (machine-readable) and ``<name>.md`` (the markdown table) in ``out_dir``.

    ``run``: what was evaluated (model, method config, seeds, ...), written into both so a report names its run.
    """
    prepare_report_directory(out_dir)
    json_path, md_path = out_dir / f'{name}.json', out_dir / f'{name}.md'
    document = {'created': time.strftime('%Y-%m-%d %H:%M:%S'), **({'run': run} if run else {}),
                'results': list(summaries)}
    json_path.write_text(strict_json(document, indent=2))
    head = ''.join(f'{key}: {strict_json(value)}  \n' for key, value in (run or {}).items())
    md_path.write_text((head + '\n' if head else '') + markdown_table(summaries)
                       + '\n\nHow the episodes ended (`sim/outcomes.py`):\n\n' + outcome_table(summaries) + '\n')
    return json_path, md_path


def record_episode(spec: PolicySpec, family: str, seed: int, path: Path, image_size: int = 96,
                   execute_steps: Optional[int] = None, max_steps: Optional[int] = None) -> EpisodeResult:
    """Run one episode in this process and save a PNG strip (and a GIF next to it) of both cameras.

    ``execute_steps`` / ``max_steps`` as in :func:`evaluate`, on one thread as its workers: the same rollout as
    the scored one.
    """
    env = TabletopEnv(image_size=image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        policy = load_policy(spec.model, spec.method, spec.method_config, seed=spec.seed)
        result = run_episode(env, policy, family, seed, execute_steps=execute_steps, record_frames=True,
                             max_steps=max_steps)
    finally:
        torch.set_num_threads(threads)
    title = f"{spec.name}: {result.frames[0].instruction} -> {'success' if result.success else 'failure'}"
    save_strip(result.frames, path, num_frames=10, title=title)
    save_gif(result.frames, path.with_suffix('.gif'))
    result.frames = None
    return result
