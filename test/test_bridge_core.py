"""The ROS-free core of the sim bridge.

Command <-> action conversion, the step-synchronous tick gate, the real-time command timeline, episode bookkeeping and
summaries, settings and the sim launch configuration.
"""
from __future__ import annotations

import ast
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from specprune_ros.bridge.conversions import (CommandUnits, action_to_twist, aligned_start_ns, command_to_action,
                                              down_facing_quaternion, finger_joint_positions, gripper_action_to_value,
                                              gripper_value_to_action, twist_to_action)
from specprune_ros.bridge.episodes import (EpisodeLog, EpisodeSpec, episode_plan, markdown_summary, mean_abs_jerk,
                                           summarize_outcomes, write_summary)
from specprune_ros.bridge.realtime import CommandTimeline
from specprune_ros.bridge.settings import BridgeSettings
from specprune_ros.bridge.sync_gate import TickGate
from specprune_ros.codecs.proprio import proprio_vector
from specprune_ros.control.safety_filter import ActionUnits, SafetyFilter, SafetyLimits
from specprune_ros.ros.sim_runner import ManagedProcess

ROOT = Path(__file__).resolve().parents[1]
MS = 1_000_000
PERIOD_NS = 100 * MS


# --- conversions ----------------------------------------------------------------------------------------------
def test_twist_action_round_trip_and_the_policy_nodes_scaling():
    rng = np.random.default_rng(0)
    units = CommandUnits()
    node_filter = SafetyFilter(ActionUnits(), SafetyLimits(max_linear_accel=1000.0, max_angular_accel=10000.0,
                                                           gripper_binarize=False))
    for i in range(200):
        action = rng.uniform(-1, 1, 7)
        twist = action_to_twist(action, units)
        np.testing.assert_allclose(twist_to_action(twist, units), action[:6], rtol=0, atol=1e-12)
        # what the policy node publishes for this action comes back as the same action
        command = node_filter.command(action, now=0.1 * (i + 1))
        back = command_to_action(command.twist, gripper_value_to_action(command.gripper, units), units)
        np.testing.assert_allclose(back, action, rtol=0, atol=1e-7)


def test_a_float32_policy_action_comes_back_bit_exact():
    """The simulator must apply exactly what the policy emitted (float32), or ROS and harness runs drift apart."""
    rng = np.random.default_rng(1)
    units = CommandUnits()
    inexact = 0
    for _ in range(500):
        action = rng.uniform(-1, 1, 7).astype(np.float32)
        twist = action_to_twist(action, units)
        inexact += int(np.any(twist_to_action(twist, units) != action[:6]))   # plain float64 round trip
        back = command_to_action(twist, gripper_value_to_action(gripper_action_to_value(action[6], units), units),
                                 units)
        assert np.array_equal(back, action.astype(np.float64))
    assert inexact > 0   # the float64 round trip alone is not exact: this is what the float32 step fixes


def test_gripper_values_map_onto_minus_one_plus_one():
    units = CommandUnits(gripper_open_value=0.04, gripper_closed_value=0.0)
    assert gripper_value_to_action(0.04, units) == pytest.approx(-1.0)
    assert gripper_value_to_action(0.0, units) == pytest.approx(1.0)
    assert gripper_value_to_action(0.02, units) == pytest.approx(0.0)
    assert gripper_value_to_action(1.0, units) == -1.0 == gripper_value_to_action(-5.0, CommandUnits())  # clipped
    assert gripper_value_to_action(float('nan'), units) == -1.0
    for a in (-1.0, -0.3, 0.0, 0.7, 1.0):
        assert gripper_value_to_action(gripper_action_to_value(a, units), units) == pytest.approx(a)


def test_non_finite_twists_never_move_the_robot():
    action = twist_to_action([float('nan'), 0.1, float('inf'), 0.0, 0.0, 1.0])
    assert np.isfinite(action).all() and action[0] == 0.0 and action[2] == 0.0
    with pytest.raises(ValueError):
        twist_to_action([0.0] * 5)


