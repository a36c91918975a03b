"""What ``launch/sim.launch.py`` starts (policy node + sim bridge), as importable Python (no rclpy, no launch).

The launch file and ``scripts/run_sim_closed_loop.py`` share this, so the command that works without
``ros2 launch`` starts exactly what the launch file would.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

import yaml

from specprune_ros.bridge.settings import BridgeSettings
from specprune_ros.ros.launch_config import (EXECUTABLE, LAUNCH_ARGUMENTS, NODE_MODULE, LaunchArgument, NodeSetup,
                                             check_overrides, default_params_file, flatten_parameters, format_value,
                                             node_setup)

BRIDGE_EXECUTABLE = 'specprune_sim_bridge'   # console script
BRIDGE_NODE_NAME = 'sim_bridge'              # node name, the key of its parameters in the sim params file
BRIDGE_MODULE = 'specprune_ros.ros.sim_bridge_node'
SIM_PARAMS_FILE_NAME = 'sim_bridge.yaml'

# Launch arguments of sim.launch.py that override one sim_bridge parameter when not empty.
BRIDGE_ARGUMENTS: dict[str, str] = {
    'mode': 'sync (the sim waits for each command) or realtime (the sim steps every 0.1 s of wall time)',
    'families': 'comma-separated task families (pick, place, push)',
    'episodes_per_family': 'episodes of each family',
    'seed_start': 'first episode seed (1000000: the held-out evaluation seeds)',
    'max_steps': 'stop episodes after this many steps (0: the task limit)',
    'summary_path': 'write <path>.json and <path>.md with the outcomes',
    'label': 'name of the run in the summary',
}
SIM_LAUNCH_ARGUMENTS: tuple[LaunchArgument, ...] = (
    LaunchArgument('sim_params_file', '', f'bridge + sim overrides YAML (empty: the installed '
                                          f'config/{SIM_PARAMS_FILE_NAME})'),
    *(LaunchArgument(name, '', description) for name, description in BRIDGE_ARGUMENTS.items()),
)
# the policy node's launch arguments that make sense in simulation (topics are the bridge's defaults)
POLICY_ARGUMENTS = ('params_file', 'model', 'method', 'method_config', 'device', 'log_level')
ALL_ARGUMENTS: tuple[LaunchArgument, ...] = (
    *(arg for arg in LAUNCH_ARGUMENTS if arg.name in POLICY_ARGUMENTS), *SIM_LAUNCH_ARGUMENTS)


def default_sim_params_file() -> str:
    return default_params_file(SIM_PARAMS_FILE_NAME)


@dataclass
class SimSetup:
    """The two processes of a simulation run.

    The policy node gets its own params file, then the simulation values of the sim file (its
    ``/specprune_node`` section) as overrides, then the launch arguments: rclpy lets a node-specific params-file
    section beat ``-p`` overrides, so the sim file is not handed to the policy node as a second params file
    (its values could not be overridden from the command line then).
    """

    policy: NodeSetup
    sim_params_file: str
    bridge_overrides: dict[str, Any] = field(default_factory=dict)
    policy_sim_overrides: dict[str, Any] = field(default_factory=dict)

    def policy_parameters(self, extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """Overrides of the policy node, lowest precedence first: sim file, launch arguments, ``extra``."""
        return {**self.policy_sim_overrides, **self.policy.overrides, **(extra or {})}

    def policy_ros_arguments(self, extra: Optional[Mapping[str, Any]] = None) -> list[str]:
        """The policy node's ``--ros-args``: its params file, then every override as ``-p``."""
        return replace(self.policy, overrides=self.policy_parameters(extra)).ros_arguments()

    def bridge_ros_arguments(self, extra: Optional[Mapping[str, Any]] = None) -> list[str]:
        args = ['--ros-args', '-r', f'__node:={BRIDGE_NODE_NAME}', '--params-file', self.sim_params_file]
        for name, value in {**self.bridge_overrides, **(extra or {})}.items():
            args += ['-p', f'{name}:={format_value(value)}']
        return args


def _bridge_override(name: str, text: str) -> Any:
    default = BridgeSettings.defaults()[name]
    if isinstance(default, list):
        return [item.strip() for item in text.split(',') if item.strip()]
    if isinstance(default, bool):
        return text.strip().lower() == 'true'
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f'launch argument {name}: expected an integer, got {text!r}') from None
    return text


def sim_file_values(path: str, node: str) -> dict[str, Any]:
    with open(path, encoding='utf-8') as stream:
        document = yaml.safe_load(stream) or {}
    values: dict[str, Any] = {}
    for key in (node, f'/{node}'):
        values.update(flatten_parameters((document.get(key) or {}).get('ros__parameters', {}) or {}))
    return values


def sim_setup(arguments: Mapping[str, str]) -> SimSetup:
    """Both node configurations for the given launch argument values; ``ValueError`` when they do not fit."""
    known = {arg.name for arg in ALL_ARGUMENTS}
    unknown = sorted(set(arguments) - known)
    if unknown:
        raise ValueError(f'unknown launch arguments {unknown}; known: {sorted(known)}')
    sim_file = str(arguments.get('sim_params_file') or '') or default_sim_params_file()
    if not os.path.isfile(sim_file):
        raise ValueError(f'sim_params_file {sim_file!r} does not exist')
    overrides = {name: _bridge_override(name, str(arguments[name])) for name in BRIDGE_ARGUMENTS
                 if str(arguments.get(name, '')).strip()}
    settings = BridgeSettings.from_mapping({**sim_file_values(sim_file, BRIDGE_NODE_NAME), **overrides})
    errors = settings.validate()
    if errors:
        raise ValueError(f'{sim_file} with overrides {overrides}: ' + '; '.join(errors))
    # the policy node talks to the bridge: its command topics are the bridge's (not MoveIt Servo's)
    policy_args = {k: str(v) for k, v in arguments.items() if k in POLICY_ARGUMENTS}
    policy_args.update(twist_topic=settings.twist_topic, gripper_topic=settings.gripper_topic,
                       instruction_topic=settings.instruction_topic, ee_pose_topic=settings.ee_pose_topic,
                       gripper_state_topic=settings.gripper_state_topic)
    policy = node_setup(policy_args)
    policy_sim = sim_file_values(sim_file, EXECUTABLE)
    check = {k: v for k, v in {**policy_sim, **policy.overrides}.items() if k != 'use_sim_time'}
    check_overrides(policy.params_file, check)
    return SimSetup(policy=policy, sim_params_file=sim_file, bridge_overrides=overrides,
                    policy_sim_overrides=policy_sim)


def bridge_command(setup: SimSetup, extra: Optional[Mapping[str, Any]] = None,
                   python: Optional[str] = None) -> list[str]:
    return [python or sys.executable, '-m', BRIDGE_MODULE, *setup.bridge_ros_arguments(extra)]


def policy_command(setup: SimSetup, extra: Optional[Mapping[str, Any]] = None,
                   python: Optional[str] = None) -> list[str]:
    return [python or sys.executable, '-m', NODE_MODULE, *setup.policy_ros_arguments(extra)]
