"""What ``launch/specprune.launch.py`` starts, as importable Python (no rclpy, no launch).

The launch file only declares ``LAUNCH_ARGUMENTS`` and wraps ``launch_node_arguments(node_setup(...))`` in a
launch_ros ``LifecycleNode`` (``LAUNCH_ACTION``), so lifecycle managers and ``ros2 lifecycle`` see it as one;
tests start the very same configuration as a process with ``node_command(...)``, since ``ros2 launch`` is
not always installable.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from specprune_ros.control.parameters import METHODS, NodeParameters, ParameterError

LOG_LEVELS = ('debug', 'info', 'warn', 'error', 'fatal')
_ROS_TOKEN = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')      # one node name or namespace token

PACKAGE = 'specprune_ros'
EXECUTABLE = 'specprune_node'
NODE_MODULE = 'specprune_ros.ros.policy_node'
PARAMS_FILE_NAME = 'specprune.yaml'
LAUNCH_ACTION = 'LifecycleNode'     # the launch_ros action the launch file wraps the node in


@dataclass(frozen=True)
class LaunchArgument:
    name: str
    default: str
    description: str


# Launch arguments that override one node parameter when not empty.
PARAMETER_ARGUMENTS: dict[str, str] = {
    'model': "policy: 'reference', 'tiny-random' or a checkpoint directory (empty: from params_file)",
    'method': f"pruning method: {', '.join(METHODS)} (empty: params_file)",
    'method_config': "the method's settings as a YAML mapping, e.g. '{controller: {alpha: 0.8}}' (empty: params_file)",
    'device': "torch device, e.g. 'cpu' or 'cuda:0' (empty: params_file)",
    'camera_names': 'comma-separated camera names, in the order of camera_topics (empty: params_file)',
    'camera_topics': 'comma-separated image topics, one per camera (empty: params_file)',
    'camera_transports': 'comma-separated raw|compressed, one per camera (empty: params_file)',
    'autostart': 'true: configure and activate at start-up; false: wait for a lifecycle manager (empty: params_file)',
    'dry_run': 'true: infer and publish chunks and diagnostics but no commands (empty: params_file)',
    'latency_budget_ms': 'model step latency the node holds by pruning, e.g. 60.0 (0: off; empty: params_file)',
}
# Launch arguments that remap one of the node's fixed topic names.
REMAP_ARGUMENTS: dict[str, tuple[str, str, str]] = {
    'twist_topic': ('delta_twist_cmds', 'delta_twist_cmds',
                    'TwistStamped end-effector command topic (MoveIt Servo: /servo_node/delta_twist_cmds)'),
    'gripper_topic': ('gripper_command', 'gripper_command',
                      'gripper command topic (std_msgs/Float64 or Float64MultiArray: gripper_command_type)'),
    'instruction_topic': ('instruction', 'instruction', 'std_msgs/String task instruction topic'),
    'ee_pose_topic': ('ee_pose', 'ee_pose', 'geometry_msgs/PoseStamped end-effector pose topic'),
    'gripper_state_topic': ('gripper_state', 'gripper_state', 'gripper state topic (JointState or Float64)'),
}

LAUNCH_ARGUMENTS: tuple[LaunchArgument, ...] = (
    LaunchArgument('params_file', '', f'node parameters YAML (empty: the installed config/{PARAMS_FILE_NAME})'),
    LaunchArgument('namespace', '', 'namespace of the node and its relative topics'),
    LaunchArgument('node_name', EXECUTABLE, 'name of the node'),
    LaunchArgument('log_level', 'info', f'ROS log level: {", ".join(LOG_LEVELS)}'),
    LaunchArgument('use_sim_time', '', 'true: the node runs on /clock (bag replay, simulation); false: wall clock '
                   '(empty: params_file, else false)'),
    *(LaunchArgument(name, '', description) for name, description in PARAMETER_ARGUMENTS.items()),
    *(LaunchArgument(name, default, description) for name, (_, default, description) in REMAP_ARGUMENTS.items()),
)


def default_params_file(file_name: str = PARAMS_FILE_NAME) -> str:
    """The installed ``share/specprune_ros/config/<file_name>``, else the one in the source tree."""
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
        try:
            installed = Path(get_package_share_directory(PACKAGE)) / 'config' / file_name
            if installed.is_file():
                return str(installed)
        except (PackageNotFoundError, OSError):  # not installed, or no AMENT_PREFIX_PATH at all
            pass
    except ImportError:
        pass
    return str(Path(__file__).resolve().parents[2] / 'config' / file_name)


@dataclass
class NodeSetup:
    """Everything needed to start the node: name, namespace, params file, overrides, remappings."""

    name: str
    namespace: str
    params_file: str
    overrides: dict[str, Any] = field(default_factory=dict)
    remappings: list[tuple[str, str]] = field(default_factory=list)
    log_level: str = 'info'

    def ros_arguments(self) -> list[str]:
        """``--ros-args ...`` equivalent of the setup (what launch_ros passes to the executable)."""
        args = ['--ros-args', '-r', f'__node:={self.name}']
        if self.namespace:
            args += ['-r', f'__ns:={self.namespace}']
        args += ['--params-file', self.params_file]
        for name, value in self.overrides.items():
            args += ['-p', f'{name}:={format_value(value)}']
        for source, target in self.remappings:
            args += ['-r', f'{source}:={target}']
        args += ['--log-level', self.log_level]
        return args


def format_value(value: Any) -> str:
    """A parameter value as the YAML that ``-p name:=value`` parses back to the same type."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-len('...')].strip() if text.endswith('...') else text


