"""Build a dataclass from a plain mapping (a YAML / JSON config, ROS parameters).

Unknown names are an error, so is a value outside the choices of a ``Literal`` field, and values are converted where the
field's type says so and nothing is lost (int -> float, list <-> tuple, a nested mapping -> a nested dataclass).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, Optional, TypeVar

T = TypeVar('T')


class UnknownFieldsError(ValueError):
    """Names in the mapping that are no field of the dataclass (``unknown``, sorted; ``valid``: the fields)."""

    def __init__(self, unknown: list[str], valid: list[str], what: str) -> None:
        super().__init__(f'unknown {what} {unknown}; valid: {valid}')
        self.unknown = unknown
        self.valid = valid


class InvalidChoiceError(ValueError):
    """A value outside the choices of a field whose type is a ``Literal`` (``choices``: what it allows)."""

    def __init__(self, field: str, value: Any, choices: tuple, owner: str) -> None:
        super().__init__(f'{owner}.{field} must be one of {list(choices)}, not {value!r}')
        self.field = field
        self.value = value
        self.choices = choices


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
    converted = {name: convert(value, hints.get(name)) for name, value in values.items()}
    for name, value in converted.items():
        choices = literal_choices(hints.get(name))
        if choices is not None and not any(_same(value, choice) for choice in choices):
            raise InvalidChoiceError(name, value, choices, cls.__name__)
    return cls(**converted)


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


def _same(value: Any, choice: Any) -> bool:
    """``value == choice``, a bool never equal to an int (True is not 1 here)."""
    return value == choice and isinstance(value, bool) == isinstance(choice, bool)


def literal_choices(hint: Any) -> Optional[tuple]:
    """The values a ``Literal`` hint allows (an Optional one's with None), or None for any other hint."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = typing.get_args(hint)
        if any(typing.get_origin(a) is typing.Literal for a in parts) and \
                all(typing.get_origin(a) is typing.Literal or a is type(None) for a in parts):
            return tuple(c for a in parts if a is not type(None) for c in typing.get_args(a)) + \
                ((None,) if type(None) in parts else ())
    return None


def _allows(hint: Any, container: type) -> bool:
    """Whether ``hint`` is ``container``, ``container[...]`` or an Optional / Union holding one."""
    if hint is container or typing.get_origin(hint) is container:
        return True
    return typing.get_origin(hint) is typing.Union and any(_allows(a, container) for a in typing.get_args(hint))
