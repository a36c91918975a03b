"""Offline replay evaluation: the same recorded frames through the unpruned policy and each pruning method.

In-process, no DDS. For every method the policy is loaded fresh (``load_policy``), reset at the start, on an
instruction change, after a gap longer than ``reset_after_gap_s`` (as the node does) and where the bag's clock
restarted (a new episode, see ``streams``), and run on the same observations with the same executed-action history:

* schedule ``recorded`` (the default when the bag has ``~/action_chunk``): infer exactly at the frames where
  the live node inferred, so the recorded chunks can be reproduced; ``every``: every ``stride``-th frame set.
* executed actions between two inferences: the recorded commands stamped between them when the bag has them,
  else the unpruned policy's own chunk for the elapsed steps (identical for every method).

Reported per method: action deviation from unpruned (chunk mean |diff|, the first action's translation L2 and
max |diff|), from the recorded commands and chunks when present (chunks as wide as the policy's), mean kept visual
tokens, model latency and the speedup over unpruned (median latency ratio with a 95% bootstrap interval and the
sample counts; a run that kept every visual token is marked unpruned instead), the FLOPs ratio, and the frames the
kept patches are drawn on. The methods run one after the other, so the speedups are sequential, not interleaved,
measurements.
"""
from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from specprune_ros.bags.io import BagError
from specprune_ros.bags.streams import BagStreams
from specprune_ros.codecs.instruction import InstructionError
from specprune_ros.codecs.kept_patches import draw_kept_patches, kept_patch_masks
from specprune_ros.evaluation.statistics import median_ratio, percentile
from specprune_ros.models.loading import load_policy
from specprune_ros.policy.interface import Observation, Policy


@dataclass
class ReplayConfig:
    model: str = 'reference'
    methods: Sequence[str] = ('none', 'specprune', 'vla_pruner')
    method_configs: dict = field(default_factory=dict)     # method -> config dict
    seed: int = 0
    device: str = 'cpu'
    dtype: str = 'float32'
    schedule: str = 'auto'                                 # auto | recorded | every
    stride: int = 1
    reset_after_gap_s: float = 2.0
    repeat_baseline: bool = True                           # run 'none' twice: the determinism check
    patch_frames: int = 3                                  # frames whose kept patches are drawn
    progress: bool = True


@dataclass
class MethodRun:
    method: str
    stamps: list                       # observation stamp (ns) per inference
    actions: np.ndarray                # (N, chunk, 7)
    latencies_s: list
    kept: list                         # mean kept visual tokens per layer, per inference
    flops_ratio: list
    visual_tokens: int                 # visual tokens per observation (unpruned)
    kept_examples: list = field(default_factory=list)     # (inference index, picture RGB)
    modes: list = field(default_factory=list)
    cameras: tuple = ()                # the policy's cameras, in the order its pictures show them


def inference_indices(streams: BagStreams, config: ReplayConfig) -> tuple[list[int], str]:
    schedule = config.schedule
    if schedule == 'auto':
        schedule = 'recorded' if streams.has_chunks else 'every'
    if schedule == 'recorded':
        indices = [i for i, o in enumerate(streams.observations) if o.recorded_chunk is not None]
        if not indices:
            raise BagError(f'bag {streams.path}: schedule "recorded" needs ~/action_chunk messages stamped like '
                           f'the frames ({streams.topics.chunks}); none found')
        return indices, schedule
    if schedule != 'every':
        raise ValueError(f"schedule must be 'auto', 'recorded' or 'every', got {config.schedule!r}")
    if int(config.stride) < 1:
        raise ValueError(f'stride must be 1 or more, got {config.stride}')
    return list(range(0, len(streams.observations), int(config.stride))), schedule


def unused_stride_note(schedule: str, stride: int) -> str:
    """The note saying a stride was given but the schedule does not use it ('' when it is used or is 1)."""
    if schedule == 'every' or int(stride) == 1:
        return ''
    return (f'stride {stride} not used: schedule {schedule} infers where the live node inferred '
            '(--schedule every applies a stride)')


