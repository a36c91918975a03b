"""Demonstration dataset: one compressed ``.npz`` per episode plus a ``manifest.json`` per directory.

On-disk format (``FORMAT_NAME``, version ``FORMAT_VERSION``)::

    <root>/manifest.json
    <root>/episodes/<family>_<seed:07d>.npz

Each episode ``.npz`` (``np.load(path)`` works without pickle) holds, for T control steps:

    image_<camera>  uint8   (T, H, W, 3)   RGB frame seen *before* action t (one key per camera)
    proprio         float32 (T, P)         proprio before action t (layout: ``PROPRIO_LAYOUT``)
    actions         float32 (T, 7)         normalised action t (dx, dy, dz, droll, dpitch, dyaw, gripper)
    instruction     str     ()             e.g. 'pick up the red cube'
    family          str     ()             'pick' | 'place' | 'push'
    seed            int64   ()
    success         bool    ()
    meta            str     ()             JSON: cameras, image_size, noise, task target / plate / zone, ...;
                                           recovery demos also policy_steps (driven by the policy before the
                                           expert took over) and start_target_xy (target position then)

``manifest.json`` holds the format name and version, image size, camera names, proprio layout, action labels
and scales, ``takeover_model`` (recovery demos: the policy that drove first, else null), the vocabulary, and
``episodes``: a list of ``{file, family, seed, instruction, length, success}`` sorted by (family, seed).
The collector runs the simulator.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from specprune_ros.evaluation.closed_loop import run_episode
from specprune_ros.models.loading import load_policy
from specprune_ros.policy.reference_vla import ReferenceVLAConfig
from specprune_ros.sim import scene
from specprune_ros.sim.env import (ACTION_DIM, CAMERA_NAMES, CONTROL_PERIOD_S, PROPRIO_LAYOUT, ROTATION_SCALE_RAD,
                                   TRANSLATION_SCALE_M, TabletopEnv)
from specprune_ros.sim.expert import ScriptedExpert, continue_expert_episode, run_expert_episode
from specprune_ros.sim.tasks import EVAL_SEED_START, TASK_FAMILIES, TRAIN_SEED_START
from specprune_ros.sim.vocab import VOCABULARY

FORMAT_NAME = 'specprune_sim_demos'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
EPISODE_DIR = 'episodes'
PathLike = Union[str, Path]


@dataclass
class Episode:
    """One demonstration; ``images[camera]`` is (T, H, W, 3) uint8 (empty dict if not loaded)."""

    images: dict[str, np.ndarray]
    proprio: np.ndarray
    actions: np.ndarray
    instruction: str
    family: str
    seed: int
    success: bool
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.actions.shape[0])


def episode_filename(family: str, seed: int) -> str:
    return f'{family}_{int(seed):07d}.npz'


def write_episode(path: PathLike, episode: Episode) -> Path:
    """Write one episode as a compressed ``.npz`` (atomically: temp file, then rename)."""
    path = Path(path)
    t = len(episode)
    if episode.proprio.shape[0] != t:
        raise ValueError(f'proprio has {episode.proprio.shape[0]} rows, actions {t}')
    arrays = {}
    for cam, frames in episode.images.items():
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != t or frames.shape[-1] != 3:
            raise ValueError(f'camera {cam!r}: expected uint8 (T={t}, H, W, 3), got {frames.dtype} '
                             f'{frames.shape}')
        arrays[f'image_{cam}'] = frames
    arrays.update(
        proprio=np.asarray(episode.proprio, dtype=np.float32),
        actions=np.asarray(episode.actions, dtype=np.float32),
        instruction=np.asarray(episode.instruction),
        family=np.asarray(episode.family),
        seed=np.asarray(int(episode.seed), dtype=np.int64),
        success=np.asarray(bool(episode.success)),
        meta=np.asarray(json.dumps(episode.meta, sort_keys=True)),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.stem}.{os.getpid()}.tmp.npz')
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def read_episode(path: PathLike, cameras: Optional[Sequence[str]] = None,
                 load_images: bool = True) -> Episode:
    """Load one episode; `cameras` restricts which image arrays are decompressed."""
    with np.load(Path(path), allow_pickle=False) as z:
        names = [k[len('image_'):] for k in z.files if k.startswith('image_')]
        if cameras is not None:
            missing = set(cameras) - set(names)
            if missing:
                raise KeyError(f'{path}: no camera(s) {sorted(missing)}; has {names}')
            names = list(cameras)
        images = {c: z[f'image_{c}'] for c in names} if load_images else {}
        return Episode(images=images, proprio=z['proprio'], actions=z['actions'],
                       instruction=str(z['instruction']), family=str(z['family']), seed=int(z['seed']),
                       success=bool(z['success']), meta=json.loads(str(z['meta'])))


def read_manifest(root: PathLike) -> dict:
    with open(Path(root) / MANIFEST) as f:
        manifest = json.load(f)
    if manifest.get('format') != FORMAT_NAME:
        raise ValueError(f'{root}: not a {FORMAT_NAME} directory')
    return manifest


def write_manifest(root: PathLike, manifest: dict) -> Path:
    path = Path(root) / MANIFEST
    tmp = path.with_name(f'.{MANIFEST}.{os.getpid()}.tmp')
    with open(tmp, 'w') as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, path)
    return path


def iter_episodes(root: PathLike, families: Optional[Iterable[str]] = None,
                  cameras: Optional[Sequence[str]] = None, load_images: bool = True,
                  successful_only: bool = True) -> Iterator[Episode]:
    """Episodes of a dataset directory in manifest order (sorted files if there is no manifest)."""
    root = Path(root)
    wanted = set(families) if families is not None else None
    if (root / MANIFEST).exists():
        entries = read_manifest(root)['episodes']
        files = [(root / e['file'], e) for e in entries]
    else:
        files = [(p, None) for p in sorted((root / EPISODE_DIR).glob('*.npz'))]
    for path, entry in files:
        if entry is not None:
            if wanted is not None and entry['family'] not in wanted:
                continue
            if successful_only and not entry['success']:
                continue
        ep = read_episode(path, cameras=cameras, load_images=load_images)
        if (wanted is None or ep.family in wanted) and (ep.success or not successful_only):
            yield ep


def select_entries(manifests: Sequence[tuple[PathLike, dict]], limit: int = 0) -> list[tuple[Path, dict]]:
    """The successful episodes of several dataset directories, as (root, manifest entry), at most ``limit`` (0: all).

    A limit takes the same number from every (directory, family) in turn, each in seed order, so a short selection
    still holds every family of every directory; the choice is the same on every call.
    """
    buckets: list[list[tuple[Path, dict]]] = []
    for root, manifest in manifests:
        by_family: dict[str, list[tuple[Path, dict]]] = {}
        for entry in manifest['episodes']:
            if entry['success']:
                by_family.setdefault(entry['family'], []).append((Path(root), entry))
        for family in sorted(by_family):
            buckets.append(sorted(by_family[family], key=lambda item: item[1]['seed']))
    if not limit:
        return [item for bucket in buckets for item in bucket]
    chosen: list[tuple[Path, dict]] = []
    for rank in range(max((len(b) for b in buckets), default=0)):
        for bucket in buckets:
            if rank < len(bucket) and len(chosen) < limit:
                chosen.append(bucket[rank])
    return chosen


# --- collection ---------------------------------------------------------------------------------------
_WORKER_ENV = None


def _worker_env(image_size: int):
    global _WORKER_ENV
    if _WORKER_ENV is None or _WORKER_ENV.image_size != image_size:
        _WORKER_ENV = TabletopEnv(image_size=image_size)
    return _WORKER_ENV


def record_episode(env, family: str, seed: int, noise: float) -> Episode:
    """Roll the scripted expert out with rendering on `env`.

    The expert's noise stream is seeded by (family, seed), so the same job gives the same episode in any worker.
    """
    rng = np.random.default_rng([int(seed), TASK_FAMILIES.index(family), 0xE1])
    expert = ScriptedExpert(env, noise=noise, rng=rng)
    observations, actions, success = run_expert_episode(env, expert, render=True, seed=seed, family=family)
    return _episode(env, family, seed, noise, observations, actions, success)


def record_takeover_episode(env, policy, family: str, seed: int, noise: float,
                            max_policy_chunks: int = 12) -> Optional[Episode]:
    """A recovery demonstration.

    `policy` drives the episode for a seeded random number of chunks, then the expert takes over from wherever that left
    the robot and objects. Only the expert's part is recorded, so the data holds corrections from the states the policy
    actually reaches (the idea of DAgger / DART). None when the policy finished the task before the hand-over.
    """
    rng = np.random.default_rng([int(seed), TASK_FAMILIES.index(family), 0x7A6E])
    chunks = int(rng.integers(1, max_policy_chunks + 1))
    driven = run_episode(env, policy, family, seed, max_steps=chunks * POLICY_CHUNK)
    if env.done:
        return None
    policy_steps, obs = driven.steps, env.observe()
    expert = ScriptedExpert(env, noise=noise, rng=rng)
    expert.take_over()
    target_xy = env.sim_state().objects[env.task.target].pos[:2]
    observations, actions, success = continue_expert_episode(env, expert, obs, render=True)
    return _episode(env, family, seed, noise, observations, actions, success,
                    policy_steps=policy_steps, start_target_xy=[float(v) for v in target_xy])


def _episode(env, family: str, seed: int, noise: float, observations: list, actions: np.ndarray, success: bool,
             **extra_meta) -> Episode:
    """Pack a rolled-out episode (what the expert saw and did) with its metadata."""
    cams = env.cameras
    images = {c: np.stack([o.images[c] for o in observations]) if observations
              else np.zeros((0, env.image_size, env.image_size, 3), np.uint8) for c in cams}
    proprio = np.stack([o.proprio for o in observations]) if observations else np.zeros((0, len(PROPRIO_LAYOUT)))
    meta = dict(cameras=list(cams), image_size=env.image_size, noise=noise, target=env.task.target,
                plate=env.task.plate, zone=env.task.zone, max_steps=env.max_steps,
                proprio_layout=list(PROPRIO_LAYOUT), control_period_s=CONTROL_PERIOD_S,
                format=FORMAT_NAME, version=FORMAT_VERSION, **extra_meta)
    return Episode(images=images, proprio=proprio.astype(np.float32), actions=actions,
                   instruction=env.instruction, family=family, seed=int(seed), success=bool(success), meta=meta)


_WORKER_POLICY: dict = {}
POLICY_CHUNK = 8          # actions per policy chunk when a policy drives before the expert takes over


def _worker_policy(model: str):
    """The take-over policy of this worker process, loaded once (one torch thread per worker)."""
    if model not in _WORKER_POLICY:
        torch.set_num_threads(1)
        _WORKER_POLICY.clear()
        _WORKER_POLICY[model] = load_policy(model)
    return _WORKER_POLICY[model]


def _collect_job(out_dir: str, family: str, seed: int, noise: float, image_size: int,
                 takeover_model: Optional[str] = None) -> dict:
    """Worker: record one episode, write it if successful, return its manifest entry."""
    env = _worker_env(image_size)
    if takeover_model:
        ep = record_takeover_episode(env, _worker_policy(takeover_model), family, seed, noise)
    else:
        ep = record_episode(env, family, seed, noise)
    rel = f'{EPISODE_DIR}/{episode_filename(family, seed)}'
    if ep is None:          # the policy finished the task before the hand-over: no expert attempt was made
        return dict(file=rel, family=family, seed=int(seed), instruction=env.instruction, length=0, success=False,
                    policy_finished=True)
    if ep.success:
        write_episode(Path(out_dir) / rel, ep)
    return dict(file=rel, family=family, seed=int(seed), instruction=ep.instruction, length=len(ep),
                success=ep.success)


def sim_fingerprint(image_size: int = 96) -> str:
    """Short hash of what the simulator produces.

    Its scene description, the reset state of a fixed seed of every family and a few steps of dynamics (no rendering). A
    dataset records it, so data from an older version of the simulator (different start pose, cameras, objects) is
    refused instead of silently training a policy for a world it will never be evaluated in.
    """
    digest = hashlib.sha256(scene.build_mjcf(image_size).encode())
    env = TabletopEnv(image_size=image_size)
    try:
        push = np.zeros(ACTION_DIM)
        push[[0, 2]] = 0.5, -0.5
        for family in TASK_FAMILIES:
            observation = env.reset(seed=0, family=family, render=False)
            digest.update(observation.instruction.encode())
            for _ in range(3):
                observation, _, _ = env.step(push, render=False)
            state = env.state_dict()
            for values in (observation.proprio, state['qpos'], state['mocap_pos']):
                digest.update(np.round(np.asarray(values, dtype=np.float64), 5).tobytes())
    finally:
        env.close()
    return digest.hexdigest()[:16]


def check_sim_fingerprint(manifest: dict, root: PathLike = 'the dataset', current: Optional[str] = None) -> None:
    """Raise ValueError unless ``manifest`` was recorded by the current simulator.

    ``current``: the current simulator's fingerprint, if already computed.
    """
    recorded = manifest.get('sim_fingerprint')
    current = current or sim_fingerprint(manifest.get('image_size', 96))
    if recorded != current:
        raise ValueError(f'{root} was recorded by another version of the simulator (fingerprint {recorded}, '
                         f'this code: {current}); collect it again into a fresh directory')


def _base_manifest(image_size: int, noise: float, takeover_model: Optional[str] = None) -> dict:
    return dict(format=FORMAT_NAME, version=FORMAT_VERSION, image_size=image_size, cameras=list(CAMERA_NAMES),
                sim_fingerprint=sim_fingerprint(image_size),
                proprio_layout=list(PROPRIO_LAYOUT),
                action_labels=['dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper'],
                translation_scale_m=TRANSLATION_SCALE_M, rotation_scale_rad=ROTATION_SCALE_RAD,
                control_period_s=CONTROL_PERIOD_S, vocabulary=list(VOCABULARY), noise=noise,
                takeover_model=takeover_model, episodes=[], attempts={})


def collect_demonstrations(out_dir: PathLike, families: Sequence[str] = TASK_FAMILIES,
                           episodes_per_family: int = 50, seed_start: int = TRAIN_SEED_START,
                           noise: float = 0.1, workers: int = 2, image_size: int = 96,
                           max_attempts_per_family: Optional[int] = None, progress: bool = True,
                           takeover_model: Optional[str] = None) -> dict:
    """Run the noisy expert with rendering and keep ``episodes_per_family`` successful episodes per family.

    With ``takeover_model`` (a policy checkpoint) every episode is a recovery demonstration: the policy drives
    first, the expert takes over (``record_takeover_episode``); episodes the policy finishes alone are skipped.

    Family f uses seeds seed_start, seed_start + 1, ... (a failed seed is skipped and the next one
    tried). Seeds never cross into the other split (``TRAIN_SEED_START`` / ``EVAL_SEED_START``).
    A directory that already holds episodes is extended: those of the same image size, noise and take-over model
    are kept (also ones an interrupted run wrote but did not list) and only the missing episodes are collected;
    other settings are refused, so a manifest always describes every episode it lists. The manifest is written
    even when the collection stops early (an error, Ctrl-C), so a rerun continues where it stopped. A family named
    twice is collected once. ``workers`` > 1 uses that many spawned processes. Returns the manifest that was written.
    """
    families = tuple(dict.fromkeys(families))
    check_collection_settings(families, episodes_per_family, noise, image_size)
    cap = max_attempts_per_family or ((3 if takeover_model else 2) * episodes_per_family + 10)
    seeds = 2 * cap if takeover_model else cap          # seeds the policy finishes alone are no expert attempt
    _check_seeds(seed_start, seeds)
    out = Path(out_dir)
    (out / EPISODE_DIR).mkdir(parents=True, exist_ok=True)
    manifest = _resumed_manifest(out, image_size, noise, takeover_model)
    bar = tqdm(total=episodes_per_family * len(families), disable=not progress, desc='demos', unit='ep')
    collection = _Collection(out, families, episodes_per_family, seed_start, cap, (noise, image_size, takeover_model),
                             done_files={e['file'] for e in manifest['episodes']}, bar=bar, seeds=seeds)
    try:
        jobs = collection.first_jobs()
        bar.update(sum(collection.kept.values()))
        _run_jobs(collection, jobs, workers)
    finally:
        bar.close()
        _merge_manifest(out, manifest, collection)      # also on an interruption: what finished stays listed
    return _check_kept(manifest, collection)


def check_collection_settings(families: Sequence[str], episodes_per_family: int, noise: float,
                              image_size: int) -> None:
    """Raise ValueError for settings that would collect nothing or data the reference VLA cannot train on."""
    for f in families:
        if f not in TASK_FAMILIES:
            raise ValueError(f'unknown task family {f!r}')
    if not families:
        raise ValueError('no task family to collect')
    if episodes_per_family < 1:
        raise ValueError(f'episodes_per_family must be at least 1, not {episodes_per_family}')
    if not noise >= 0:
        raise ValueError(f'noise must not be negative, not {noise}')   # the expert adds none below 0
    problem = image_size_problem(image_size)
    if problem:
        raise ValueError(problem)


def image_size_problem(image_size: int) -> Optional[str]:
    """Why the reference VLA could not take ``image_size`` px frames (whole patches, at least 2 per side); or None."""
    patch = ReferenceVLAConfig.patch_size
    if image_size < 2 * patch or image_size % patch:
        return (f'image size {image_size} must be a multiple of the reference VLA\'s patch size {patch}, '
                f'at least {2 * patch}')
    return None


def _check_seeds(seed_start: int, cap: int) -> None:
    """Training seeds must stay below the held-out evaluation seeds (EVAL_SEED_START and above), and be >= 0."""
    if seed_start < TRAIN_SEED_START:
        raise ValueError('seeds must be non-negative')
    if seed_start + cap > EVAL_SEED_START:
        raise ValueError(f'training seeds {seed_start}..{seed_start + cap} would reach the held-out evaluation seeds '
                         f'(EVAL_SEED_START={EVAL_SEED_START}): a policy trained on them would be scored on its '
                         'own training layouts')


def _resumed_manifest(out: Path, image_size: int, noise: float, takeover_model: Optional[str]) -> dict:
    """A new manifest that keeps the episodes (still on disk) and attempt counts of an existing one.

    Episode files no manifest lists (written by a run that was killed) are adopted when they were recorded with
    these settings. ValueError when the directory holds episodes of other settings.
    """
    manifest = _base_manifest(image_size, noise, takeover_model)
    if (out / MANIFEST).exists():
        old = read_manifest(out)
        if old['image_size'] != image_size:
            raise ValueError(f'{out} holds {old["image_size"]} px episodes, not {image_size}')
        check_sim_fingerprint(old, out, current=manifest['sim_fingerprint'])
        manifest['episodes'] = [e for e in old['episodes'] if (out / e['file']).exists()]
        manifest['attempts'] = old.get('attempts', {})
        if manifest['episodes']:
            _check_same_settings(out, old, noise, takeover_model)
    listed = {e['file'] for e in manifest['episodes']}
    for path in sorted((out / EPISODE_DIR).glob('*.npz')):
        rel = f'{EPISODE_DIR}/{path.name}'
        if rel in listed:
            continue
        try:
            episode = read_episode(path, load_images=False)
        except (OSError, ValueError, KeyError):
            continue                                    # not a complete episode file; its seed is collected again
        meta = episode.meta
        recorded = dict(image_size=meta.get('image_size'), noise=meta.get('noise'),
                        takeover='policy_steps' in meta)
        if recorded != dict(image_size=image_size, noise=noise, takeover=takeover_model is not None):
            raise ValueError(f'{out} holds {path.name}, recorded with {recorded}; collect these settings into '
                             'another directory')
        manifest['episodes'].append(dict(file=rel, family=episode.family, seed=episode.seed,
                                         instruction=episode.instruction, length=len(episode),
                                         success=episode.success))
        counts = manifest['attempts'].setdefault(episode.family, {'run': 0, 'succeeded': 0})
        counts['run'] += 1
        counts['succeeded'] += 1
    return manifest


def _check_same_settings(out: Path, old: dict, noise: float, takeover_model: Optional[str]) -> None:
    """Refuse to add episodes of another noise level or take-over model to a directory's episodes."""
    asked = {'noise': noise, 'takeover_model': takeover_model}
    held = {key: old.get(key) for key in asked}
    if 'noise' not in old:                              # written before manifests recorded the noise
        held['noise'] = noise
    if held != asked:
        raise ValueError(f'{out} holds episodes collected with {held}, not {asked}: a dataset\'s manifest describes '
                         'all its episodes, so collect these settings into another directory')


