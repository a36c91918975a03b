"""Build a dataclass from a plain mapping (a YAML / JSON config, ROS parameters).

Unknown names are an error, and values are converted where the field's type says so and nothing is lost (int -> float,
list <-> tuple, a nested mapping -> a nested dataclass).
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, Optional, TypeVar

T = TypeVar('T')


class UnknownFieldsError(ValueError):
    """Names in the mapping that are no field of the dataclass (``unknown``, sorted; ``valid``: the fields)."""

    def __init__(self, unknown: list[str], valid: list[str], what: str) -> None:
        super().__init__(f'unknown {what} {unknown}; valid: {valid}')
        self.unknown = unknown
        self.valid = valid


def dataclass_from_mapping(cls: type[T], values: Optional[Mapping[str, Any]], what: str = '') -> T:
    """``cls(**values)`` with the values converted to the fields' types.

    ``what`` names the unknown names in the error (default: '<class> field(s)').
    """
    values = dict(values or {})
    names = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UnknownFieldsError(unknown, names, what or f'{cls.__name__} field(s)')
    hints = typing.get_type_hints(cls)
    return cls(**{name: convert(value, hints.get(name)) for name, value in values.items()})


def convert(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` where that loses nothing; else unchanged."""
    if isinstance(value, Mapping) and dataclasses.is_dataclass(hint):
        return dataclass_from_mapping(hint, value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, (list, tuple)):
        if _allows(hint, tuple):
            return tuple(value)
        if _allows(hint, list):
            return list(value)
    return value


def _allows(hint: Any, container: type) -> bool:
    """Whether ``hint`` is ``container``, ``container[...]`` or an Optional / Union holding one."""
    if hint is container or typing.get_origin(hint) is container:
        return True
    return typing.get_origin(hint) is typing.Union and any(_allows(a, container) for a in typing.get_args(hint))
