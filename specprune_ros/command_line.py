"""The ``--help`` layout every command of the package shares.

The description and its examples as written (line continuations stay), and each option's default after its help text.
"""
from __future__ import annotations

import argparse


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


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a count of episodes, steps, workers)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'{value} is not a positive integer')
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0 (0 often meaning 'none' or 'no limit')."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value < 0:
        raise argparse.ArgumentTypeError(f'{value} is negative')
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if value != value or value in (float('inf'), float('-inf')):
        raise argparse.ArgumentTypeError(f'{text!r} is not a finite number')
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0 (a rate, a scale)."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'{value} is not positive')
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number of at least 0 (a noise level, a weight, a time limit with 0 = none)."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'{value} is negative')
    return value


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
