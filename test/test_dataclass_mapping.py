"""Dataclasses from plain mappings.

The one parser behind method configs, node parameters, bridge settings and adapter options.
"""
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from specprune_ros.core.dataclass_mapping import InvalidChoiceError, UnknownFieldsError, dataclass_from_mapping


@dataclass
class Inner:
    ratio: float = 0.5


@dataclass
class Outer:
    rate: float = 1.0
    count: int = 2
    flag: bool = False
    regions: tuple = ()
    cameras: Optional[tuple[str, ...]] = None
    names: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


def test_values_take_the_field_types_where_nothing_is_lost():
    built = dataclass_from_mapping(Outer, {'rate': 3, 'count': 4, 'flag': 1, 'regions': [[1, 0.0]],
                                           'cameras': ['wrist'], 'names': ('a', 'b'), 'inner': {'ratio': 1}})
    assert built.rate == 3.0 and isinstance(built.rate, float)
    assert built.count == 4 and isinstance(built.count, int)
    assert built.flag == 1 and not isinstance(built.flag, bool)          # no lossy conversion to bool
    assert built.regions == ([1, 0.0],) and built.cameras == ('wrist',) and built.names == ['a', 'b']
    assert built.inner == Inner(ratio=1.0) and isinstance(built.inner.ratio, float)
    assert dataclass_from_mapping(Outer, None) == Outer()
    assert dataclass_from_mapping(Outer, {'rate': True}).rate is True    # a bool is not an int here


def test_unknown_names_are_listed_with_the_valid_ones():
    message = r"unknown Outer field\(s\) \['speed', 'x'\]; valid: \['cameras',"
    with pytest.raises(UnknownFieldsError, match=message) as error:
        dataclass_from_mapping(Outer, {'x': 1, 'speed': 2, 'rate': 1.0})
    assert error.value.unknown == ['speed', 'x'] and 'inner' in error.value.valid
    with pytest.raises(ValueError, match=r'unknown Inner field\(s\) \[.size.\]'):
        dataclass_from_mapping(Outer, {'inner': {'size': 3}})
    with pytest.raises(ValueError, match=r"unknown widget options \['y'\]"):
        dataclass_from_mapping(Outer, {'y': 0}, what='widget options')


@dataclass
class Choices:
    mode: Literal['fast', 'exact'] = 'exact'
    level: Optional[Literal[1, 2]] = None


def test_a_value_outside_a_literal_fields_choices_is_refused_with_the_choices():
    assert dataclass_from_mapping(Choices, {'mode': 'fast', 'level': 2}) == Choices('fast', 2)
    assert dataclass_from_mapping(Choices, {'level': None}).level is None
    message = r"Choices.mode must be one of \['fast', 'exact'\], not 'quick'"
    with pytest.raises(InvalidChoiceError, match=message) as error:
        dataclass_from_mapping(Choices, {'mode': 'quick'})
    assert (error.value.field, error.value.value, error.value.choices) == ('mode', 'quick', ('fast', 'exact'))
    with pytest.raises(ValueError, match=r"Choices.level must be one of \[1, 2, None\], not 3"):
        dataclass_from_mapping(Choices, {'level': 3})
    with pytest.raises(ValueError, match=r'not True'):          # a bool is not the int 1 here
        dataclass_from_mapping(Choices, {'level': True})
