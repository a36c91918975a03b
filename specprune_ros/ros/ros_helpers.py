"""Small rclpy helpers shared by the bridge and the bag tools.

Message classes by type name, service calls from a thread other than the executor's, remote parameters, and a background
executor.
"""
from __future__ import annotations

import importlib
import threading
import time
from typing import Any, Iterable, Optional

from rcl_interfaces.msg import ParameterType
from rcl_interfaces.srv import GetParameters
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node


class MessageTypeError(LookupError):
    """A message type name that does not resolve to an installed rclpy message class."""


def message_class(type_name: str) -> Any:
    """The rclpy class of ``pkg/msg/Name`` (also accepts ``pkg/Name``), or ``MessageTypeError``."""
    parts = type_name.strip('/').split('/')
    if len(parts) == 2:
        parts = [parts[0], 'msg', parts[1]]
    if len(parts) != 3 or not all(parts):
        raise MessageTypeError(f'{type_name!r} is not a message type name (expected package/msg/Name)')
    package, kind, name = parts
    try:
        module = importlib.import_module(f'{package}.{kind}')
    except ImportError:
        raise MessageTypeError(f'message type {type_name}: the Python package {package!r} is not installed '
                               f'(source its workspace or install the ROS package)') from None
    cls = getattr(module, name, None)
    if cls is None or not isinstance(cls, type):
        raise MessageTypeError(f'message type {type_name}: {package}.{kind} has no {name!r}')
    return cls


class BackgroundExecutor:
    """Spins one node in a daemon thread until ``stop``; callbacks run there, the caller's thread stays free."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.executor = SingleThreadedExecutor(context=node.context)
        self.executor.add_node(node)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name=f'{node.get_name()}-executor', daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while not self._stop.is_set() and node_context_ok(self.node):
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception as error:  # a shut-down context, or a callback error
                if not node_context_ok(self.node):
                    break
                self.node.get_logger().error(f'callback failed: {type(error).__name__}: {error}')

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        try:
            self.executor.remove_node(self.node)
        except Exception:
            pass
        self.executor.shutdown(timeout_sec=1.0)


def node_context_ok(node: Node) -> bool:
    try:
        return node.context.ok()
    except Exception:
        return False


def call_service(node: Node, service_type: Any, name: str, request: Any, timeout_s: float = 5.0) -> Optional[Any]:
    """Call a service from a non-executor thread; None when unavailable or unanswered in ``timeout_s``."""
    client = node.create_client(service_type, name)
    try:
        if not client.wait_for_service(timeout_sec=timeout_s):
            return None
        future = client.call_async(request)
        deadline = time.monotonic() + timeout_s
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.005)
        return future.result() if future.done() else None
    finally:
        node.destroy_client(client)


def parameter_value(value: Any) -> Any:
    """Python value of an ``rcl_interfaces/ParameterValue`` (None when not set)."""
    kind = value.type
    if kind == ParameterType.PARAMETER_BOOL:
        return value.bool_value
    if kind == ParameterType.PARAMETER_INTEGER:
        return value.integer_value
    if kind == ParameterType.PARAMETER_DOUBLE:
        return value.double_value
    if kind == ParameterType.PARAMETER_STRING:
        return value.string_value
    if kind == ParameterType.PARAMETER_STRING_ARRAY:
        return list(value.string_array_value)
    if kind == ParameterType.PARAMETER_INTEGER_ARRAY:
        return list(value.integer_array_value)
    if kind == ParameterType.PARAMETER_DOUBLE_ARRAY:
        return list(value.double_array_value)
    if kind == ParameterType.PARAMETER_BOOL_ARRAY:
        return list(value.bool_array_value)
    return None


def remote_parameters(node: Node, target_node: str, names: Iterable[str],
                      timeout_s: float = 5.0) -> Optional[dict[str, Any]]:
    """Parameters of another node by name (missing ones map to None); None when it does not answer."""
    names = list(names)
    reply = call_service(node, GetParameters, f'{target_node}/get_parameters', GetParameters.Request(names=names),
                         timeout_s)
    if reply is None:
        return None
    return {name: parameter_value(value) for name, value in zip(names, reply.values)}
