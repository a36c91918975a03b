"""Helpers for the DDS tests: the node and the synthetic camera as processes, and an in-process probe.

Each test module picks its own ``ROS_DOMAIN_ID`` so parallel runs never hear each other.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import TwistStamped
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from std_msgs.msg import Float64
from trajectory_msgs.msg import JointTrajectory

from specprune_ros.ros.launch_config import format_value, node_command, node_setup
from specprune_ros.ros.output_messages import values_of
from specprune_ros.ros.sim_runner import ManagedProcess, child_environment

ROOT = Path(__file__).resolve().parents[1]
# DDS discovery stays on this machine (no multicast onto real networks), here and in the child processes.
os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
PARAMS_FILE = str(ROOT / 'config' / 'specprune.yaml')
# tiny-random has 4 decoder layers; SpecPrune's defaults assume the reference VLA's 6.
TEST_ARGUMENTS = {'params_file': PARAMS_FILE, 'model': 'tiny-random', 'method': 'specprune',
                  'method_config': '{num_layers: 4}', 'twist_topic': 'delta_twist_cmds'}
TEST_PARAMETERS = {'torch_threads': 1}


def start_process(command: list[str], domain: int, label: str) -> ManagedProcess:
    """A child process in DDS domain ``domain`` (one torch thread), its output in a temporary log file."""
    handle, log_path = tempfile.mkstemp(prefix=f'{label}-', suffix='.log')
    os.close(handle)
    env = child_environment(domain, torch_threads=1)
    env['RCUTILS_LOGGING_BUFFERED_STREAM'] = '0'     # log lines reach the file at once (tests read them)
    return ManagedProcess(label, command, env, Path(log_path), cwd=ROOT).start()


def start_node(domain: int, arguments: Optional[dict] = None, parameters: Optional[dict] = None,
               label: str = 'specprune_node') -> ManagedProcess:
    """The node as the launch file starts it (same params file and node configuration)."""
    setup = node_setup({**TEST_ARGUMENTS, **(arguments or {})})
    command = node_command(setup)
    for name, value in {**TEST_PARAMETERS, **(parameters or {})}.items():
        command += ['-p', f'{name}:={format_value(value)}']
    return start_process(command, domain, label)


def start_camera(domain: int, *extra: str, rate: float = 30.0, size: int = 96) -> ManagedProcess:
    command = [sys.executable, '-m', 'specprune_ros.ros.tools.synthetic_camera', '--rate', str(rate),
               '--size', str(size), *extra]
    return start_process(command, domain, 'synthetic_camera')


class Probe:
    """A real rclpy node in the test process that records what the policy node publishes."""

    def __init__(self, domain: int, node_name: str = 'specprune_node', namespace: str = '') -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain)
        self.node = rclpy.create_node('test_probe', context=self.context)
        self.prefix = f'{namespace}/{node_name}'
        self.lock = threading.Lock()
        self.twists: list[tuple[float, TwistStamped]] = []
        self.grippers: list[tuple[float, float]] = []
        self.chunks: list[tuple[float, JointTrajectory]] = []
        self.inferences: list[tuple[float, dict[str, str]]] = []
        self.diagnostics: list[tuple[float, DiagnosticStatus]] = []
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(TwistStamped, 'delta_twist_cmds', self._store(self.twists), reliable)
        self.node.create_subscription(Float64, 'gripper_command', self._store(self.grippers, lambda m: m.data),
                                      reliable)
        self.node.create_subscription(JointTrajectory, f'{self.prefix}/action_chunk', self._store(self.chunks), 50)
        self.node.create_subscription(DiagnosticStatus, f'{self.prefix}/inference',
                                      self._store(self.inferences, values_of), 50)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 50)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception:  # context shut down under us
                break

    def _store(self, target: list, convert: Callable[[Any], Any] = lambda m: m) -> Callable[[Any], None]:
        def callback(message: Any) -> None:
            with self.lock:
                target.append((time.monotonic(), convert(message)))
        return callback

    def _on_diagnostics(self, message: DiagnosticArray) -> None:
        with self.lock:
            for status in message.status:
                if status.name == f'{self.prefix}: policy':
                    self.diagnostics.append((time.monotonic(), status))

    # --- queries ---------------------------------------------------------------------------------------------
    def since(self, records: list, start: float) -> list:
        with self.lock:
            return [item for t, item in records if t >= start]

    def latest_diagnostics(self) -> tuple[str, dict[str, str]]:
        with self.lock:
            if not self.diagnostics:
                return '', {}
            status = self.diagnostics[-1][1]
        return status.message, values_of(status)

    def wait_for(self, condition: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = condition()
            if result:
                return result
            time.sleep(interval)
        return condition()

    def wait_diagnostics(self, predicate: Callable[[str, dict[str, str]], bool], timeout: float) -> dict:
        """Wait until a diagnostics status satisfies ``predicate(message, values)``; returns its values."""
        def check():
            message, values = self.latest_diagnostics()
            return values if values and predicate(message, values) else None
        return self.wait_for(check, timeout) or self.latest_diagnostics()[1]

    # --- services and publishers -----------------------------------------------------------------------------
    def call(self, service_type: Any, name: str, request: Any, timeout: float = 10.0) -> Any:
        client = self.node.create_client(service_type, name)
        try:
            if not client.wait_for_service(timeout_sec=timeout):
                raise TimeoutError(f'service {name} not available')
            future = client.call_async(request)
            deadline = time.monotonic() + timeout
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.01)
            if not future.done():
                raise TimeoutError(f'service {name} did not answer')
            return future.result()
        finally:
            self.node.destroy_client(client)

    def lifecycle_state(self, timeout: float = 10.0) -> str:
        return self.call(GetState, f'{self.prefix}/get_state', GetState.Request(), timeout).current_state.label

    def transition(self, transition_id: int, timeout: float = 60.0) -> bool:
        request = ChangeState.Request(transition=Transition(id=transition_id))
        return self.call(ChangeState, f'{self.prefix}/change_state', request, timeout).success

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(2.0)


def twist_values(message: TwistStamped) -> list[float]:
    t = message.twist
    return [t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z]
