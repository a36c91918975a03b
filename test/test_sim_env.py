"""TabletopEnv on the real simulator: determinism, images, action handling, proprio."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specprune_ros.sim import (ACTION_DIM, CAMERA_NAMES, PROPRIO_DIM, PROPRIO_LAYOUT, ROTATION_SCALE_RAD,
                               TASK_FAMILIES, TRANSLATION_SCALE_M, WORKSPACE_HIGH, WORKSPACE_LOW, SimObservation,
                               TabletopEnv)

ACTIONS = np.array([[0.5, -0.3, -0.4, 0, 0, 0.5, -1]] * 3 + [[0.2, 0.4, -1.0, 0, 0, -0.3, 1]] * 3,
                   dtype=np.float32)


@pytest.fixture(scope='module')
def env():
    e = TabletopEnv('pick', seed=3, image_size=96)
    yield e
    e.close()


def _rollout(env, family, seed):
    obs = env.reset(seed=seed, family=family)
    frames = [obs.images]
    for a in ACTIONS:
        obs, _, _ = env.step(a)
        frames.append(obs.images)
    return frames, env.state_dict()


def test_same_seed_same_images_and_state(env):
    other = TabletopEnv('place', seed=11, image_size=96)
    try:
        f1, s1 = _rollout(env, 'place', 11)
        f2, s2 = _rollout(other, 'place', 11)
    finally:
        other.close()
    for a, b in zip(f1, f2):
        for cam in CAMERA_NAMES:
            np.testing.assert_array_equal(a[cam], b[cam])
    for key in ('qpos', 'qvel', 'mocap_pos'):
        np.testing.assert_array_equal(s1[key], s2[key])
    assert s1['instruction'] == s2['instruction']
    # resetting the same env to the same seed reproduces it too
    f3, s3 = _rollout(env, 'place', 11)
    np.testing.assert_array_equal(f3[-1]['agentview'], f1[-1]['agentview'])
    np.testing.assert_array_equal(s3['qpos'], s1['qpos'])


def test_different_seeds_differ(env):
    a = env.reset(seed=1, family='pick')
    qa = env.state_dict()['qpos']
    b = env.reset(seed=2, family='pick')
    qb = env.state_dict()['qpos']
    assert not np.array_equal(qa, qb)
    assert not np.array_equal(a.images['agentview'], b.images['agentview'])
    c = env.reset(seed=1, family='push')                        # same seed, other family: other layout
    assert not np.array_equal(env.state_dict()['qpos'], qa) or c.instruction != a.instruction


def test_episodes_start_from_the_seeded_varied_hand_pose(env):
    starts = []
    for seed in range(6):
        obs = env.reset(seed=seed, family='place')
        x, y, z, yaw = env.layout.hand
        np.testing.assert_allclose(obs.proprio[:2], (x, y), atol=2e-3)         # tcp is below the hand origin
        np.testing.assert_allclose(np.arctan2(obs.proprio[3], obs.proprio[4]), yaw, atol=1e-2)
        assert WORKSPACE_LOW[2] + 0.1 < obs.proprio[2] < WORKSPACE_HIGH[2]      # starts above the objects
        starts.append(obs.proprio[:3].copy())
    assert np.ptp(np.array(starts)[:, :2], axis=0).min() > 0.03                # the start really varies
    again = env.reset(seed=2, family='place')
    np.testing.assert_array_equal(again.proprio, env.reset(seed=2, family='place').proprio)
    still = np.zeros(ACTION_DIM, np.float32)
    still[-1] = -1.0                                                            # open gripper, no motion
    moved, _, _ = env.step(still)
    np.testing.assert_allclose(moved.proprio[:5], again.proprio[:5], atol=2e-3)  # a zero action holds the start


@pytest.mark.parametrize('family', TASK_FAMILIES)
def test_observation_shapes_and_images_not_blank(env, family):
    obs = env.reset(seed=5, family=family)
    assert isinstance(obs, SimObservation)
    assert set(obs.images) == set(CAMERA_NAMES)
    for cam, img in obs.images.items():
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8
        assert img.std() > 10, f'{cam} looks blank'
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50
    assert obs.proprio.shape == (PROPRIO_DIM,) and obs.proprio.dtype == np.float32
    assert len(PROPRIO_LAYOUT) == PROPRIO_DIM
    assert obs.instruction == env.instruction and obs.instruction.split()[0] in ('pick', 'put', 'push')
    assert env.family == family and env.max_steps >= 100 and not env.success()


def test_other_image_size():
    e = TabletopEnv('push', seed=0, image_size=64, supersample=1)
    try:
        obs = e.reset()
        assert obs.images['wrist'].shape == (64, 64, 3)
    finally:
        e.close()


def test_action_scales_and_clipping(env):
    env.reset(seed=7, family='pick')
    p0 = env.proprio().copy()
    obs, _, _ = env.step(np.array([1, 0, 0, 0, 0, 0, -1]))
    assert obs.proprio[0] - p0[0] == pytest.approx(TRANSLATION_SCALE_M, abs=2e-3)
    # values beyond +-1 are clipped to the same motion
    obs2, _, _ = env.step(np.array([50, 0, 0, 0, 0, 0, -1]), render=False)
    assert obs2.proprio[0] - obs.proprio[0] == pytest.approx(TRANSLATION_SCALE_M, abs=2e-3)
    assert obs2.images == {}                                   # render=False skips rendering
    yaw0 = np.arctan2(obs2.proprio[3], obs2.proprio[4])
    obs3, _, _ = env.step(np.array([0, 0, 0, 0, 0, 1, -1]))
    yaw1 = np.arctan2(obs3.proprio[3], obs3.proprio[4])
    assert yaw1 - yaw0 == pytest.approx(ROTATION_SCALE_RAD, abs=0.02)
    # roll / pitch are accepted and ignored; the gripper closes on +1
    obs4, _, _ = env.step(np.array([0, 0, 0, 1, -1, 0, 1]))
    assert obs4.proprio[5] < 0.02


def test_workspace_limits(env):
    env.reset(seed=7, family='pick')
    for _ in range(10):
        obs, _, _ = env.step(np.array([0, 0, 1, 0, 0, 0, -1]), render=False)
    assert obs.proprio[2] <= WORKSPACE_HIGH[2] + 0.005


@pytest.mark.parametrize('bad', [np.array([np.nan, 0, 0, 0, 0, 0, 0]), np.array([0, 0, 0, 0, 0, np.inf, 0]),
                                 np.zeros(6), np.zeros((2, 7))])
def test_bad_actions_rejected(env, bad):
    env.reset(seed=0, family='pick')
    step = env.step_count
    with pytest.raises(ValueError):
        env.step(bad)
    assert env.step_count == step


_action = st.lists(st.floats(-3.0, 3.0, allow_nan=False), min_size=7, max_size=7)


@settings(max_examples=15, deadline=None)
@given(actions=st.lists(_action, min_size=1, max_size=6), seed=st.integers(0, 50))
def test_random_actions_keep_gripper_in_workspace(env, actions, seed):
    env.reset(seed=seed, family='place', render=False)
    for a in actions:
        obs, _, _ = env.step(np.asarray(a), render=False)
        assert np.all(np.isfinite(obs.proprio))
        assert np.all(obs.proprio[:3] >= WORKSPACE_LOW - 0.01) and np.all(obs.proprio[:3] <= WORKSPACE_HIGH + 0.01)
        assert 0.0 <= obs.proprio[5] <= 0.081


def test_step_limit_ends_episode(env):
    env.reset(seed=0, family='pick')
    done = False
    for t in range(env.max_steps):
        _, done, success = env.step(np.zeros(ACTION_DIM), render=False)
        if done:
            break
    assert done and not success and env.step_count == env.max_steps


def test_matches_policy_action_spec():
    interface = pytest.importorskip('specprune_ros.policy.interface')
    spec = interface.ActionSpec()
    assert spec.action_dim == ACTION_DIM
    assert spec.translation_scale_m == TRANSLATION_SCALE_M
    assert spec.rotation_scale_rad == ROTATION_SCALE_RAD
    assert len(interface.ACTION_LABELS) == ACTION_DIM