class _Collection:
    """Which seed each family tries next, and what was kept, run and succeeded so far.

    ``cap`` bounds the expert's attempts per family, ``seeds`` the seeds tried (recovery collection: also those the
    take-over policy finished alone, which are counted apart as ``policy_finished``).
    """

    def __init__(self, out: Path, families: tuple[str, ...], episodes_per_family: int, seed_start: int, cap: int,
                 job_options: tuple, done_files: set[str], bar: tqdm, seeds: Optional[int] = None) -> None:
        self.out = out
        self.families = families
        self.episodes_per_family = episodes_per_family
        self.cap = cap
        self.seeds = cap if seeds is None else seeds
        self.job_options = job_options                  # (noise, image_size, takeover_model) of every job
        self.done_files = done_files
        self.kept = {f: 0 for f in families}
        self.tried = {f: 0 for f in families}
        self.next_seed = {f: seed_start for f in families}
        self.ran = {f: 0 for f in families}
        self.succeeded = {f: 0 for f in families}
        self.policy_finished = {f: 0 for f in families}
        self.new_entries: list[dict] = []
        self.bar = bar

    def next_job(self, f: str, in_flight: int = 0) -> Optional[tuple]:
        """The job of family f's next seed not yet on disk; None once kept and ``in_flight`` episodes suffice."""
        while self.tried[f] - self.policy_finished[f] < self.cap and self.tried[f] < self.seeds:
            if self.kept[f] + in_flight >= self.episodes_per_family:
                return None
            seed = self.next_seed[f]
            self.next_seed[f] += 1
            self.tried[f] += 1
            rel = f'{EPISODE_DIR}/{episode_filename(f, seed)}'
            if rel in self.done_files:                  # already on disk from an earlier run
                self.kept[f] += 1
                continue
            return (str(self.out), f, seed, *self.job_options)
        return None

    def first_jobs(self) -> list[tuple]:
        """One job per missing episode of every family (the episodes already on disk are not run again)."""
        jobs = []
        for f in self.families:
            queued = 0
            while (job := self.next_job(f, queued)) is not None:
                jobs.append(job)
                queued += 1
        return jobs

    def handle(self, entry: dict, families_in_flight: Iterable[str]) -> Optional[tuple]:
        """Count a finished job; the next job of its family if it still needs episodes."""
        f = entry['family']
        if entry.get('policy_finished'):
            self.policy_finished[f] += 1
            return self.next_job(f, sum(1 for g in families_in_flight if g == f))
        self.ran[f] += 1
        self.succeeded[f] += int(entry['success'])
        if entry['success'] and self.kept[f] < self.episodes_per_family:
            self.kept[f] += 1
            self.new_entries.append(entry)
            self.bar.update(1)
        elif entry['success']:                          # surplus (cannot normally happen)
            (self.out / entry['file']).unlink(missing_ok=True)
        return self.next_job(f, sum(1 for g in families_in_flight if g == f))


