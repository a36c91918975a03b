"""SpecPrune's action-aware controller on synthetic action sequences: switches exactly at the thresholds."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specprune_ros.pruning.action_controller import (ActionController, ControllerConfig, ControllerOutput,
                                                     action_magnitudes)


def act(dx=0.0, dy=0.0, dz=0.0, rx=0.0, ry=0.0, rz=0.0, grip=-1.0):
    return np.array([dx, dy, dz, rx, ry, rz, grip])


def fast():
    return act(dx=0.5)          # |dxyz| = 0.5, |dxy| = 0.5 -> stays coarse


def test_magnitudes():
    v, vxy, dz, vrot = action_magnitudes(act(0.3, 0.4, -0.2, 0.0, 0.3, 0.4))
    assert v == pytest.approx(np.sqrt(0.29))
    assert vxy == pytest.approx(0.5) and dz == -0.2 and vrot == pytest.approx(0.5)


@pytest.mark.parametrize('speed, expected', [(0.399, 'fine'), (0.4, 'coarse'), (0.401, 'coarse')])
def test_enter_fine_speed_threshold(speed, expected):
    c = ActionController()
    assert c.update(np.stack([act(dx=speed)])).mode == expected


@pytest.mark.parametrize('dxy, dz, drot, expected', [
    (0.099, 0.099, 0.199, 'fine'),   # small translation and rotation
    (0.1, 0.0, 0.0, 'fine'),          # |dxyz| = 0.1 < 0.4 -> fine through the speed rule
])
def test_enter_fine_small_motion(dxy, dz, drot, expected):
    c = ActionController()
    assert c.update(np.stack([act(dx=dxy, dz=dz, rx=drot)])).mode == expected


@pytest.mark.parametrize('dz, drot, expected', [
    (-0.5, 0.0, 'fine'),     # fast descent: |dxyz| = 0.5 but |dxy| < 0.1, dz < 0.1, rot < 0.2
    (-0.5, 0.199, 'fine'),
    (-0.5, 0.2, 'coarse'),   # rotation at the threshold
    (0.5, 0.0, 'coarse'),    # ascending fast: dz >= 0.1
])
def test_enter_fine_second_rule(dz, drot, expected):
    c = ActionController()
    assert c.update(np.stack([act(dx=0.05, dz=dz, rx=drot)])).mode == expected


def test_second_rule_xy_threshold():
    c = ActionController()
    assert c.update(np.stack([act(dx=0.0999, dz=-0.5)])).mode == 'fine'
    c = ActionController()
    assert c.update(np.stack([act(dx=0.1, dz=-0.5)])).mode == 'coarse'


@pytest.mark.parametrize('dz, expected', [(0.2, 'fine'), (0.2001, 'coarse')])
def test_leave_fine_on_rising(dz, expected):
    c = ActionController()
    c.update(np.stack([act(dx=0.1)]))
    assert c.mode == 'fine'
    # the leaving rule applies whatever the queue: the rising action comes first, a fast one (which neither
    # enters nor leaves fine mode) after it
    out = c.update(np.stack([act(dz=dz), fast()]))
    assert out.mode == expected


def test_leave_fine_on_rotation_only_when_queue_empty():
    c = ActionController()
    c.update(np.stack([act(dx=0.1)]))
    # rotation > 0.3 with actions still queued (not the last one): stays fine
    out = c.update(np.stack([act(rx=0.31), act(dx=0.01)]))
    assert out.mode == 'fine'
    # same rotation as the last executed action (queue empty): coarse
    out = c.update(np.stack([act(dx=0.01), act(rx=0.31)]))
    assert out.mode == 'coarse' and out.switched
    # exactly at the threshold: stays fine
    c2 = ActionController()
    c2.update(np.stack([act(dx=0.1)]))
    assert c2.update(np.stack([act(rx=0.3)])).mode == 'fine'
    # queue not empty at the end (the caller says so): stays fine
    c3 = ActionController()
    c3.update(np.stack([act(dx=0.1)]))
    assert c3.update(np.stack([act(rx=0.31)]), queue_empty_at_end=False).mode == 'fine'


def test_hysteresis_sequence():
    c = ActionController()
    modes = [c.update(np.stack([a])).mode for a in [fast(), act(dx=0.3), fast(), act(dz=0.15), act(dz=0.25), fast()]]
    # fast: coarse; slow: fine; fast again: stays fine (no leave rule hit); dz 0.15: fine; dz 0.25: coarse
    assert modes == ['coarse', 'fine', 'fine', 'fine', 'coarse', 'coarse']


def test_replan_requested_when_entering_fine_with_queue():
    c = ActionController()
    out = c.update(np.stack([act(dx=0.1), fast(), fast()]))
    assert out.mode == 'fine' and out.replan_requested
    c = ActionController()
    out = c.update(np.stack([fast(), fast(), act(dx=0.1)]))
    assert out.mode == 'fine' and not out.replan_requested


def test_paper_variant_is_stateless():
    c = ActionController(ControllerConfig(variant='paper'))
    assert c.update(np.stack([act(dx=0.1, dz=-0.1)])).mode == 'fine'
    assert c.update(np.stack([act(dx=0.1, dz=0.01)])).mode == 'coarse'      # rising: coarse
    assert c.update(np.stack([act(dx=0.1, dz=0.0)])).mode == 'fine'          # dz <= 0
    assert c.update(np.stack([act(dx=0.1, rx=0.2)])).mode == 'coarse'
    assert c.update(np.stack([act(dx=0.4)])).mode == 'coarse'


def test_warmup_and_reset_and_empty_input():
    c = ActionController(ControllerConfig(warmup_actions=2))
    assert c.update(np.stack([act(dx=0.1), act(dx=0.1)])).mode == 'coarse'
    assert c.update(np.stack([act(dx=0.1)])).mode == 'fine'
    c.reset()
    assert c.mode == 'coarse' and c.actions_seen == 0
    out = c.update(None)
    assert out.mode == 'coarse' and out.speed == 0.0


def test_k_base_scaling():
    cfg = ControllerConfig()
    assert cfg.k_fraction('fine') == pytest.approx(40 / 256)
    out = ControllerOutput(mode='fine', k_fraction=cfg.k_fraction('fine'), speed=0, replan_requested=False,
                           switched=False)
    assert out.k_base(256, 2) == [40, 40]
    assert out.k_base(144, 2) == [23, 23]                    # 22.5 rounds half up
    assert out.k_base(144, 2, camera_scale=(1.0, 0.75)) == [23, 17]
    coarse = ControllerOutput(mode='coarse', k_fraction=cfg.k_fraction('coarse'), speed=0, replan_requested=False,
                              switched=False)
    assert coarse.k_base(144, 1) == [14] and coarse.k_base(256, 1) == [24]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.lists(st.floats(-1, 1, allow_nan=False), min_size=7, max_size=7), min_size=1, max_size=10))
def test_speed_is_norm_of_summed_translation(rows):
    arr = np.array(rows)
    out = ActionController().update(arr)
    assert out.speed == pytest.approx(float(np.linalg.norm(arr[:, :3].sum(0))))
    assert out.mode in ('coarse', 'fine')
