"""Lifecycle transitions of specprune_node over real DDS (ROS_DOMAIN_ID 62).

Invalid parameters fail at configure with a clear message while the process stays up.
The inference thread's lifecycle (a stop that outlives its wait, a thread that has ended) and configure-time
diagnostics settings are driven in-process, on a node that is not spun (ROS_DOMAIN_ID 212).
"""
from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

pytest.importorskip('rclpy', reason='ROS 2 (rclpy) is not installed: scripts/setup_env.sh installs the wheels; '
                    'the controller behind the transitions is covered by test_node_logic_controller.py, the '
                    'parameters by test_node_logic_parameters.py')

import rclpy  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from rcl_interfaces.msg import Parameter as ParameterMsg, ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from ros_harness import Probe, start_camera, start_node, twist_values  # noqa: E402
from specprune_ros.control.runtime_stats import ERROR  # noqa: E402
from specprune_ros.ros import policy_node  # noqa: E402
from specprune_ros.ros.output_messages import values_of  # noqa: E402

DOMAIN = 62
LOCAL_DOMAIN = 212
STARTUP_S = 120.0
WAIT_S = 20.0              # bounded waits for the in-process worker on 2 shared cores


@pytest.fixture(scope='module')
def system():
    # as a params file may write them: an integer for a double, an empty list
    managed = start_node(DOMAIN, {'autostart': 'false'}, {'control_rate_hz': 20, 'state_joint_names': []})
    # the launch configuration would refuse these, so they go straight to the process as -p overrides
    broken = start_node(DOMAIN, {'node_name': 'broken_node'},
                        {'camera_topics': ['only/one/topic'], 'control_rate_hz': 1000.0, 'chunk_mode': 'wobble',
                         'control_rate': 5.0, 'method_settings.layer_drop_fraction': 1.5},
                        label='broken_node')
    missing = start_node(DOMAIN, {'node_name': 'missing_model_node', 'model': '/nonexistent/checkpoint'},
                         label='missing_model_node')
    camera = start_camera(DOMAIN)
    probe = Probe(DOMAIN)
    broken_probe = Probe(DOMAIN, node_name='broken_node')
    missing_probe = Probe(DOMAIN, node_name='missing_model_node')
    try:
        yield {'node': managed, 'broken': broken, 'probe': probe, 'broken_probe': broken_probe,
               'missing': missing, 'missing_probe': missing_probe}
    finally:
        for each in (probe, broken_probe, missing_probe):
            each.close()
        for process in (camera, managed, broken, missing):
            process.interrupt()


def wait_state(probe: Probe, label: str, timeout: float = STARTUP_S) -> str:
    def state():
        try:
            current = probe.lifecycle_state(timeout=2.0)
        except TimeoutError:
            return None
        return current if current == label else None
    return probe.wait_for(state, timeout, interval=0.2) or probe.lifecycle_state()


def quiet_for(probe: Probe, seconds: float) -> bool:
    start = time.monotonic()
    time.sleep(seconds)
    return not probe.since(probe.twists, start)


def test_without_autostart_the_node_waits_unconfigured(system):
    probe = system['probe']
    assert wait_state(probe, 'unconfigured') == 'unconfigured'
    assert quiet_for(probe, 0.5)
    message, values = probe.wait_for(lambda: probe.latest_diagnostics()[0] and probe.latest_diagnostics(), 5.0)
    assert message == 'unconfigured' and values['lifecycle state'] == 'unconfigured'


def test_configure_loads_the_model_but_does_not_command(system):
    probe = system['probe']
    assert probe.transition(Transition.TRANSITION_CONFIGURE)
    assert probe.lifecycle_state() == 'inactive'
    assert quiet_for(probe, 0.5)
    values = probe.wait_diagnostics(lambda m, v: v.get('lifecycle state') == 'inactive', 5.0)
    assert values['hold reason'] == 'not active'


def test_activate_commands_and_deactivate_sends_a_zero_twist_then_stops(system):
    probe = system['probe']
    start = time.monotonic()
    assert probe.transition(Transition.TRANSITION_ACTIVATE)
    assert probe.lifecycle_state() == 'active'
    assert probe.wait_for(lambda: len(probe.since(probe.twists, start)) >= 10, 10.0)
    values = probe.wait_diagnostics(lambda m, v: v['hold reason'] == 'none (commanding)', 10.0)
    assert values['hold reason'] == 'none (commanding)'
    before = time.monotonic()
    assert probe.transition(Transition.TRANSITION_DEACTIVATE)
    last = probe.wait_for(lambda: probe.since(probe.twists, before), 2.0)
    assert last and not any(twist_values(last[-1]))
    time.sleep(0.2)
    assert quiet_for(probe, 0.6)
    assert probe.lifecycle_state() == 'inactive'


