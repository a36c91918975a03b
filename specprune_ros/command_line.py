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
