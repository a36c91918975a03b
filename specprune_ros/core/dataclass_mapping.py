"""Build a dataclass from a plain mapping (a YAML / JSON config, ROS parameters).

Unknown names are an error, so is a value outside the choices of a ``Literal`` field, and values are converted where the
field's type says so and nothing is lost (int -> float, list <-> tuple, a nested mapping -> a nested dataclass).

A dataclass with the class attribute ``strict_types = True`` also has its values' types checked (and so have the
dataclasses nested in it): a number field takes no str and no bool, an int field no float with a fractional part
(2.0 becomes 2), a bool field only a bool, a str field only a str, and the items of a ``tuple[X, ...]`` field are
checked as X. Where a dataclass is constructed, :func:`check_number` checks a number's type and range and
:func:`check_types` every field's type.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
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


class InvalidTypeError(ValueError, TypeError):
    """A value of the wrong type for its field (``path``: the field, dotted below a nested dataclass)."""

    def __init__(self, path: str, value: Any, expected: str) -> None:
        super().__init__(f'{path}: expected {expected}, got {value!r}')
        self.path = path
        self.value = value


def dataclass_from_mapping(cls: type[T], values: Optional[Mapping[str, Any]], what: str = '',
                           strict: Optional[bool] = None, path: str = '') -> T:
    """``cls(**values)`` with the values converted to the fields' types.

    ``what`` names the unknown names in the error (default: '<class> field(s)'). ``strict``: check the values' types
    (default: the class's ``strict_types`` attribute); ``path``: the field holding ``cls``, for the messages.
    """
    values = dict(values or {})
    names = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UnknownFieldsError(unknown, names, what or f'{cls.__name__} field(s)')
    hints = typing.get_type_hints(cls)
    if strict is None:
        strict = bool(getattr(cls, 'strict_types', False))
    converted = {name: convert(value, hints.get(name), strict, f'{path}{name}') for name, value in values.items()}
    for name, value in converted.items():
        choices = literal_choices(hints.get(name))
        if choices is not None and not any(_same(value, choice) for choice in choices):
            raise InvalidChoiceError(name, value, choices, cls.__name__)
    return cls(**converted)


def convert(value: Any, hint: Any, strict: bool = False, path: str = '') -> Any:
    """``value`` as type ``hint`` where that loses nothing; else unchanged.

    ``strict``: a value of the wrong type raises :class:`InvalidTypeError` naming ``path``.
    """
    if strict:
        hint = _without_none(hint) if value is not None else hint
        if value is None and _allows_none(hint):
            return None
    if isinstance(value, Mapping) and dataclasses.is_dataclass(hint):
        return dataclass_from_mapping(hint, value, strict=strict or None, path=f'{path}.')
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if strict and hint in (float, int, bool, str):
        return _checked(value, hint, path)
    if strict and not isinstance(value, (list, tuple)) and (_allows(hint, tuple) or _allows(hint, list)):
        raise InvalidTypeError(path, value, 'a list')
    if isinstance(value, (list, tuple)):
        item = _item_hint(hint) if strict else None
        if item is not None:
            value = [convert(v, item, strict, f'{path}[{i}]') for i, v in enumerate(value)]
        if _allows(hint, tuple):
            return tuple(value)
        if _allows(hint, list):
            return list(value)
    return value


def check_types(config: Any, prefix: str = '') -> None:
    """Raise when a field of dataclass ``config`` (or of one nested in it) does not hold its type.

    The strict checks of :func:`convert` and the ``Literal`` choices, on a constructed dataclass (whose values need
    not have come from a mapping). ``prefix`` names the field holding ``config``, for the messages.
    """
    for name, hint in _field_hints(type(config)).items():
        value = getattr(config, name)
        path = f'{prefix}{name}'
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_types(value, f'{path}.')
            continue
        convert(value, hint, strict=True, path=path)
        choices = literal_choices(hint)
        if choices is not None and not any(_same(value, c) for c in choices):
            raise InvalidChoiceError(name, value, choices, type(config).__name__)


@functools.lru_cache(maxsize=None)
def _field_hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_number(path: str, value: Any, low: Optional[float] = None, high: Optional[float] = None,
                 integer: bool = False, open_low: bool = False, note: str = '') -> None:
    """Raise when ``value`` is no (finite) number, no integer where ``integer``, or outside ``low``..``high``.

    ``open_low``: ``low`` itself is outside too. ``note`` says what the number is, after the range in the message.
    """
    _checked(value, int if integer else float, path)
    if not math.isfinite(value):
        raise ValueError(f'{path}: {value} is not finite')
    if (low is not None and (value < low or (open_low and value == low))) or (high is not None and value > high):
        start = '(-inf' if low is None else f'{"(" if open_low else "["}{low:g}'
        end = 'inf)' if high is None else f'{high:g}]'
        raise ValueError(f'{path}: {value} is outside {start}, {end}' + (f' ({note})' if note else ''))


def _checked(value: Any, hint: type, path: str) -> Any:
    """``value`` if it is a ``hint`` (an integral number as an int, any real number as a float); else raise."""
    if hint is bool or hint is str:
        if not isinstance(value, hint):
            raise InvalidTypeError(path, value, 'true or false' if hint is bool else 'a string')
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):     # (a numpy bool is no Real either)
        raise InvalidTypeError(path, value, 'an integer' if hint is int else 'a number')
    if hint is float:
        return float(value) if isinstance(value, numbers.Integral) else value
    if isinstance(value, numbers.Integral):
        return int(value)
    if math.isfinite(value) and float(value).is_integer():
        return int(value)
    raise InvalidTypeError(path, value, 'an integer')


def _without_none(hint: Any) -> Any:
    """``X`` for ``Optional[X]``; any other hint unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(parts) == 1:
            return parts[0]
    return hint


def _allows_none(hint: Any) -> bool:
    return hint is None or hint is type(None) or hint is Any or (
        typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint))


def _item_hint(hint: Any) -> Any:
    """``X`` for ``tuple[X, ...]`` and ``list[X]``; None for any other hint."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    if typing.get_origin(hint) is list and len(args) == 1:
        return args[0]
    return None


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