def _run_jobs(collection: _Collection, jobs: list[tuple], workers: int) -> None:
    """Run the jobs (and the ones they lead to) in this process or in ``workers`` spawned processes."""
    if workers <= 1:
        queue = list(jobs)
        while queue:
            job = queue.pop(0)
            nxt = collection.handle(_collect_job(*job), [j[1] for j in queue])
            if nxt is not None:
                queue.append(nxt)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context('spawn')) as pool:
        futures = {pool.submit(_collect_job, *j): j[1] for j in jobs}
        while futures:
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            for fut in finished:
                futures.pop(fut)
                nxt = collection.handle(fut.result(), list(futures.values()))
                if nxt is not None:
                    futures[pool.submit(_collect_job, *nxt)] = nxt[1]


def _merge_manifest(out: Path, manifest: dict, collection: _Collection) -> None:
    """Merge the new episodes and attempt counts into the manifest and write it."""
    by_file = {e['file']: e for e in manifest['episodes']}
    by_file.update({e['file']: e for e in collection.new_entries})
    manifest['episodes'] = sorted(by_file.values(), key=lambda e: (e['family'], e['seed']))
    for f in collection.families:
        prev = manifest['attempts'].get(f, {'run': 0, 'succeeded': 0})
        manifest['attempts'][f] = {'run': prev['run'] + collection.ran[f],
                                   'succeeded': prev['succeeded'] + collection.succeeded[f]}
        finished = prev.get('policy_finished', 0) + collection.policy_finished[f]
        if finished:                                    # recovery collection: seeds the policy finished alone
            manifest['attempts'][f]['policy_finished'] = finished
    write_manifest(out, manifest)


def _check_kept(manifest: dict, collection: _Collection) -> dict:
    """The manifest, unless a family fell short of the episodes asked for (RuntimeError)."""
    wanted = collection.episodes_per_family
    short = {f: collection.kept[f] for f in collection.families if collection.kept[f] < wanted}
    if short:
        alone = {f: collection.policy_finished[f] for f in short if collection.policy_finished[f]}
        if alone:
            raise RuntimeError(f'kept only {short} of {wanted} per family: the take-over policy finished {alone} '
                               f'episodes alone before the hand-over (of {collection.seeds} seeds per family)')
        raise RuntimeError(f'expert succeeded too rarely; kept only {short} of {wanted} per family')
    return manifest
