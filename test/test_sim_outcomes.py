"""Failure-mode names (``sim/outcomes.py``) on hand-built trajectories, and on real simulator episodes."""
from dataclasses import replace

import numpy as np
import pytest

from specprune_ros.sim import scene
from specprune_ros.sim.expert import PUSH_CONTACT
from specprune_ros.sim.outcomes import OUTCOMES, OutcomeTracker, count_outcomes
from specprune_ros.sim.tasks import ObjectState, PlateState, SimState, ZoneState, sample_task

H = scene.OBJECT_HALF
START = {'red_cube': (0.0, 0.0), 'blue_cylinder': (-0.1, 0.0)}
HIGH = H + 0.06
CLOSED, OPEN = 2 * H - 0.001, 0.08


def state(tcp, gap=OPEN, red=(0.0, 0.0, H), blue=(-0.1, 0.0, H)) -> SimState:
    return SimState(objects={'red_cube': ObjectState(pos=np.array(red, float)),
                             'blue_cylinder': ObjectState(pos=np.array(blue, float))},
                    tcp_pos=np.array(tcp, float), finger_gap=gap,
                    plates={'green': PlateState(pos=np.array([0.1, 0.1, scene.PLATE_HALF_HEIGHT]))},
                    zones={s: ZoneState(centre=np.array(c)) for s, c in scene.ZONE_CENTRES.items()})


def ending(family: str, trajectory: list[SimState], success: bool = False) -> str:
    spec = replace(sample_task(family, 0)[0], target='red_cube', plate='green', zone='left')
    tracker = OutcomeTracker.begin(spec, state(tcp=(0.2, 0.2, 0.2)))
    for s in trajectory:
        tracker.update(s)
    return tracker.outcome(trajectory[-1], success)


def test_pick_endings():
    far = state(tcp=(0.2, 0.2, 0.2))
    above = state(tcp=(0.01, 0.0, H))
    held_high = state(tcp=(0.0, 0.0, HIGH), gap=CLOSED, red=(0.0, 0.0, HIGH))
    held_low = state(tcp=(0.0, 0.0, H + 0.01), gap=CLOSED, red=(0.0, 0.0, H + 0.01))
    assert ending('pick', [far, held_high], success=True) == 'success'
    assert ending('pick', [far, far]) == 'not_reached'
    assert ending('pick', [far, above, state(tcp=(0.01, 0.0, 0.1))]) == 'missed_grasp'
    assert ending('pick', [above, held_high, state(tcp=(0.0, 0.0, 0.15), red=(0.02, 0.01, H))]) == 'dropped'
    assert ending('pick', [above, held_low]) == 'not_lifted'
    # the blue cylinder lifted between the fingers instead
    blue_held = state(tcp=(-0.1, 0.0, HIGH), gap=CLOSED, blue=(-0.1, 0.0, HIGH))
    assert ending('pick', [far, blue_held, state(tcp=(0.2, 0.2, 0.2), blue=(-0.1, 0.0, H))]) == 'wrong_object'
    # fingers closed just above the blue one without lifting it: not a wrong-object grasp
    assert ending('pick', [state(tcp=(-0.1, 0.0, H + 0.01), gap=CLOSED)]) == 'not_reached'


def test_place_and_push_endings():
    above = state(tcp=(0.0, 0.0, H))
    carried = state(tcp=(0.05, 0.05, HIGH), gap=CLOSED, red=(0.05, 0.05, HIGH))
    assert ending('place', [above, carried]) == 'not_released'
    assert ending('place', [above, carried, state(tcp=(0.2, 0.0, 0.15), red=(0.2, 0.0, H))]) == 'misplaced'
    # push: the target moved but not into the zone; another object moved while the target never did
    assert ending('push', [above, state(tcp=(0.0, 0.1, H), red=(0.0, 0.08, H))]) == 'misplaced'
    assert ending('push', [state(tcp=(-0.1, 0.05, H), blue=(-0.1, 0.06, H))]) == 'wrong_object'
    assert ending('push', [above, above]) == 'not_pushed'
    # pressing from behind at the fingers' contact distance without moving the target: reached, not pushed
    assert ending('push', [state(tcp=(PUSH_CONTACT, 0.0, H)), state(tcp=(PUSH_CONTACT, 0.0, H))]) == 'not_pushed'
    assert ending('push', [state(tcp=(PUSH_CONTACT + 0.03, 0.0, H))]) == 'not_reached'


def test_counts_follow_the_outcome_order():
    assert count_outcomes(['dropped', 'success', 'dropped']) == {'success': 1, 'dropped': 2}
    assert list(count_outcomes(list(reversed(OUTCOMES)))) == list(OUTCOMES)


@pytest.mark.parametrize('family', ['pick', 'push'])
def test_real_episodes_expert_succeeds_and_a_still_hand_never_reaches(family):
    from specprune_ros.evaluation.closed_loop import run_episode
    from specprune_ros.sim import ScriptedExpert, TabletopEnv

    class Expert:
        def __init__(self, env):
            self.env, self.expert = env, None

        def reset(self):
            self.expert = None

        def predict(self, observation):
            from specprune_ros.policy.interface import PolicyOutput
            self.expert = self.expert or ScriptedExpert(self.env)
            return PolicyOutput(actions=np.stack([self.expert.act(observation)]), latency_s=0.0)

    class Still:
        def reset(self):
            pass

        def predict(self, observation):
            from specprune_ros.policy.interface import PolicyOutput
            return PolicyOutput(actions=np.zeros((8, 7), np.float32), latency_s=0.0)

    env = TabletopEnv(image_size=32)
    try:
        done = run_episode(env, Expert(env), family, 1_000_003)
        assert done.success and done.outcome == 'success'
        still = run_episode(env, Still(), family, 1_000_003)
        assert not still.success and still.outcome == 'not_reached' and still.steps == env.max_steps
    finally:
        env.close()
