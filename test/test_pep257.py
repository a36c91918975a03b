"""Docstring style (pep257) through ament's linter, with the project's convention.

The project's convention is ament's with two changes:

* the summary starts on the first line, next to the opening quotes: D212 is checked and D213 (summary on the
  second line) is not;
* D401 (first line in the imperative mood) is not checked: a summary may be a noun phrase naming what a module,
  class or function is or returns ("The adapter of a checkpoint directory."), the style the project's docstrings
  are written in.
"""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ('specprune_ros', 'test', 'benchmarks', 'scripts', 'launch', 'setup.py')
# ament_pep257's 'ament' convention ignores these; the project drops D212 from the list and adds D213 and D401.
AMENT_IGNORE = ('D100', 'D101', 'D102', 'D103', 'D104', 'D105', 'D106', 'D107', 'D203', 'D212', 'D404')
IGNORE = tuple(code for code in AMENT_IGNORE if code != 'D212') + ('D213', 'D401')


@pytest.mark.pep257
@pytest.mark.linter
def test_pep257():
    """No docstring style errors in the checked tree."""
    pep257 = pytest.importorskip('ament_pep257.main', reason='ament_pep257 is not installed (pip install -r '
                                 'requirements-ros.txt, or the ros-kilted-ament-pep257 system package)')
    rc = pep257.main(argv=['--ignore', *IGNORE, '--', *(str(ROOT / path) for path in CHECKED)])
    assert rc == 0, 'docstring style errors (listed above)'