def _reset_points(streams: BagStreams, indices: Sequence[int], gap_s: float) -> set[int]:
    """Inference positions (into ``indices``) before which the policy's temporal state is reset."""
    resets = {0}
    observations = streams.observations
    for j in range(1, len(indices)):
        previous, current = observations[indices[j - 1]], observations[indices[j]]
        if current.instruction != previous.instruction or current.episode != previous.episode \
                or (current.stamp_ns - previous.stamp_ns) * 1e-9 > gap_s:
            resets.add(j)
    return resets


def executed_histories(streams: BagStreams, indices: Sequence[int], resets: set[int],
                       baseline: Optional[np.ndarray]) -> list[Optional[np.ndarray]]:
    """Per inference, the actions executed since the previous one (None right after a reset)."""
    out: list[Optional[np.ndarray]] = []
    observations = streams.observations
    keys = [key for key, _ in streams.commands]
    for j, index in enumerate(indices):
        if j in resets:
            out.append(None)
            continue
        previous = indices[j - 1]
        lo = bisect.bisect_left(keys, streams.command_key(observations[previous]))
        hi = bisect.bisect_left(keys, streams.command_key(observations[index]))
        recorded = [action for _, action in streams.commands[lo:hi]]
        if recorded:
            out.append(np.asarray(recorded, dtype=np.float32))
        elif baseline is not None:
            steps = min(index - previous, baseline.shape[1])
            out.append(np.asarray(baseline[j - 1][:steps], dtype=np.float32))
        else:
            out.append(None)
    return out


def run_method(streams: BagStreams, indices: Sequence[int], resets: set[int],
               executed: Sequence[Optional[np.ndarray]], config: ReplayConfig, method: str,
               label: str = '', example_at: Sequence[int] = (), self_feed: bool = False,
               policy: Optional[Policy] = None) -> MethodRun:
    """One method over the inference points, with ``policy`` when given (loaded for ``method``), else a fresh one.

    ``self_feed``: where ``executed`` has no history (and no reset), use this run's own previous chunk for the elapsed
    steps (the unpruned baseline on a bag without commands).
    """
    from tqdm import tqdm

    if policy is None:
        policy = load_policy(config.model, method=method, method_config=config.method_configs.get(method),
                             device=config.device, dtype=config.dtype, seed=config.seed)
    if policy.proprio_dim and any(streams.observations[i].proprio is None for i in indices):
        raise BagError(f'bag {streams.path}: the policy needs the robot state (proprio), but the bag lacks '
                       f'{streams.topics.ee_pose} (PoseStamped) and/or {streams.topics.gripper_state} before some '
                       'frames; name the topics that carry them')
    states = {len(streams.observations[i].proprio) for i in indices if streams.observations[i].proprio is not None}
    if policy.proprio_dim and states != {policy.proprio_dim}:
        raise BagError(f'bag {streams.path}: the robot state read from the bag has {sorted(states)} values (pose '
                       f'layout {streams.topics.pose_layout!r}), the policy expects {policy.proprio_dim} (an '
                       'OpenVLA-OFT LIBERO checkpoint: --pose-layout libero)')
    missing = [name for name in policy.camera_names if name not in streams.topics.cameras]
    if missing:
        raise BagError(f'the policy needs cameras {list(policy.camera_names)}; no topic given for {missing}')
    actions, latencies, kept, flops, modes, stamps, examples = [], [], [], [], [], [], []
    visual_tokens = 0
    wanted_examples = set(example_at)
    bar = tqdm(total=len(indices), desc=f'replay {label or method}', unit='step', disable=not config.progress,
               dynamic_ncols=True, leave=False)
    for j, index in enumerate(indices):
        observation = streams.observations[index]
        if j in resets:
            policy.reset()
        history = executed[j]
        if history is None and self_feed and j not in resets and actions:
            steps = min(index - indices[j - 1], actions[-1].shape[0])
            history = actions[-1][:steps]
        output = policy.predict(Observation(images={n: observation.images[n] for n in policy.camera_names},
                                            instruction=observation.instruction, proprio=observation.proprio,
                                            executed_actions=history))
        actions.append(np.asarray(output.actions, dtype=np.float32))
        latencies.append(float(output.latency_s))
        stamps.append(observation.stamp_ns)
        record = output.record
        if record is not None:
            kept.append(float(record.mean_visual_kept))
            flops.append(float(record.flops) / float(record.flops_full) if record.flops_full else float('nan'))
            visual_tokens = int(record.layout.num_visual)
            modes.append(str(record.info.get('mode', '')) if getattr(record, 'info', None) else '')
            if j in wanted_examples:
                try:
                    picture = draw_kept_patches([observation.images[n] for n in policy.camera_names],
                                                kept_patch_masks(record), scale=2)
                    examples.append((j, picture))
                except (AttributeError, IndexError, KeyError, ValueError):
                    pass
        bar.update(1)
    bar.close()
    return MethodRun(method=label or method, stamps=stamps, actions=np.stack(actions), latencies_s=latencies,
                     kept=kept, flops_ratio=flops, visual_tokens=visual_tokens, kept_examples=examples, modes=modes,
                     cameras=tuple(policy.camera_names))