@pytest.mark.parametrize('yaw', [-1.5, -0.4, 0.0, 0.3, 1.57])
def test_published_pose_and_fingers_give_the_simulators_proprio(yaw):
    gap = 0.0613
    proprio = proprio_vector((0.1, -0.2, 0.25), down_facing_quaternion(yaw), sum(finger_joint_positions(gap)))
    expected = np.array([0.1, -0.2, 0.25, math.sin(yaw), math.cos(yaw), gap], dtype=np.float32)
    np.testing.assert_allclose(proprio, expected, atol=1e-7)
    x, y, z, w = down_facing_quaternion(yaw)
    assert abs(math.sqrt(x * x + y * y + z * z + w * w) - 1.0) < 1e-12
    # the tool z axis points down: rotating (0, 0, 1) gives (0, 0, -1)
    assert 1.0 - 2.0 * (x * x + y * y) == pytest.approx(-1.0)


def test_sim_time_starts_in_phase_with_the_control_period():
    assert aligned_start_ns(1_234_567_891, PERIOD_NS) == 1_200_000_000
    assert aligned_start_ns(5 * PERIOD_NS, PERIOD_NS) == 5 * PERIOD_NS


# --- step-synchronous gate ------------------------------------------------------------------------------------
def gate_at(tick: int, gate: TickGate, now: float = 0.0) -> tuple[int, bool]:
    stamp = 10_000 * MS + tick * PERIOD_NS
    return stamp, gate.begin_tick(stamp, now)


def test_gate_non_inference_tick_is_answered_by_the_timer_twist_and_its_gripper():
    gate = TickGate(replan_every_steps=8, period_ns=PERIOD_NS)
    gate.begin_episode()
    stamp, expected = gate_at(0, gate)
    assert expected                                   # the first tick of an episode always infers
    gate.on_twist(stamp, np.zeros(6), 0.0)            # timer: chunk exhausted -> hold
    gate.on_chunk(stamp, 0.01)
    assert gate.status(0.01) == 'waiting'             # the chunk's own command is still to come
    gate.on_twist(stamp, [0.1, 0, 0, 0, 0, 0.5], 0.02)
    assert gate.status(0.02) == 'waiting'             # ... with its gripper command
    gate.on_gripper(0.7, 0.03)
    assert gate.status(0.03) == 'complete'
    answer = gate.answer('complete')
    np.testing.assert_array_equal(answer.twist, [0.1, 0, 0, 0, 0, 0.5])
    assert answer.gripper == 0.7 and answer.inference and answer.twists == 2
    stamp, expected = gate_at(1, gate)
    assert not expected
    gate.on_twist(stamp, [0.05, 0, 0, 0, 0, 0], 1.0)
    assert gate.status(1.0) == 'waiting'
    gate.on_gripper(0.7, 1.0)
    assert gate.status(1.0) == 'complete'
    assert gate.answer('complete').twists == 1


def test_gate_mirrors_the_nodes_replan_rule_and_counts_surprises():
    gate = TickGate(replan_every_steps=3, period_ns=PERIOD_NS)
    gate.begin_episode()
    expectations = []
    for tick in range(7):
        stamp, expected = gate_at(tick, gate)
        expectations.append(expected)
        if expected:
            gate.on_chunk(stamp, 0.0)
        gate.on_twist(stamp, np.zeros(6), 0.0)
        gate.answer('settled')
    assert expectations == [True, False, False, True, False, False, True]
    stamp, _ = gate_at(7, gate)
    gate.on_twist(stamp - PERIOD_NS, np.ones(6), 0.0)    # a late answer to the previous tick
    gate.on_twist(stamp + PERIOD_NS, np.ones(6), 0.0)    # a stamp from the future
    gate.on_chunk(stamp, 0.0)                            # an inference nobody expected
    counters = gate.counters
    assert (counters.late_commands, counters.future_commands, counters.extra_inferences) == (1, 1, 1)
    assert gate.status(0.0) == 'waiting'


