"""Pure-function tests of the safety filter and the diagnostics summary."""
import numpy as np
import pytest

from specprune_ros.control.runtime_stats import (ERROR, OK, WARN, RollingWindow, RuntimeStats, controller_mode,
                                                 kept_token_ratio)
from specprune_ros.control.safety_filter import ActionUnits, SafetyFilter, SafetyLimits

UNITS = ActionUnits(translation_scale_m=0.02, rotation_scale_rad=0.2, period_s=0.1, action_scale=1.0)
LOOSE = SafetyLimits(max_linear_speed=10, max_angular_speed=100, max_linear_accel=1e6, max_angular_accel=1e6)


def test_velocity_is_delta_over_period():
    command = SafetyFilter(UNITS, LOOSE).command(np.array([1, -0.5, 0, 0, 0, 1, 1.0]), now=0.0)
    np.testing.assert_allclose(command.twist, [0.2, -0.1, 0, 0, 0, 2.0])
    assert command.gripper == 1.0 and not command.holding
    np.testing.assert_allclose(command.executed, [1, -0.5, 0, 0, 0, 1, 1])


def test_action_scale_slows_down_and_executed_reports_it():
    units = ActionUnits(action_scale=0.5)
    command = SafetyFilter(units, LOOSE).command(np.array([1, 0, 0, 0, 0, 0, -1.0]), now=0.0)
    assert command.twist[0] == pytest.approx(0.1)
    assert command.executed[0] == pytest.approx(0.5)


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_actions_hold(bad):
    safety = SafetyFilter(UNITS, LOOSE)
    action = np.zeros(7)
    action[2] = bad
    command = safety.command(action, 0.0)
    assert command.holding and command.gripper is None
    assert np.array_equal(command.twist, np.zeros(6)) and np.isfinite(command.twist).all()
    assert safety.counts['non_finite_actions'] == 1


def test_malformed_action_holds():
    assert SafetyFilter(UNITS, LOOSE).command(np.zeros(5), 0.0).holding


def test_clipping_is_per_axis_and_counted():
    limits = SafetyLimits(max_linear_speed=0.1, max_angular_speed=0.5, max_linear_accel=1e6, max_angular_accel=1e6)
    safety = SafetyFilter(UNITS, limits)
    command = safety.command(np.array([3.0, -1, 0.2, 1, -1, 0, 0.3]), 0.0)
    np.testing.assert_allclose(command.twist, [0.1, -0.1, 0.04, 0.5, -0.5, 0.0])
    assert safety.counts['clipped_normalised'] == 1
    assert safety.counts['clipped_linear_speed'] == 1 and safety.counts['clipped_angular_speed'] == 1


def test_rate_limit_ramps_up_and_holds_stop_at_once():
    limits = SafetyLimits(max_linear_speed=1, max_angular_speed=10, max_linear_accel=1.0, max_angular_accel=100)
    safety = SafetyFilter(UNITS, limits)
    first = safety.command(np.array([1.0, 0, 0, 0, 0, 0, 0]), 0.0)      # from rest, dt = one period
    assert first.twist[0] == pytest.approx(0.1)
    second = safety.command(np.array([1.0, 0, 0, 0, 0, 0, 0]), 0.05)
    assert second.twist[0] == pytest.approx(0.15)
    assert safety.counts['rate_limited'] == 2
    hold = safety.hold('stale', 0.1)
    assert np.array_equal(hold.twist, np.zeros(6)) and hold.hold_reason == 'stale'
    again = safety.command(np.array([1.0, 0, 0, 0, 0, 0, 0]), 0.2)
    assert again.twist[0] == pytest.approx(0.1)                         # ramps from zero again


def test_gripper_mapping():
    limits = SafetyLimits(gripper_binarize=True, gripper_open_value=0.08, gripper_closed_value=0.0)
    safety = SafetyFilter(UNITS, limits)
    assert safety.command(np.array([0, 0, 0, 0, 0, 0, 0.2]), 0.0).gripper == pytest.approx(0.0)
    assert safety.command(np.array([0, 0, 0, 0, 0, 0, -0.2]), 0.1).gripper == pytest.approx(0.08)
    analog = SafetyFilter(UNITS, SafetyLimits(gripper_binarize=False))
    assert analog.command(np.array([0, 0, 0, 0, 0, 0, 0.5]), 0.0).gripper == pytest.approx(0.5)


def test_random_actions_never_leave_the_limits():
    rng = np.random.default_rng(1)
    limits = SafetyLimits(max_linear_speed=0.2, max_angular_speed=1.0, max_linear_accel=2.0, max_angular_accel=20)
    safety = SafetyFilter(UNITS, limits)
    previous, now = np.zeros(6), 0.0
    for _ in range(500):
        action = rng.normal(0, 3, 7)
        action[rng.integers(7)] = rng.choice([np.nan, np.inf, 0.0, 5.0])
        now += 0.1
        command = safety.command(action, now)
        assert np.isfinite(command.twist).all()
        assert (np.abs(command.twist[:3]) <= 0.2 + 1e-12).all() and (np.abs(command.twist[3:]) <= 1.0 + 1e-12).all()
        if not command.holding:
            change = np.abs(command.twist - previous)
            assert (change[:3] <= 2.0 * 0.1 + 1e-9).all() and (change[3:] <= 20 * 0.1 + 1e-9).all()
        previous = command.twist


def test_rolling_window_percentiles():
    window = RollingWindow(3)
    assert window.percentile(50) is None
    for value in (1.0, 2.0, 3.0, 4.0, float('nan')):
        window.add(value)
    assert len(window) == 3 and window.percentile(50) == 3.0 and window.mean() == 3.0


def test_stats_summary_and_levels():
    stats = RuntimeStats(window=10)
    stats.hold_reason = ''
    assert stats.level() == OK
    stats.model_latency.add(0.02)
    stats.count_input_error('image_encoding', 'bad encoding')
    stats.count_input_error('image_encoding', 'bad encoding')
    stats.events['temporal_resets'] += 1
    rows = dict(stats.key_values())
    assert rows['model latency p50 ms'] == '20.00'
    assert rows['input errors'] == '2' and rows['input errors: image_encoding'] == '2'
    assert rows['temporal resets'] == '1'
    stats.hold_reason = 'camera stale'
    assert stats.level() == WARN
    stats.last_inference_error = 'boom'
    assert stats.level() == ERROR


def test_kept_ratio_and_mode_helpers():
    class Layout:
        num_visual = 200

    class Record:
        layout = Layout()
        mean_visual_kept = 50.0

    assert kept_token_ratio(Record()) == 0.25
    assert kept_token_ratio(None) is None
    assert controller_mode({}, {'mode': 'fine'}) == 'fine'
    assert controller_mode({'controller_mode': 'coarse'}, {}) == 'coarse'
    assert controller_mode({}, {}) == 'n/a'