def test_reactivate_cleanup_and_shutdown(system):
    probe = system['probe']
    start = time.monotonic()
    assert probe.transition(Transition.TRANSITION_ACTIVATE)
    assert probe.wait_for(lambda: len(probe.since(probe.twists, start)) >= 3, 10.0)
    assert probe.transition(Transition.TRANSITION_DEACTIVATE)
    assert probe.transition(Transition.TRANSITION_CLEANUP)
    assert probe.lifecycle_state() == 'unconfigured'
    # configured again, the node takes the latched instruction (published once, long ago) again and commands
    assert probe.transition(Transition.TRANSITION_CONFIGURE) and probe.transition(Transition.TRANSITION_ACTIVATE)
    values = probe.wait_diagnostics(lambda m, v: v['hold reason'] == 'none (commanding)', 10.0)
    assert values['hold reason'] == 'none (commanding)', values['hold reason']
    assert 'commands at 20.0 Hz' in system['node'].output()
    assert probe.transition(Transition.TRANSITION_DEACTIVATE)
    assert probe.transition(Transition.TRANSITION_CLEANUP)
    after = time.monotonic()
    assert probe.wait_for(lambda: probe.since(probe.diagnostics, after), 3.0)   # the node still reports
    assert probe.transition(Transition.TRANSITION_UNCONFIGURED_SHUTDOWN)
    assert probe.lifecycle_state() == 'finalized'
    assert system['node'].alive()


def test_invalid_parameters_fail_configure_with_a_clear_message(system):
    probe, process = system['broken_probe'], system['broken']
    values = probe.wait_diagnostics(lambda m, v: v.get('configure error', 'none') != 'none', STARTUP_S)
    error = values.get('configure error', '')
    assert 'control_rate_hz' in error and 'chunk_mode' in error and 'same length' in error, error
    assert "unknown parameter 'control_rate' (did you mean 'control_rate_hz'?)" in error, error     # a typo
    assert "method 'specprune': layer_drop_fraction: 1.5 is outside [0, 1]" in error, error
    assert probe.lifecycle_state() == 'unconfigured'
    assert not probe.transition(Transition.TRANSITION_CONFIGURE)      # still invalid, still alive
    # each invalid value can be fixed on its own while others stay invalid; a new invalid value is refused
    assert set_string(probe, 'chunk_mode', 'blend').successful
    refused = set_string(probe, 'chunk_mode', 'wobble')
    assert not refused.successful and 'chunk_mode' in refused.reason and 'camera_topics' not in refused.reason
    assert process.alive()
    assert 'configure failed: invalid parameters' in process.output()


def set_string(probe: Probe, name: str, value: str):
    request = SetParameters.Request(parameters=[ParameterMsg(name=name, value=ParameterValue(
        type=ParameterType.PARAMETER_STRING, string_value=value))])
    return probe.call(SetParameters, f'{probe.prefix}/set_parameters', request).results[0]


def test_a_missing_checkpoint_fails_configure_and_the_node_keeps_reporting(system):
    probe, process = system['missing_probe'], system['missing']
    values = probe.wait_diagnostics(lambda m, v: v.get('configure error', 'none') != 'none', STARTUP_S)
    assert 'does not exist' in values.get('configure error', ''), values
    seen = time.monotonic()
    assert probe.wait_for(lambda: probe.since(probe.diagnostics, seen), 3.0)
    assert probe.lifecycle_state() == 'unconfigured' and process.alive()
    # unconfigured, the model can be changed and configured without restarting the process
    assert set_string(probe, 'model', 'tiny-random').successful
    assert probe.transition(Transition.TRANSITION_CONFIGURE) and probe.lifecycle_state() == 'inactive'
    refused = set_string(probe, 'method', 'fastv')
    assert not refused.successful and 'method apply at configure: the node is inactive' in refused.reason
    assert probe.transition(Transition.TRANSITION_CLEANUP)
    assert set_string(probe, 'method', 'fastv').successful
    assert probe.transition(Transition.TRANSITION_CONFIGURE)
    assert "loaded 'tiny-random' with method 'fastv'" in process.output()


# --- in-process: the inference thread and configure-time settings -----------------------------------------------
class Gate:
    """Holds the policy's next predictions inside ``predict`` while ``closed`` (the warm-up runs through)."""

    def __init__(self) -> None:
        self.closed = False
        self.open = threading.Event()
        self.entered = threading.Event()

    def wrap(self, policy: Any) -> Any:
        predict = policy.predict

        def gated(observation: Any) -> Any:
            if self.closed:
                self.entered.set()
                self.open.wait(WAIT_S)
            return predict(observation)
        policy.predict = gated
        return policy


