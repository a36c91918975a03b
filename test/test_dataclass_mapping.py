"""Dataclasses from plain mappings.

The one parser behind method configs, node parameters, bridge settings and adapter options.
"""
from dataclasses import dataclass, field
from typing import Optional

import pytest

from specprune_ros.core.dataclass_mapping import UnknownFieldsError, dataclass_from_mapping


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