def check_instructions(streams: BagStreams, policy: Policy) -> None:
    """Raise ``BagError`` when the policy cannot read an instruction of the bag (before any step runs)."""
    check = getattr(policy, 'check_instruction', None)
    if check is None:
        return
    for text in dict.fromkeys(observation.instruction for observation in streams.observations):
        try:
            check(text)
        except InstructionError as error:
            raise BagError(f'bag {streams.path}: {error}; give the task in words the model reads with '
                           '--instruction') from None


def _deviation(actions: np.ndarray, reference: np.ndarray) -> dict:
    diff = np.abs(actions.astype(np.float64) - reference.astype(np.float64))
    # the first action's translation (xyz): rotation and gripper have their own scales (chunk MAE, gripper flips)
    first = np.linalg.norm(actions[:, 0, :3].astype(np.float64) - reference[:, 0, :3].astype(np.float64), axis=1)
    gripper_flips = np.sign(actions[:, 0, 6]) != np.sign(reference[:, 0, 6])
    return {'chunk_mae': float(diff.mean()), 'chunk_mae_p95': percentile(diff.mean(axis=(1, 2)), 95),
            'first_action_l2': float(first.mean()), 'max_abs': float(diff.max()),
            'exact_steps': int((diff.reshape(len(diff), -1).max(axis=1) == 0).sum()),
            'gripper_flips': int(gripper_flips.sum()), 'per_step_mae': diff.mean(axis=(1, 2)).tolist()}


def _series_stats(values: Sequence[float]) -> dict:
    finite = [v for v in values if math.isfinite(v)]
    return {'mean': float(np.mean(finite)) if finite else float('nan'), 'median': percentile(finite, 50),
            'p95': percentile(finite, 95)}