class Recorder:
    """Stands in for a publisher."""

    def __init__(self) -> None:
        self.messages: list = []

    def publish(self, message: Any) -> None:
        self.messages.append(message)


@pytest.fixture
def local(monkeypatch):
    """An in-process node on tiny-random (not spun: the test triggers transitions and callbacks itself)."""
    gate = Gate()
    load = policy_node.load_policy_from
    monkeypatch.setattr(policy_node, 'load_policy_from', lambda params: gate.wrap(load(params)))
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=LOCAL_DOMAIN)
    overrides = {'autostart': False, 'model': 'tiny-random', 'method_config': '{num_layers: 4}', 'torch_threads': 1,
                 'max_image_age_s': 60.0, 'max_state_age_s': 60.0, 'max_chunk_age_s': 60.0,
                 'inference_deadline_s': 60.0, 'reset_after_gap_s': 600.0}
    node = policy_node.SpecPruneNode(context=context,
                                     parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
    try:
        yield node, gate
    finally:
        gate.open.set()
        if node.lifecycle_state() != 'finalized':
            node.trigger_shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)


def feed(node: policy_node.SpecPruneNode) -> None:
    """Fresh frames, robot state and an instruction straight into the controller; wake the worker."""
    policy, controller, now = node.policy, node.controller, node.now()
    for camera in policy.camera_names:
        controller.put_frame(camera, np.zeros((*policy.image_size, 3), np.uint8), now, now)
    controller.put_proprio(np.zeros(policy.proprio_dim, np.float32), now)
    controller.put_instruction('pick up the red cube')
    node.worker.wake()


def wait_until(condition: Any, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def diagnostics(node: policy_node.SpecPruneNode) -> tuple[int, str, dict[str, str]]:
    recorder = Recorder()
    node._diagnostics_pub = recorder
    node._publish_diagnostics()
    status = recorder.messages[-1].status[0]
    return status.level[0], status.message, values_of(status)


def activate(node: policy_node.SpecPruneNode) -> None:
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS, node.configure_error
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS


def test_configure_is_refused_while_the_released_policy_is_still_inside_a_step(local, monkeypatch):
    node, gate = local
    activate(node)
    gate.closed = True
    feed(node)
    assert gate.entered.wait(WAIT_S), 'the worker never started a step'
    worker = node.worker
    monkeypatch.setattr(policy_node, 'WORKER_STOP_TIMEOUT_S', 0.1, raising=False)
    assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
    assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
    assert worker.running                                           # still inside predict
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE    # no second model beside the first
    assert 'the previous policy is still inside policy.predict' in node.configure_error, node.configure_error
    level, message, _ = diagnostics(node)
    assert level == ERROR and 'still inside policy.predict' in message
    gate.closed = False
    gate.open.set()
    assert wait_until(lambda: not worker.running), 'the step never ended'
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS, node.configure_error


def test_a_stopped_inference_thread_holds_the_robot_and_is_an_error_in_diagnostics(local, monkeypatch):
    node, _ = local
    activate(node)
    commands: list = []
    monkeypatch.setattr(node, '_publish_locked', commands.append)
    feed(node)
    assert wait_until(lambda: node.controller.stats.events['inferences'] >= 1), 'no chunk'
    node._on_tick()
    assert not commands[-1].holding, commands[-1].hold_reason        # commanding from the chunk
    level, _, values = diagnostics(node)
    assert level != ERROR and values.get('inference thread', 'running') == 'running'
    node.worker.stop()                          # the thread ends while the node stays active
    node._on_tick()
    assert commands[-1].holding and 'inference thread has stopped' in commands[-1].hold_reason
    assert not any(commands[-1].twist)
    level, message, values = diagnostics(node)
    assert level == ERROR and message.startswith('active: holding: the inference thread has stopped'), message
    assert values['inference thread'] == 'stopped'


def test_diagnostics_period_set_while_unconfigured_applies_at_configure(local):
    node, _ = local
    assert node._diagnostics_timer.timer_period_ns == 1_000_000_000
    assert node.set_parameters([Parameter('diagnostics_period_s', value=5.0)])[0].successful
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS, node.configure_error
    assert node._diagnostics_timer.timer_period_ns == 5_000_000_000
    assert not node.set_parameters([Parameter('diagnostics_period_s', value=2.0)])[0].successful
