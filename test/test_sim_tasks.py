"""Task sampling, vocabulary and success detectors on hand-built states (no physics)."""
import numpy as np
import pytest

from specprune_ros.sim import scene
from specprune_ros.sim.tasks import (EVAL_SEED_START, MAX_STEPS, TASK_FAMILIES, TRAIN_SEED_START, ObjectState,
                                     PlateState, SimState, ZoneState, check_success, sample_task)
from specprune_ros.sim.vocab import COLOURS, SHAPES, VOCABULARY

H = scene.OBJECT_HALF


def _state(target_pos, tcp, gap, linvel=(0, 0, 0), plate_pos=(0.1, 0.1)):
    return SimState(
        objects={'red_cube': ObjectState(pos=np.array(target_pos, float), linvel=np.array(linvel, float)),
                 'blue_cylinder': ObjectState(pos=np.array([-0.1, 0.0, H]))},
        tcp_pos=np.array(tcp, float), finger_gap=gap,
        plates={'green': PlateState(pos=np.array([*plate_pos, scene.PLATE_HALF_HEIGHT])),
                'yellow': PlateState(pos=np.array([-0.1, -0.1, scene.PLATE_HALF_HEIGHT]))},
        zones={s: ZoneState(centre=np.array(c)) for s, c in scene.ZONE_CENTRES.items()})


def _spec(family, **kw):
    spec, _ = sample_task(family, 0)
    from dataclasses import replace
    return replace(spec, target='red_cube', **kw)


def test_pick_success_detector():
    spec = _spec('pick')
    lifted = [0.0, 0.0, H + 0.06]
    assert check_success(_state(lifted, tcp=lifted, gap=2 * H - 0.001), spec)
    # on the table, held
    assert not check_success(_state([0, 0, H], tcp=[0, 0, H], gap=2 * H), spec)
    # high but not between the fingers (e.g. falling, or tossed)
    assert not check_success(_state(lifted, tcp=[0.1, 0, 0.2], gap=2 * H), spec)
    # high and near the tcp but the fingers are open
    assert not check_success(_state(lifted, tcp=lifted, gap=0.08), spec)
    # just below the lift threshold
    low = [0.0, 0.0, H + 0.049]
    assert not check_success(_state(low, tcp=low, gap=2 * H), spec)


def test_place_success_detector():
    spec = _spec('place', plate='green')
    on_plate = [0.1, 0.1, scene.PLATE_TOP + H]
    assert check_success(_state(on_plate, tcp=[0.1, 0.1, 0.12], gap=0.08), spec)
    # released but still falling fast
    assert not check_success(_state(on_plate, tcp=[0.1, 0.1, 0.12], gap=0.08, linvel=(0, 0, -0.3)), spec)
    # on the other (yellow) plate
    other = [-0.1, -0.1, scene.PLATE_TOP + H]
    assert not check_success(_state(other, tcp=[0, 0, 0.2], gap=0.08), spec)
    # next to the plate, on the table
    assert not check_success(_state([0.1, 0.19, H], tcp=[0, 0, 0.2], gap=0.08), spec)
    # above the plate but still held
    assert not check_success(_state(on_plate, tcp=on_plate, gap=2 * H), spec)
    # held 5 cm above the plate
    high = [0.1, 0.1, scene.PLATE_TOP + H + 0.05]
    assert not check_success(_state(high, tcp=[0.1, 0.1, 0.2], gap=0.08), spec)


def test_push_success_detector():
    spec = _spec('push', zone='left')
    cx, cy = scene.ZONE_CENTRES['left']
    assert check_success(_state([cx, cy, H], tcp=[0, 0, 0.2], gap=0.0), spec)
    assert check_success(_state([cx + scene.ZONE_HALF[0] - 0.001, cy - scene.ZONE_HALF[1] + 0.001, H],
                                tcp=[0, 0, 0.2], gap=0.0), spec)
    # in the wrong zone
    rx, ry = scene.ZONE_CENTRES['right']
    assert not check_success(_state([rx, ry, H], tcp=[0, 0, 0.2], gap=0.0), spec)
    # just outside the zone
    assert not check_success(_state([cx, cy - scene.ZONE_HALF[1] - 0.002, H], tcp=[0, 0, 0.2], gap=0.0), spec)
    # carried above the zone, not on the table
    assert not check_success(_state([cx, cy, H + 0.05], tcp=[cx, cy, H + 0.05], gap=2 * H), spec)


@pytest.mark.parametrize('family', TASK_FAMILIES)
def test_sampling_is_deterministic_and_instruction_needed(family):
    for seed in range(20):
        a, la = sample_task(family, seed)
        b, lb = sample_task(family, seed)
        assert a == b and la == lb
        assert a.max_steps == MAX_STEPS[family]
        assert a.target in la.objects and len(la.objects) >= 3          # distractors on the table
        words = a.instruction.split()
        assert set(words) <= set(VOCABULARY)
        colour, shape = a.target.split('_')
        assert colour in words and shape in words
        names = list(la.objects)
        assert len(set(names)) == len(names)
        pts = np.array([v[:2] for v in la.objects.values()])
        dists = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(len(pts))
        assert dists.min() >= 0.0999
        if family == 'place':
            assert a.plate in la.plates and len(la.plates) == 2
        if family == 'push':
            z = np.asarray(scene.ZONE_CENTRES[a.zone])
            start = np.asarray(la.objects[a.target][:2])
            assert np.any(np.abs(start - z) > np.asarray(scene.ZONE_HALF))  # starts outside the zone
    instructions = {sample_task(family, s)[0].instruction for s in range(30)}
    assert len(instructions) > 4


def test_vocabulary_and_seed_ranges():
    assert len(VOCABULARY) == len(set(VOCABULARY))
    assert set(COLOURS) | set(SHAPES) | {'left', 'right'} <= set(VOCABULARY)
    assert TRAIN_SEED_START < EVAL_SEED_START
    with pytest.raises(ValueError):
        sample_task('fly', 0)
