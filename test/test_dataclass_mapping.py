"""Dataclasses from plain mappings.

The one parser behind method configs, node parameters, bridge settings and adapter options.
"""
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

import pytest

from specprune_ros.core.dataclass_mapping import (InvalidChoiceError, InvalidTypeError, UnknownFieldsError,
                                                  check_number, dataclass_from_mapping)


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


@dataclass
class Strict:
    strict_types: ClassVar[bool] = True
    rate: float = 1.0
    count: int = 2
    layer: Optional[int] = None
    flag: bool = False
    name: str = 'a'
    layers: tuple[int, ...] = ()
    scales: tuple[float, ...] = ()
    inner: Inner = field(default_factory=Inner)


def test_a_strict_class_takes_values_of_its_fields_types():
    built = dataclass_from_mapping(Strict, {'rate': 3, 'count': 4.0, 'layer': None, 'flag': True, 'name': 'b',
                                            'layers': [1, -2.0], 'scales': [1, 0.5], 'inner': {'ratio': 1}})
    assert built == Strict(3.0, 4, None, True, 'b', (1, -2), (1.0, 0.5), Inner(1.0))
    assert type(built.rate) is float and type(built.count) is int and type(built.layers[1]) is int
    assert type(built.scales[0]) is float and type(built.inner.ratio) is float
    assert dataclass_from_mapping(Strict, {'layer': 3.0}).layer == 3


@pytest.mark.parametrize('values, message', [
    ({'rate': '0.5'}, "rate: expected a number, got '0.5'"),
    ({'rate': True}, 'rate: expected a number, got True'),
    ({'rate': None}, 'rate: expected a number, got None'),
    ({'count': 2.5}, 'count: expected an integer, got 2.5'),
    ({'count': True}, 'count: expected an integer, got True'),
    ({'count': '2'}, "count: expected an integer, got '2'"),
    ({'count': float('nan')}, 'count: expected an integer, got nan'),
    ({'layer': 1.5}, 'layer: expected an integer, got 1.5'),
    ({'flag': 1}, 'flag: expected true or false, got 1'),
    ({'name': 3}, 'name: expected a string, got 3'),
    ({'layers': [1, 'x']}, "layers[1]: expected an integer, got 'x'"),
    ({'layers': 5}, 'layers: expected a list, got 5'),
    ({'scales': [False]}, 'scales[0]: expected a number, got False'),
    ({'inner': {'ratio': 'x'}}, "inner.ratio: expected a number, got 'x'"),
])
def test_a_strict_class_refuses_a_value_of_another_type_naming_the_field(values, message):
    with pytest.raises(InvalidTypeError) as error:
        dataclass_from_mapping(Strict, values)
    assert str(error.value) == message
    assert isinstance(error.value, ValueError) and isinstance(error.value, TypeError)


def test_strict_can_be_asked_for_any_class_and_leaves_the_others_as_they_were():
    with pytest.raises(InvalidTypeError, match='rate: expected a number, got True'):
        dataclass_from_mapping(Outer, {'rate': True}, strict=True)
    with pytest.raises(InvalidTypeError, match=r"^inner\.ratio: expected a number, got 'x'$"):
        dataclass_from_mapping(Outer, {'inner': {'ratio': 'x'}}, strict=True)
    assert dataclass_from_mapping(Outer, {'inner': {'ratio': 'x'}}).inner.ratio == 'x'      # not strict: unchanged


def test_check_number_names_the_value_and_its_range():
    check_number('ratio', 0.5, 0, 1)
    check_number('layers', 3, 1, integer=True)
    cases = [(('ratio', 1.5, 0, 1), {'note': 'a fraction'}, 'ratio: 1.5 is outside [0, 1] (a fraction)'),
             (('ratio', 0.0, 0, 1), {'open_low': True}, 'ratio: 0.0 is outside (0, 1]'),
             (('count', 0, 1), {'integer': True}, 'count: 0 is outside [1, inf)'),
             (('scale', 2.0, None, 1.5), {}, 'scale: 2.0 is outside (-inf, 1.5]'),
             (('alpha', float('nan'), 0), {}, 'alpha: nan is not finite'),
             (('alpha', float('inf')), {}, 'alpha: inf is not finite'),
             (('count', 2.5, 0), {'integer': True}, 'count: expected an integer, got 2.5'),
             (('alpha', '1'), {}, "alpha: expected a number, got '1'")]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError) as error:
            check_number(*args, **kwargs)
        assert str(error.value) == message
