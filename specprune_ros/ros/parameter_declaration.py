"""Declare the node's ROS parameters from ``NodeParameters`` (descriptions, ranges, configure-time flags).

Plus the ``method_settings.*`` parameters the user gave (one per pruning-method setting) and the ``joint_limits.*``
ones (ros2_control's per-joint limits), all read-only and checked at configure.
"""
from __future__ import annotations

from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.node import Node
from rclpy.parameter import Parameter

from specprune_ros.control.parameters import (JOINT_LIMITS_PREFIX, METHOD_SETTINGS_PREFIX, PREFIXED_SETTINGS,
                                              NodeParameters, ParamInfo)

_TYPES = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
          float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING,
          list: ParameterType.PARAMETER_STRING_ARRAY}
AT_CONFIGURE = ('applies at configure: set it in the params file, on the command line or while the node is '
                'unconfigured (deactivate, clean up, set, configure)')
_TYPE_NAMES = {bool: 'bool', int: 'integer', float: 'double', str: 'string', list: 'string array'}


def descriptor(name: str, info: ParamInfo, default: Any) -> ParameterDescriptor:
    """The ROS descriptor of one schema entry."""
    kind = type(default)
    constraints = []
    if info.choices:
        constraints.append(f"one of {', '.join(info.choices)}" + (' (each element)' if kind is list else ''))
    if info.at_configure:
        constraints.append(AT_CONFIGURE)
    result = ParameterDescriptor(name=name, type=_TYPES[kind], description=info.description,
                                 additional_constraints='; '.join(constraints))
    if kind is float and info.low is not None and info.high is not None:
        result.floating_point_range = [FloatingPointRange(from_value=float(info.low), to_value=float(info.high),
                                                          step=0.0)]
    if kind is int and info.low is not None and info.high is not None:
        result.integer_range = [IntegerRange(from_value=int(info.low), to_value=int(info.high), step=1)]
    return result


def declare_node_parameters(node: Node) -> dict[str, str]:
    """Declare every parameter.

    An override that ROS rejects (type, range) falls back to the default and is returned as {name: message}, so the node
    stays up and ``on_configure`` can fail with it.
    """
    defaults = NodeParameters.defaults()
    errors, empty_lists = normalise_overrides(node, defaults)
    for name, info in NodeParameters.infos().items():
        default = defaults[name]
        if name in empty_lists:
            node.declare_parameter(name, default, descriptor(name, info, default), ignore_override=True)
            # rclpy would infer a byte array from a bare []: store the typed empty value itself
            node._parameters[name] = Parameter(name, Parameter.Type.STRING_ARRAY, [])
            continue
        try:
            node.declare_parameter(name, default, descriptor(name, info, default))
        except InvalidParameterTypeException:
            errors[name] = f'{name}: the override has the wrong type, expected {_TYPE_NAMES[type(default)]}'
            node.declare_parameter(name, default, descriptor(name, info, default), ignore_override=True)
        except InvalidParameterValueException as error:
            reason = str(error).split('Reason: ', 1)[-1].removesuffix(f': {name}')
            errors[name] = f'{name}: {reason}'
            node.declare_parameter(name, default, descriptor(name, info, default), ignore_override=True)
    return errors


def normalise_overrides(node: Node, defaults: dict[str, Any]) -> tuple[dict[str, str], set[str]]:
    """Take the overrides a params file writes naturally as the schema's types.

    An integer for a double parameter (``control_rate_hz: 20``) becomes that double. ``[]`` carries no element
    type, so rcl leaves it unset: its name is returned (declared as an empty string array). Any other unset value
    (``name:`` or ``null``) is dropped and reported in {name: message}, so the node starts and configure fails
    with the reason.
    """
    errors, empty_lists = {}, set()
    # rclpy keeps a node's overrides (params file and -p) only here; there is no public accessor
    overrides = node._parameter_overrides
    for name, default in defaults.items():
        override = overrides.get(name)
        if override is None:
            continue
        if override.type_ == Parameter.Type.NOT_SET:
            del overrides[name]
            if isinstance(default, list):
                empty_lists.add(name)
            else:
                errors[name] = f'{name}: the override has no value, expected {_TYPE_NAMES[type(default)]}'
        elif type(default) is float and override.type_ == Parameter.Type.INTEGER:
            overrides[name] = Parameter(name, Parameter.Type.DOUBLE, float(override.value))
    return errors, empty_lists


_PREFIX_DESCRIPTIONS = {METHOD_SETTINGS_PREFIX: 'a setting of the pruning method (see method)',
                        JOINT_LIMITS_PREFIX: "a joint limit of the joint commands (ros2_control's joint_limits)"}


def declare_method_settings(node: Node) -> dict[str, str]:
    """Declare every ``method_settings.<name>`` and ``joint_limits.<joint>.<field>`` override.

    Read-only; its type is the one given. Returns {name: message} for values ROS cannot hold.
    """
    errors = {}
    # rclpy keeps a node's overrides (params file and -p) only here; there is no public accessor
    for name, override in sorted(node._parameter_overrides.items()):
        if not name.startswith(PREFIXED_SETTINGS):
            continue
        prefix = next(p for p in PREFIXED_SETTINGS if name.startswith(p))
        description = ParameterDescriptor(name=name, description=_PREFIX_DESCRIPTIONS[prefix],
                                          read_only=True, dynamic_typing=True)
        try:
            node.declare_parameter(name, override.value, description)
        except (InvalidParameterTypeException, InvalidParameterValueException, TypeError) as error:
            errors[name] = f'{name}: {error}'
    return errors


def read_node_parameters(node: Node, changes: dict[str, Any] | None = None) -> NodeParameters:
    """The current parameter values (optionally with pending ``changes``) as ``NodeParameters``."""
    values = {name: node.get_parameter(name).value for name in NodeParameters.infos()}
    for prefix in PREFIXED_SETTINGS:
        values.update({f'{prefix}{name}': parameter.value for name, parameter
                       in node.get_parameters_by_prefix(prefix.rstrip('.')).items()})
    values.update(changes or {})
    return NodeParameters.from_mapping({k: list(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()})
