"""Kept visual tokens of every registered method's default config on recorded reference-VLA episodes.

The observations come from the unpruned reference VLA acting in the simulator on fixed seeds; every method then
replays them in order (each with its own temporal state), and the visual tokens that entered each decoder layer
(plus the tokens whose keys/values were reused) are recorded per step. ``test_kept_tokens_reference.py`` compares a
fresh recording with the committed fixture, so that speed work on the executor and the methods cannot change
what they keep unnoticed.

The observations themselves are committed beside the fixture (``OBSERVATIONS``): a closed-loop rollout depends on
the last bits of the CPU's floating-point kernels, so frames rolled out on another processor differ, while the
methods replaying stored frames compare the selection code alone. Regenerate both only for an intended, measured
change (``--rollout`` runs the simulator again; without it the stored frames are replayed)::

    PYTHONPATH=$PWD python test/kept_tokens_reference.py --rollout
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from specprune_ros.core.step_types import StepRecord
from specprune_ros.evaluation.closed_loop import run_episode
from specprune_ros.models.loading import load_model, load_policy
from specprune_ros.policy.interface import Observation
from specprune_ros.policy.reference_backend import reference_policy
from specprune_ros.pruning import build_method
from specprune_ros.pruning.registry import available_methods
from specprune_ros.sim import EVAL_SEED_START, TabletopEnv

FIXTURE = Path(__file__).parent / 'fixtures' / 'kept_tokens_reference.json'
OBSERVATIONS = FIXTURE.with_name('kept_tokens_reference_observations.npz')
EPISODES = (('push', EVAL_SEED_START + 700_001), ('place', EVAL_SEED_START + 700_002),
            ('pick', EVAL_SEED_START + 700_003))
MAX_SIM_STEPS = 96          # up to 12 inference steps per episode (chunks of 8): past every method's warm-up


class _Recorder:
    """Wraps a policy and keeps every observation it acted on."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.seen: list = []

    def reset(self) -> None:
        self.policy.reset()

    def predict(self, observation):
        self.seen.append(observation)
        return self.policy.predict(observation)


def _bits(indices: Optional[torch.Tensor], visual: np.ndarray) -> str:
    """Hex bitmask over the dense visual order of the visual tokens among ``indices`` ('' for None)."""
    if indices is None:
        return ''
    present = np.isin(visual, np.asarray(indices.cpu(), dtype=np.int64))
    return np.packbits(present).tobytes().hex()


def record_summary(record: StepRecord) -> dict:
    visual = record.layout.visual_indices().numpy()
    return {'kept': [_bits(k, visual) for k in record.kept_per_layer], 'reused': _bits(record.reused, visual)}


def observations_digest(observations: list) -> str:
    digest = hashlib.sha1()
    for obs in observations:
        for name in sorted(obs.images):
            digest.update(np.ascontiguousarray(obs.images[name]).tobytes())
    return digest.hexdigest()


def rollout_observations() -> list[tuple[str, int, list[Observation]]]:
    """The unpruned reference VLA acting in the simulator on the fixed seeds: the frames it acted on."""
    env = TabletopEnv()
    recorder = _Recorder(load_policy('reference', 'none'))
    episodes = []
    for family, seed in EPISODES:
        recorder.seen = []
        run_episode(env, recorder, family, seed, max_steps=MAX_SIM_STEPS)
        episodes.append((family, seed, list(recorder.seen)))
    return episodes


def save_observations(episodes: list[tuple[str, int, list[Observation]]], path: Path = OBSERVATIONS) -> None:
    """Every observation of ``episodes`` in one compressed archive (no pickled objects)."""
    arrays: dict[str, np.ndarray] = {'episodes': np.array([f'{f}:{s}' for f, s, _ in episodes])}
    for e, (_, _, observations) in enumerate(episodes):
        for t, obs in enumerate(observations):
            key = f'e{e}_t{t}_'
            arrays[key + 'instruction'] = np.array(obs.instruction)
            arrays[key + 'cameras'] = np.array(sorted(obs.images))
            for name, image in obs.images.items():
                arrays[key + 'image_' + name] = image
            for field in ('proprio', 'executed_actions'):
                if getattr(obs, field) is not None:
                    arrays[key + field] = getattr(obs, field)
    np.savez_compressed(path, **arrays)


def load_observations(path: Path = OBSERVATIONS) -> list[tuple[str, int, list[Observation]]]:
    """The episodes written by :func:`save_observations`, in order."""
    with np.load(path, allow_pickle=False) as data:
        episodes = []
        for e, label in enumerate(data['episodes']):
            family, seed = str(label).split(':')
            observations = []
            while f'e{e}_t{len(observations)}_instruction' in data:
                key = f'e{e}_t{len(observations)}_'
                observations.append(Observation(
                    images={str(n): data[key + 'image_' + str(n)] for n in data[key + 'cameras']},
                    instruction=str(data[key + 'instruction']),
                    proprio=data[key + 'proprio'] if key + 'proprio' in data else None,
                    executed_actions=data[key + 'executed_actions'] if key + 'executed_actions' in data else None))
            episodes.append((family, int(seed), observations))
    return episodes


def record_reference(episodes: Optional[list[tuple[str, int, list[Observation]]]] = None) -> dict:
    """Kept sets per step and layer of every registered method replaying the episodes (default: the stored ones)."""
    torch.set_num_threads(1)
    episodes = load_observations() if episodes is None else episodes
    model = load_model('reference')
    out: dict = {'episodes': [], 'methods': available_methods()}
    for family, seed, observations in episodes:
        entry = {'family': family, 'seed': seed, 'steps': len(observations),
                 'observations_sha1': observations_digest(observations), 'methods': {}}
        for name in available_methods():
            policy = reference_policy(model, build_method(name))
            policy.reset()
            entry['methods'][name] = [record_summary(policy.predict(obs).record) for obs in observations]
        out['episodes'].append(entry)
    return out


if __name__ == '__main__':
    rollout = '--rollout' in sys.argv[1:]
    if rollout:
        torch.set_num_threads(1)
        fresh = rollout_observations()
        save_observations(fresh)
        print(f'wrote {OBSERVATIONS}')
    FIXTURE.write_text(json.dumps(record_reference(fresh if rollout else None), indent=1) + '\n')
    print(f'wrote {FIXTURE}')