def evaluate_streams(streams: BagStreams, config: ReplayConfig, baseline_policy: Optional[Policy] = None) -> dict:
    """Run every method; returns the report dictionary (``report.write_report`` renders it).

    ``baseline_policy``: the unpruned policy already loaded (``load_policy`` with 'none'), for the first run.
    """
    started = time.perf_counter()
    indices, schedule = inference_indices(streams, config)
    resets = _reset_points(streams, indices, config.reset_after_gap_s)
    methods = list(dict.fromkeys(['none', *config.methods]))
    count = len(indices)
    example_at = sorted({int(round(x)) for x in np.linspace(0, count - 1, num=min(config.patch_frames, count))}) \
        if config.patch_frames else []
    # the baseline first: its chunks fill in executed actions when the bag has no recorded commands
    recorded_only = executed_histories(streams, indices, resets, None)
    baseline = run_method(streams, indices, resets, recorded_only, config, 'none', example_at=example_at,
                          self_feed=True, policy=baseline_policy)
    executed = executed_histories(streams, indices, resets, baseline.actions)
    runs = {'none': baseline}
    determinism = None
    if config.repeat_baseline:
        again = run_method(streams, indices, resets, executed, config, 'none', label='none (repeat)')
        determinism = {'max_abs_diff': float(np.abs(again.actions.astype(np.float64)
                                                    - baseline.actions.astype(np.float64)).max()),
                       'identical': bool(np.array_equal(again.actions, baseline.actions))}
    for method in methods[1:]:
        runs[method] = run_method(streams, indices, resets, executed, config, method, example_at=example_at)
    recorded_chunks = [streams.observations[i].recorded_chunk for i in indices]
    recorded_actions = [streams.observations[i].recorded_action for i in indices]
    notes = list(streams.notes)
    stride_note = unused_stride_note(schedule, config.stride)
    if stride_note:
        notes.append(stride_note)
    width = baseline.actions.shape[2]
    widths = {c.shape[1] for c in recorded_chunks if c is not None}
    if widths - {width}:
        notes.append(f'the recorded chunks have {sorted(widths)} values per step, the policy {width}: not compared')
    results = {}
    for name, run in runs.items():
        speedup, low, high = median_ratio(baseline.latencies_s, run.latencies_s)
        entry: dict[str, Any] = {
            'inferences': len(run.latencies_s),
            'latency_ms': {k: v * 1e3 for k, v in _series_stats(run.latencies_s).items()},
            'speedup': speedup, 'speedup_ci95': [low, high],
            'speedup_samples': [len(baseline.latencies_s), len(run.latencies_s)],
            'pruned': bool(run.kept) and min(run.kept) < run.visual_tokens,
            'kept_visual_tokens': _series_stats(run.kept), 'visual_tokens': run.visual_tokens,
            'flops_ratio': _series_stats(run.flops_ratio)['mean'],
            'vs_unpruned': _deviation(run.actions, baseline.actions),
            'series': {'stamps_s': [s * 1e-9 for s in run.stamps], 'latency_ms': [x * 1e3 for x in run.latencies_s],
                       'kept': run.kept, 'modes': run.modes},
        }
        pairs = [(k, c) for k, c in enumerate(recorded_chunks) if c is not None and c.shape[1] == width]
        if pairs:
            rows = [k for k, _ in pairs]
            steps = min(min(c.shape[0] for _, c in pairs), run.actions.shape[1])
            reference = np.stack([c[:steps] for _, c in pairs]).astype(np.float32)
            entry['vs_recorded_chunks'] = _deviation(run.actions[rows, :steps], reference)
            entry['vs_recorded_chunks']['compared'] = len(rows)
        pairs = [(k, a) for k, a in enumerate(recorded_actions) if a is not None]
        if pairs:
            rows = [k for k, _ in pairs]
            recorded = np.stack([a for _, a in pairs])
            diff = np.abs(run.actions[rows, 0].astype(np.float64) - recorded)
            entry['vs_recorded_actions'] = {'first_action_mae': float(diff.mean()), 'max_abs': float(diff.max()),
                                            'compared': len(rows), 'per_step_mae': diff.mean(axis=1).tolist()}
        results[name] = entry
    examples = {name: [(j, picture) for j, picture in run.kept_examples] for name, run in runs.items()}
    return {
        'bag': streams.path, 'model': config.model, 'schedule': schedule,
        'stride': None if stride_note else config.stride,
        'observations': len(streams.observations), 'inferences': count, 'resets': sorted(resets),
        'camera_sizes': {k: list(v) for k, v in streams.camera_sizes.items()}, 'camera_types': streams.camera_types,
        'topics': vars(streams.topics), 'notes': notes,
        'has_recorded_commands': streams.has_commands, 'has_recorded_chunks': streams.has_chunks,
        'policy_cameras': list(baseline.cameras),
        'recorded_by': [{'method': m, 'model': model, 'inferences': n} for m, model, n in streams.recorded_by],
        'determinism': determinism, 'methods': results, 'seconds': time.perf_counter() - started,
        '_examples': examples, '_example_images': {j: {n: streams.observations[indices[j]].images[n]
                                                       for n in streams.topics.cameras} for j in example_at},
    }