def test_gate_settles_after_quiet_and_never_without_a_twist():
    gate = TickGate(replan_every_steps=8, period_ns=PERIOD_NS, settle_s=0.5)
    gate.begin_episode()
    stamp, _ = gate_at(0, gate, now=0.0)
    assert gate.status(10.0) == 'waiting'                  # nothing at all: wait (the bridge re-sends)
    gate.on_twist(stamp, np.zeros(6), 0.0)
    assert gate.status(10.0) == 'waiting'                  # expected inference, no chunk: keep waiting
    gate.on_chunk(stamp, 1.0)
    assert gate.status(1.2) == 'waiting' and gate.status(1.6) == 'settled'
    assert gate.wait(0.01, clock=lambda: 2.0) == 'settled'
    answer = gate.answer('settled')
    assert not answer.twist.any() and gate.counters.settled_ticks == 1
    stamp, _ = gate_at(1, gate)
    assert gate.wait(0.01) == 'waiting'
    assert gate.answer('timeout').twists == 0 and gate.counters.timeouts == 1
    gate_at(2, gate)
    assert not gate.wait_first_twist(0.01)          # the node's timer did not answer the clock


def test_gate_timeout_never_applies_a_partial_answer():
    """A tick given up on is a zero twist with no gripper command, whatever part of the answer came."""
    gate = TickGate(replan_every_steps=8, period_ns=PERIOD_NS)
    gate.begin_episode()
    stamp, _ = gate_at(0, gate)
    gate.on_twist(stamp, [0.1, 0, 0, 0, 0, 0], 0.0)       # the new chunk's first command, but no chunk
    gate.on_gripper(1.0, 0.0)
    answer = gate.answer('timeout')
    assert not answer.twist.any() and answer.gripper is None and answer.twists == 1 and answer.how == 'timeout'


def test_gate_stop_ends_every_wait_at_once():
    gate = TickGate(replan_every_steps=8, period_ns=PERIOD_NS)
    gate.begin_episode()
    gate_at(0, gate)
    results = []
    waiter = threading.Thread(target=lambda: results.append((gate.wait_first_twist(300.0), gate.wait(300.0))),
                              daemon=True)
    waiter.start()
    gate.stop()
    waiter.join(30.0)
    assert not waiter.is_alive() and results == [(True, 'waiting')] and gate.stopped


# --- real-time command timeline -------------------------------------------------------------------------------
def test_timeline_averages_the_commands_in_effect_over_a_period():
    timeline = CommandTimeline(command_timeout_ns=150 * MS)
    timeline.put_twist(0, [0.1, 0, 0, 0, 0, 0])
    period = timeline.period_command(0, PERIOD_NS)
    np.testing.assert_allclose(period.twist[0], 0.1)
    assert period.stale_fraction == 0.0 and period.commands == 1
    timeline.put_twist(130 * MS, [0.2, 0, 0, 0, 0, 0])   # arrives 30 ms into the second period
    period = timeline.period_command(PERIOD_NS, 2 * PERIOD_NS)
    np.testing.assert_allclose(period.twist[0], 0.3 * 0.1 + 0.7 * 0.2)
    # the last command expires at 130 + 150 = 280 ms: the third period is 80% fresh, then the robot stops
    period = timeline.period_command(2 * PERIOD_NS, 3 * PERIOD_NS)
    np.testing.assert_allclose(period.twist[0], 0.8 * 0.2)
    assert period.stale_fraction == pytest.approx(0.2)
    period = timeline.period_command(3 * PERIOD_NS, 4 * PERIOD_NS)
    assert not period.twist.any() and period.stale_fraction == 1.0
    timeline.put_gripper(1.0)
    assert timeline.period_command(4 * PERIOD_NS, 5 * PERIOD_NS).gripper == 1.0
    timeline.clear()
    assert timeline.period_command(0, PERIOD_NS).stale_fraction == 1.0
    with pytest.raises(ValueError):
        timeline.period_command(5, 5)


# --- episodes and summaries -----------------------------------------------------------------------------------
def test_episode_plan_matches_the_harness_job_order():
    plan = episode_plan(['pick', 'place'], 2, 1_000_000)
    assert plan == [EpisodeSpec('pick', 1_000_000), EpisodeSpec('place', 1_000_000),
                    EpisodeSpec('pick', 1_000_001), EpisodeSpec('place', 1_000_001)]
    assert episode_plan(['push'], 0, 5) == []


def test_jerk_is_zero_for_constant_acceleration_and_measures_stop_and_go():
    t = np.arange(10)[:, None] * 0.1
    ramp = np.hstack([0.1 * t, np.zeros_like(t), np.zeros_like(t)])
    assert mean_abs_jerk(ramp, 0.1) == pytest.approx(0.0, abs=1e-9)
    stop_go = np.array([[0.1, 0, 0], [0, 0, 0], [0.1, 0, 0], [0, 0, 0]])
    assert mean_abs_jerk(stop_go, 0.1) == pytest.approx(0.2 / 0.01)
    assert math.isnan(mean_abs_jerk(stop_go[:2], 0.1))


