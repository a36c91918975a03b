"""The ``--help`` layout every command of the package shares.

The description and its examples as written (line continuations stay), and each option's default after its help text.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any, Callable, Optional


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples rendered as written.

    '(default: X)' after every option that has a default worth naming (not for flags, empty values or help texts that
    already say what the default is).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        default = action.default
        if ('default' in text or default is None or default is False or default == '' or default == []
                or default is argparse.SUPPRESS or isinstance(action, argparse._HelpAction)):
            return text
        if isinstance(default, (list, tuple)):
            listed = ' '.join(str(v) for v in default).replace('%', '%%')
            return f'{text} (default: {listed})'
        return f'{text} (default: %(default)s)'


def bounded(kind: type, low: float, inclusive: bool = True) -> Callable[[str], Any]:
    """An argparse type: a finite ``kind`` (int or float) of at least ``low`` (above it when not ``inclusive``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = 'an integer' if kind is int else 'a number'
            raise argparse.ArgumentTypeError(f'expected {expected}, got {text!r}') from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f'must be a finite number, got {text}')
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'at least' if inclusive else 'above'} {low}, got {text}")
        return value
    parse.__name__ = kind.__name__      # argparse names the type after this in its error messages
    return parse


positive_int = bounded(int, 1)                         # a count of episodes, steps, workers
non_negative_int = bounded(int, 0)                     # 0 often meaning 'none' or 'no limit'
positive_float = bounded(float, 0.0, inclusive=False)  # a rate, a scale
non_negative_float = bounded(float, 0.0)               # a noise level, a weight, a time limit with 0 = none


_finite_float = bounded(float, -math.inf)


def float_in(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite number in the interval from ``low`` to ``high`` (each end closed unless open)."""
    def parse(text: str) -> float:
        value = _finite_float(text)
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f'{value} is not in {interval}')
        return value
    parse.__name__ = 'number'      # argparse names the type after this in its error messages
    return parse


def boolean(text: str) -> bool:
    """An argparse type: true/false, yes/no, on/off or 1/0; any other word is an error, not False."""
    word = text.strip().lower()
    if word in ('1', 'true', 'yes', 'on'):
        return True
    if word in ('0', 'false', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'{text!r} is not a boolean (true / false)')


def yaml_mapping(text: str) -> dict:
    """An argparse type: a YAML (or JSON) mapping such as ``'{keep_ratio: 0.25}'``; empty text is {}."""
    import yaml        # here: the package's other commands do not need it to parse their arguments
    try:
        parsed = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(f'not valid YAML ({str(error).splitlines()[0]})') from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f'expected a mapping such as \'{{keep_ratio: 0.25}}\', got {text!r}')
    return parsed


class _FamilyList(argparse.Action):
    """Collect task families given space- or comma-separated (``pick place`` or ``pick,place``), checked, once each."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        names = [name.strip() for value in values for name in value.split(',') if name.strip()]
        unknown = sorted(set(names) - set(self.known))
        if unknown or not names:
            parser.error(f"{option_string}: {', '.join(unknown) or 'no family named'}; "
                         f"expected some of {' '.join(self.known)}")
        setattr(namespace, self.dest, list(dict.fromkeys(names)))

    known: tuple[str, ...] = ()


def add_families_argument(parser: argparse.ArgumentParser, known: tuple[str, ...], default: Optional[list[str]],
                          noun: str = 'task families', default_text: str = '') -> None:
    """``--families``: task families, space- or comma-separated, each of ``known``, duplicates dropped.

    ``default_text`` says what a ``None`` default means (an empty text: argparse's default is named).
    """
    action = type('FamilyList', (_FamilyList,), {'known': tuple(known)})
    suffix = f' (default: {default_text})' if default_text else ''
    parser.add_argument('--families', nargs='+', action=action, default=default, metavar='FAMILY',
                        help=f"{noun}, any of {', '.join(known)}, space- or comma-separated{suffix}")


def help_requested(args: Optional[list[str]]) -> bool:
    """``-h`` / ``--help`` among a node's own arguments (before ``--ros-args``)."""
    own = list(sys.argv[1:] if args is None else args)
    own = own[:own.index('--ros-args')] if '--ros-args' in own else own
    return '-h' in own or '--help' in own


def parameters_help(executable: str, summary: str, parameters: type) -> str:
    """A node's ``--help``: how to pass parameters, then every parameter of the dataclass with default and meaning."""
    lines = [f'usage: {executable} [--ros-args [--params-file FILE] [-p NAME:=VALUE ...]]', '', summary, '',
             'parameters (ROS name, default, meaning):']
    for field in dataclasses.fields(parameters):
        info = field.metadata.get('info')
        meaning = (getattr(info, 'description', None) or field.metadata.get('description')
                   or f'a group of parameters, one per setting: {field.name}.<setting> (see the README)')
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        lines += [f'  {field.name} (default: {default!r})', f'      {meaning}']
    return '\n'.join(lines) + '\n'
