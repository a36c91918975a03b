"""The scripted expert solves every task family on the real simulator (without rendering)."""
import numpy as np
import pytest

from specprune_ros.sim import TASK_FAMILIES, ScriptedExpert, TabletopEnv, run_expert_episode
from specprune_ros.sim.tasks import is_held


@pytest.fixture(scope='module')
def env():
    e = TabletopEnv('pick', seed=0)
    yield e
    e.close()


@pytest.mark.parametrize('family', TASK_FAMILIES)
@pytest.mark.parametrize('noise', [0.0, 0.2])
def test_expert_solves_family(env, family, noise):
    expert = ScriptedExpert(env, noise=noise, rng=np.random.default_rng(42))
    lengths = []
    for seed in (100, 101, 102):
        _, actions, success = run_expert_episode(env, expert, seed=seed, family=family)
        assert success, f'{family} seed {seed} noise {noise} failed in phase {expert.phase}'
        assert actions.shape[1] == 7 and actions.dtype == np.float32
        assert np.all(np.abs(actions) <= 1.0)
        lengths.append(len(actions))
    assert max(lengths) < env.max_steps


def test_pick_is_a_real_grasp(env):
    """After a successful pick the object is supported only by the fingers (friction grasp)."""
    expert = ScriptedExpert(env)
    _, _, success = run_expert_episode(env, expert, seed=7, family='pick')
    assert success
    st = env.sim_state()
    assert is_held(st, env.task.target)
    # keep holding for a second: the object must not slip out
    z0 = st.objects[env.task.target].pos[2]
    for _ in range(10):
        env.step(np.array([0, 0, 0, 0, 0, 0, 1.0]), render=False)
    z1 = env.sim_state().objects[env.task.target].pos[2]
    assert abs(z1 - z0) < 0.01
    # opening the gripper drops it back onto the table
    for _ in range(8):
        env.step(np.array([0, 0, 0, 0, 0, 0, -1.0]), render=False)
    assert env.sim_state().objects[env.task.target].pos[2] < 0.03


def test_expert_is_deterministic(env):
    runs = []
    for _ in range(2):
        expert = ScriptedExpert(env, noise=0.2, rng=np.random.default_rng(5))
        _, actions, _ = run_expert_episode(env, expert, seed=3, family='push')
        runs.append(actions)
    np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.parametrize('family', ['pick', 'place'])
def test_take_over_keeps_a_held_object(env, family):
    """An expert taking over mid-task with the target in the hand finishes without letting go of it."""
    from specprune_ros.sim.expert import continue_expert_episode
    first = ScriptedExpert(env)
    obs = env.reset(seed=11, family=family, render=False)
    while not is_held(env.sim_state(), env.task.target):
        obs, done, _ = env.step(first.act(obs), render=False)
        assert not done
    for _ in range(3):                                        # a little higher, still held
        obs, _, _ = env.step(np.array([0, 0, 0.5, 0, 0, 0, 1.0]), render=False)
    successor = ScriptedExpert(env)
    successor.take_over()
    assert successor.phase in ('lift', 'carry')
    _, actions, success = continue_expert_episode(env, successor, obs)
    assert success
    released = np.flatnonzero(actions[:, 6] < 0)
    if family == 'pick':
        assert released.size == 0                             # never opened the hand
    else:
        assert released.size and released[0] > 3             # opened only over the plate, at the end


def test_take_over_from_a_disturbed_state(env):
    """Random motion first (the hand anywhere, gripper half-way), then the expert still solves the task."""
    from specprune_ros.sim.expert import continue_expert_episode
    rng = np.random.default_rng(3)
    for family in TASK_FAMILIES:
        obs = env.reset(seed=21, family=family, render=False)
        for _ in range(12):
            obs, _, _ = env.step(rng.uniform(-1, 1, 7), render=False)
        expert = ScriptedExpert(env)
        expert.take_over()
        _, _, success = continue_expert_episode(env, expert, obs)
        assert success, family