def _typed_bool(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ('true', 'false'):
        raise ValueError(f"launch argument {name}: expected true or false, got {text!r}")
    return lowered == 'true'


def _typed_override(name: str, text: str) -> Any:
    default = NodeParameters.defaults()[name]
    if isinstance(default, bool):
        return _typed_bool(name, text)
    if isinstance(default, list):
        return [item.strip() for item in text.split(',') if item.strip()]
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f'launch argument {name}: expected a number, got {text!r}') from None
    return text


def node_setup(arguments: Mapping[str, str]) -> NodeSetup:
    """The node configuration for the given launch argument values (missing ones take their defaults).

    Raises ``ValueError`` for unknown arguments and overrides that the parameter schema rejects.
    """
    known = {arg.name: arg.default for arg in LAUNCH_ARGUMENTS}
    unknown = sorted(set(arguments) - set(known))
    if unknown:
        raise ValueError(f'unknown launch arguments {unknown}; known: {sorted(known)}')
    values = {**known, **{k: str(v) for k, v in arguments.items()}}
    overrides = {name: _typed_override(name, values[name]) for name in PARAMETER_ARGUMENTS if values[name].strip()}
    params_file = values['params_file'] or default_params_file()
    name, namespace = node_name(values['node_name']), node_namespace(values['namespace'])
    check_overrides(params_file, overrides, name, namespace)
    if values['use_sim_time'].strip():                       # rclpy's own parameter, not in the schema
        overrides['use_sim_time'] = _typed_bool('use_sim_time', values['use_sim_time'])
    remappings = [(source, topic_name(arg, values[arg])) for arg, (source, _, _) in REMAP_ARGUMENTS.items()
                  if values[arg] and values[arg] != source]
    return NodeSetup(name=name, namespace=namespace, params_file=params_file,
                     overrides=overrides, remappings=remappings, log_level=log_level(values['log_level']))


def log_level(text: str) -> str:
    """The ``log_level`` argument (default info), refused when rcl would refuse it at start-up."""
    level = text.strip().lower() or 'info'
    if level not in LOG_LEVELS:
        raise ValueError(f'launch argument log_level: {text!r} is not one of {", ".join(LOG_LEVELS)}')
    return level


def node_name(text: str) -> str:
    """The ``node_name`` argument (default: the executable's name), refused when ROS would refuse it."""
    name = text.strip() or EXECUTABLE
    if not _ROS_TOKEN.match(name):
        raise ValueError(f'launch argument node_name: {name!r} is not a valid node name (letters, digits and '
                         'underscores, not starting with a digit)')
    return name


def topic_name(argument: str, text: str) -> str:
    """A remap target, refused when ROS would refuse it (tokens of letters, digits and underscores)."""
    topic = text.strip()
    body = topic[2:] if topic.startswith('~/') else topic.lstrip('/')
    if not body or not all(_ROS_TOKEN.match(token) for token in body.split('/')):
        raise ValueError(f'launch argument {argument}: {text!r} is not a valid topic name')
    return topic


def node_namespace(text: str) -> str:
    """The ``namespace`` argument as an absolute namespace ('' for none), refused when ROS would refuse it."""
    namespace = text.strip().strip('/')
    if namespace and not all(_ROS_TOKEN.match(token) for token in namespace.split('/')):
        raise ValueError(f'launch argument namespace: {text!r} is not a valid namespace (tokens of letters, digits '
                         "and underscores separated by '/')")
    return f'/{namespace}' if namespace else ''


def params_file_values(params_file: str, name: str = EXECUTABLE, namespace: str = '') -> dict[str, Any]:
    """The ``ros__parameters`` of a params file that apply to the node ``namespace/name``.

    Sections in the order ROS applies them (later ones win): ``/**``, the bare name, the fully qualified name.
    """
    with open(params_file, encoding='utf-8') as stream:
        document = yaml.safe_load(stream) or {}
    values: dict[str, Any] = {}
    qualified = f'{namespace}/{name}'
    for key in dict.fromkeys(('/**', name, f'/{name}', qualified, qualified.lstrip('/'))):
        values.update(flatten_parameters((document.get(key) or {}).get('ros__parameters', {}) or {}))
    return values


def flatten_parameters(values: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    """Nested params-file mappings as ROS names them.

    {'method_settings': {'keep_ratio': 0.2}} -> {'method_settings.keep_ratio': 0.2}.
    """
    flat: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten_parameters(value, f'{prefix}{name}.'))
        else:
            flat[f'{prefix}{name}'] = value
    return flat


def check_overrides(params_file: str, overrides: Mapping[str, Any], name: str = EXECUTABLE,
                    namespace: str = '') -> NodeParameters:
    """Validate params file (its sections for ``namespace/name``) + overrides against the schema.

    A clear ``ValueError`` when they do not fit.
    """
    if not os.path.isfile(params_file):
        raise ValueError(f'params_file {params_file!r} does not exist')
    try:
        params = NodeParameters.from_mapping({**params_file_values(params_file, name, namespace), **overrides})
        params.check()
    except ParameterError as error:
        raise ValueError(f'{params_file} with overrides {dict(overrides)}: {error}') from None
    return params


def launch_node_arguments(setup: NodeSetup) -> dict[str, Any]:
    """Keyword arguments of the launch_ros ``LifecycleNode`` action that starts ``setup``."""
    return {'package': PACKAGE, 'executable': EXECUTABLE, 'name': setup.name, 'namespace': setup.namespace,
            'parameters': [setup.params_file, dict(setup.overrides)], 'remappings': list(setup.remappings),
            'arguments': ['--ros-args', '--log-level', setup.log_level]}


def node_command(setup: NodeSetup, python: Optional[str] = None) -> list[str]:
    """The process the launch file starts, as a command line (tests, benchmarks)."""
    return [python or sys.executable, '-m', NODE_MODULE, *setup.ros_arguments()]