def test_outcomes_summary_markdown_and_files(tmp_path):
    outcomes = []
    for i, (family, success) in enumerate([('pick', True), ('pick', False), ('push', True)]):
        log = EpisodeLog(EpisodeSpec(family, i), 'do it', 0, 0.1)
        for k in range(5):
            twist = np.array([0.02 * (k % 2), 0, 0, 0, 0, 0])
            log.add_period(np.r_[twist[:6] * 5, -1.0], twist, stale_fraction=0.5 if k == 0 else 0.0, how='complete')
        log.add_inference({'inference_latency_ms': '12.5', 'model_latency_ms': '10.0', 'kept_ratio': '0.5',
                           'skipped_steps': '1'})
        log.success = success
        outcomes.append(log.outcome(0.5, save_actions=i == 0))
    assert outcomes[0].actions is not None and outcomes[1].actions is None
    values = outcomes[0].as_values()
    assert values['success'] == 'true' and 'actions' not in values and json.loads(values['sync_how']) == {'complete': 5}
    summary = summarize_outcomes(outcomes, label='none', mode='sync')
    overall = summary['overall']
    assert overall['episodes'] == 3 and overall['successes'] == 2
    assert 0 < overall['ci95'][0] < 2 / 3 < overall['ci95'][1] <= 1
    assert overall['hold_fraction'] == pytest.approx(3 / 5) and overall['stale_fraction'] == pytest.approx(0.1)
    assert summary['families']['pick']['success_rate'] == 0.5 and overall['latency_ms_median'] == 12.5
    assert '| none | sync | all | 66.7% (2/3)' in markdown_summary([summary])
    json_path, md_path = write_summary(summary, tmp_path / 'out' / 'summary.json', {'policy': {'method': 'none'}})
    document = json.loads(json_path.read_text())
    assert document['policy'] == {'method': 'none'} and len(document['summary']['episodes']) == 3
    assert md_path.read_text().startswith('| config |')


def test_interrupted_episodes_are_listed_but_not_scored_and_timeouts_are_shown():
    outcomes = []
    for i, (success, how, interrupted) in enumerate([(True, 'complete', False), (False, 'timeout', False),
                                                     (False, 'complete', True)]):
        log = EpisodeLog(EpisodeSpec('pick', i), 'do it', 0, 0.1)
        for k in range(4):
            log.add_period(np.zeros(7), np.zeros(6), how=how if k == 0 else 'complete')
        log.success, log.interrupted = success, interrupted
        outcomes.append(log.outcome(0.4))
    assert [o.status for o in outcomes] == ['success', 'failure with 1 ticks timed out', 'interrupted']
    summary = summarize_outcomes(outcomes, label='none', mode='sync', planned=5)
    assert (summary['planned_episodes'], summary['completed_episodes'], summary['interrupted_episodes']) == (5, 2, 1)
    assert not summary['complete']
    overall = summary['overall']
    assert (overall['episodes'], overall['successes'], overall['timeouts'], overall['episodes_with_timeouts']) == \
        (2, 1, 1, 1)
    assert [e['status'] for e in summary['episodes']] == [o.status for o in outcomes]
    table = markdown_summary([summary])
    assert '| none | sync | all | 50.0% (1/2) |' in table and table.splitlines()[2].endswith('| 1 (1) |')
    assert 'INCOMPLETE none sync: 2 of 5 planned episodes completed (1 interrupted' in table
    assert 'INCOMPLETE' not in markdown_summary([summarize_outcomes(outcomes[:2], 'none', 'sync')])


