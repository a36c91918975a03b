"""flake8 through ament's linter, with ament's settings and the project's line length (``[flake8]`` in setup.cfg)."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Everything the project ships or runs: the package, its tests, benchmarks, scripts, launch files and setup.py.
CHECKED = ('specprune_ros', 'test', 'benchmarks', 'scripts', 'launch', 'setup.py')


@pytest.mark.flake8
@pytest.mark.linter
def test_flake8():
    """No flake8 errors or warnings in the checked tree."""
    flake8 = pytest.importorskip('ament_flake8.main', reason='ament_flake8 is not installed (pip install -r '
                                 'requirements-ros.txt, or the ros-kilted-ament-flake8 system package)')
    rc, errors = flake8.main_with_errors(argv=['--config', str(ROOT / 'setup.cfg'),
                                               *(str(ROOT / path) for path in CHECKED)])
    assert rc == 0, f'{len(errors)} code style errors / warnings:\n' + '\n'.join(errors)
