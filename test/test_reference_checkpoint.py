"""The committed reference VLA checkpoint: it loads on a fresh machine and acts in the simulator."""
import json
import shutil

import numpy as np
import pytest

from specprune_ros.policy.errors import CheckpointError
from specprune_ros.policy.interface import Observation
from specprune_ros.models.loading import REFERENCE_CHECKPOINT, load_model, load_policy
from specprune_ros.policy.reference_checkpoint import save_checkpoint


def test_reference_checkpoint_is_committed_small_and_described():
    meta = json.loads((REFERENCE_CHECKPOINT / 'config.json').read_text())
    assert meta['architecture'] == 'specprune_ros.ReferenceVLA'
    assert meta['training']['steps_done'] > 0
    assert (REFERENCE_CHECKPOINT / 'model.safetensors').stat().st_size <= 40 * 2 ** 20


def test_reference_policy_acts_deterministically_on_a_sim_observation():
    from specprune_ros.sim import EVAL_SEED_START, TabletopEnv
    observation = TabletopEnv('place', EVAL_SEED_START).reset()
    obs = Observation(images=observation.images, instruction=observation.instruction, proprio=observation.proprio)
    first = load_policy('reference').predict(obs)
    second = load_policy('reference').predict(obs)
    assert first.actions.shape == (8, 7) and first.actions.dtype == np.float32
    assert np.isfinite(first.actions).all() and np.abs(first.actions).max() <= 1.0
    assert np.array_equal(first.actions, second.actions)
    assert first.record.visual_kept_per_layer == [288] * 6


def test_fair_yardstick_checkpoint_loads_as_the_same_architecture_and_acts():
    from pathlib import Path
    from specprune_ros.sim import EVAL_SEED_START, TabletopEnv
    fair = Path(__file__).resolve().parents[1] / 'checkpoints' / 'reference_vla_fair'
    meta = json.loads((fair / 'config.json').read_text())
    shipped = json.loads((REFERENCE_CHECKPOINT / 'config.json').read_text())
    assert meta['config'] == shipped['config']
    assert meta['training']['token_drop_families'] == 'all'
    assert meta['training']['steps_done'] > shipped['training']['steps_done']
    observation = TabletopEnv('pick', EVAL_SEED_START).reset()
    obs = Observation(images=observation.images, instruction=observation.instruction, proprio=observation.proprio)
    fair_actions = load_policy(str(fair)).predict(obs).actions
    shipped_actions = load_policy('reference').predict(obs).actions
    assert fair_actions.shape == (8, 7) and np.isfinite(fair_actions).all()
    assert not np.array_equal(fair_actions, shipped_actions)      # its own weights, not the shipped ones


def _truncate(directory):
    weights = directory / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])


def _hidden_size_string(directory):
    meta = json.loads((directory / 'config.json').read_text())
    meta['config']['hidden_size'] = '64'
    (directory / 'config.json').write_text(json.dumps(meta))


@pytest.mark.parametrize('change, message', [
    (_truncate, r'malformed model\.safetensors \(.*/broken/model\.safetensors\)'),
    (lambda d: (d / 'model.safetensors').write_text('version https://git-lfs.github.com/spec/v1\noid sha256:ab\n'),
     r'malformed model\.safetensors \(.*/broken/model\.safetensors\)'),
    (_hidden_size_string, r'broken: malformed config\.json'),
    (lambda d: (d / 'model.safetensors').unlink(), r'^checkpoint \S+/broken: missing model\.safetensors$'),
])
def test_broken_reference_checkpoints_name_the_file(tmp_path, change, message):
    directory = save_checkpoint(load_model('tiny-random'), tmp_path / 'good')
    broken = tmp_path / 'broken'
    shutil.copytree(directory, broken)
    change(broken)
    with pytest.raises(CheckpointError, match=message):
        load_policy(str(broken))
    assert load_policy(str(directory)).backend is not None