# --- settings and the sim launch configuration ----------------------------------------------------------------
def test_bridge_settings_validate_everything_at_once():
    from specprune_ros.bridge import settings
    from specprune_ros.sim import CAMERA_NAMES, TASK_FAMILIES
    assert (settings.TASK_FAMILIES, settings.CAMERA_NAMES) == (TASK_FAMILIES, CAMERA_NAMES)
    assert BridgeSettings().validate() == []
    bad = BridgeSettings.from_mapping({'mode': 'fast', 'families': ['stack'], 'camera_names': ['side'],
                                       'camera_topics': [], 'settle_s': 0, 'episodes_per_family': 0})
    text = '; '.join(bad.validate())
    for fragment in ('mode', 'families', 'camera_names', 'same length', 'settle_s', 'episodes_per_family must be >= 1'):
        assert fragment in text
    with pytest.raises(ValueError, match='unknown sim_bridge parameters'):
        BridgeSettings.from_mapping({'speed': 2})


def test_sync_mode_needs_a_policy_node_to_follow():
    """Sync ticks are answered by the chunks on <policy_node>/action_chunk: without a policy node none would be."""
    (error,) = BridgeSettings(policy_node='').validate()
    assert 'policy_node: empty' in error and 'action_chunk' in error and 'realtime' in error
    assert BridgeSettings(policy_node='', mode='realtime').validate() == []


def test_sim_params_file_holds_the_bridge_defaults_and_the_policy_overrides():
    from specprune_ros.control.parameters import NodeParameters
    from specprune_ros.ros.sim_launch_config import sim_file_values
    path = str(ROOT / 'config' / 'sim_bridge.yaml')
    bridge = sim_file_values(path, 'sim_bridge')
    assert bridge == BridgeSettings.defaults()   # every parameter, with its default, documented in one place
    policy = sim_file_values(path, 'specprune_node')
    assert policy.pop('use_sim_time') is True
    params = NodeParameters.from_mapping(policy)
    assert params.validate() == []
    assert params.replan_every_steps == 8 and params.max_chunk_age_s >= 0.8 and not params.gripper_binarize
    assert params.max_camera_skew_s < 0.1        # below one period: frames of different ticks never pair
    assert params.max_image_age_s > params.replan_every_steps * 0.1   # sync mode: frames on re-planning ticks


def test_sim_setup_builds_both_commands_and_rejects_bad_arguments():
    from specprune_ros.ros.sim_launch_config import bridge_command, policy_command, sim_setup
    setup = sim_setup({'model': 'tiny-random', 'method': 'none', 'mode': 'realtime', 'families': 'pick,push',
                       'episodes_per_family': '3'})
    policy = policy_command(setup, {'torch_threads': 1, 'replan_every_steps': 2})
    files = [policy[i + 1] for i, arg in enumerate(policy) if arg == '--params-file']
    assert [Path(f).name for f in files] == ['specprune.yaml']
    overrides = [policy[i + 1] for i, arg in enumerate(policy) if arg == '-p']
    assert overrides.count('replan_every_steps:=2') == 1 and 'replan_every_steps:=8' not in overrides
    assert 'use_sim_time:=true' in overrides and 'model:=tiny-random' in overrides
    assert 'torch_threads:=1' in policy and not any('servo_node' in arg for arg in policy)
    assert setup.policy_parameters()['replan_every_steps'] == 8          # from the sim file
    bridge = bridge_command(setup)
    assert 'mode:=realtime' in bridge and 'families:=[pick, push]' in bridge and 'episodes_per_family:=3' in bridge
    with pytest.raises(ValueError, match='unknown launch arguments'):
        sim_setup({'speed': 'fast'})
    with pytest.raises(ValueError, match='mode'):
        sim_setup({'mode': 'turbo'})
    with pytest.raises(ValueError, match='integer'):
        sim_setup({'episodes_per_family': 'many'})


@pytest.mark.parametrize('name', ['sim.launch.py', 'gazebo_sim.launch.py'])
def test_launch_files_are_valid_python_with_a_launch_description(name):
    tree = ast.parse((ROOT / 'launch' / name).read_text())
    functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert 'generate_launch_description' in functions


def test_sim_launch_file_wires_both_nodes_from_the_tested_configuration(monkeypatch):
    """Run launch/sim.launch.py against stand-ins for launch / launch_ros (not installable here)."""
    import importlib.util
    import sys
    import types

    class Recorder:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    class LifecycleRecorder(Recorder):
        pass

    class LaunchConfiguration:
        values: dict = {}

        def __init__(self, name):
            self.name = name

        def perform(self, context):
            return self.values.get(self.name, '')

    modules = {'launch': {'LaunchDescription': Recorder},
               'launch.actions': {name: Recorder for name in ('DeclareLaunchArgument', 'EmitEvent', 'OpaqueFunction',
                                                              'RegisterEventHandler')},
               'launch.event_handlers': {'OnProcessExit': Recorder}, 'launch.events': {'Shutdown': Recorder},
               'launch.substitutions': {'LaunchConfiguration': LaunchConfiguration},
               'launch_ros': {}, 'launch_ros.actions': {'Node': Recorder, 'LifecycleNode': LifecycleRecorder}}
    for name, attributes in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location('sim_launch', ROOT / 'launch' / 'sim.launch.py')
    launch_file = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_file)
    description = launch_file.generate_launch_description()
    declared = [a.args[0] for a in description.args[0] if a.args]
    assert {'model', 'method', 'mode', 'families', 'episodes_per_family', 'summary_path'} <= set(declared)
    LaunchConfiguration.values = {'model': 'tiny-random', 'method': 'none', 'mode': 'realtime', 'families': 'pick'}
    policy, bridge, shutdown, node_gone = description.args[0][-1].kwargs['function'](None)
    assert policy.kwargs['executable'] == 'specprune_node' and bridge.kwargs['executable'] == 'specprune_sim_bridge'
    assert bridge.kwargs['name'] == 'sim_bridge'   # the node keeps its name: config/sim_bridge.yaml is keyed by it
    assert isinstance(policy, LifecycleRecorder) and policy.kwargs['namespace'] == ''     # a lifecycle node
    params_file, overrides = policy.kwargs['parameters']
    assert Path(params_file).name == 'specprune.yaml'
    assert overrides['model'] == 'tiny-random' and overrides['use_sim_time'] is True
    assert overrides['replan_every_steps'] == 8 and overrides['max_camera_skew_s'] == 0.05
    assert policy.kwargs['remappings'] == []            # the bridge's topic names, not MoveIt Servo's
    assert bridge.kwargs['parameters'][1] == {'mode': 'realtime', 'families': ['pick']}
    assert shutdown.args[0].kwargs['target_action'] is bridge
    # the launch also ends when the policy node exits first (no bridge left waiting for it)
    assert node_gone.args[0].kwargs['target_action'] is policy
    (event,) = node_gone.args[0].kwargs['on_exit']
    assert 'policy node exited' in event.kwargs['event'].kwargs['reason']


def test_simulation_runs_write_under_outputs_by_default():
    import argparse
    import importlib.util
    spec = importlib.util.spec_from_file_location('run_sim_closed_loop', ROOT / 'scripts' / 'run_sim_closed_loop.py')
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for label, method, mode, stem in (('', 'specprune', 'sync', 'specprune_sync_'), ('mine', 'none', '', 'mine_'),
                                      ('', '', '', 'default_')):
        path = script.default_run_directory(argparse.Namespace(label=label, method=method, mode=mode))
        assert path.parent == Path('outputs') / 'sim' and path.name.startswith(stem), path
    assert script.build_parser().get_default('summary') == ''


HOLDS_ON_UNTIL_INTERRUPTED = """
import signal, sys, time
seen = []
def on_interrupt(signum, frame):
    seen.append(signum)
    print('interrupt', len(seen), flush=True)
    if len(seen) == int(sys.argv[1]):
        sys.exit(3)
signal.signal(signal.SIGINT, on_interrupt)
print('ready', flush=True)
while True:
    time.sleep(0.02)
"""


@pytest.mark.parametrize('interrupts_needed, status', [(2, 3), (99, -9)])
def test_a_run_stops_a_process_with_a_second_interrupt_before_killing_it(tmp_path, interrupts_needed, status):
    """A bag recorder still writing closes its bag on a second SIGINT; only a process ignoring both is killed."""
    process = ManagedProcess('holds_on', [sys.executable, '-c', HOLDS_ON_UNTIL_INTERRUPTED, str(interrupts_needed)],
                             dict(os.environ), tmp_path / 'holds_on.log').start()
    deadline = time.monotonic() + 30
    while 'ready' not in process.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.interrupt(timeout=0.5, second_timeout=0.5 if interrupts_needed > 2 else 20) == status
    assert 'interrupt 2' in process.output()
