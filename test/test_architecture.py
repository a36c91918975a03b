"""The package's layering.

Lower layers never import higher ones, only the ROS layer talks to ROS (the contracts in ``.importlinter``), and a
function-level import of another project package says why it is not at the top.
"""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'specprune_ros'

# Function-level imports of other project packages that predate this check, in modules whose imports their own
# maintainers still have to move to the top or explain; none may be added.
KNOWN_FUNCTION_LEVEL: set[tuple[str, str]] = set()   # (module, import) pairs allowed without a comment


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` (import-linter) on the ``specprune_ros`` package under ``root``."""
    pytest.importorskip('importlinter', reason='import-linter is not installed (pip install -r requirements.txt)')
    lint = Path(sys.executable).with_name('lint-imports')
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(root), os.environ.get('PYTHONPATH')]))}
    return subprocess.run([str(lint), '--no-cache', '--config', str(ROOT / '.importlinter')], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    """The contracts of ``.importlinter`` hold for the code as it is."""
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert 'Contracts: 2 kept, 0 broken.' in run.stdout


def test_import_contracts_break_on_an_upward_import(tmp_path):
    """A core module importing the ROS node (even inside a function) breaks both contracts."""
    shutil.copytree(PACKAGE, tmp_path / 'specprune_ros', ignore=shutil.ignore_patterns('__pycache__', 'assets'))
    masks = tmp_path / 'specprune_ros' / 'core' / 'masks.py'
    masks.write_text(masks.read_text() + '\n\ndef probe():\n    from specprune_ros.ros import policy_node\n')
    run = lint_imports(tmp_path)
    assert run.returncode != 0
    assert 'Contracts: 0 kept, 2 broken.' in run.stdout, run.stdout[-4000:]


def function_level_imports(source: str, own: str) -> list[tuple[int, str]]:
    """(line, module) of every import of a ``specprune_ros`` package other than ``own`` inside a function."""
    found = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            names = [node.module or ''] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith('specprune_ros.') and not (name + '.').startswith(own + '.'):
                    found.append((node.lineno, name))
    return found


def test_function_level_imports_of_other_packages_say_why():
    """An import inside a function hides the dependency (and any cycle) from the layer check.

    It needs a comment on the line itself or just above saying why (an optional heavy dependency).
    """
    unexplained = []
    for path in sorted(PACKAGE.rglob('*.py')):
        source = path.read_text()
        lines = source.splitlines()
        relative = path.relative_to(PACKAGE).as_posix()
        own = f'specprune_ros.{path.relative_to(PACKAGE).parts[0]}'
        for line, module in function_level_imports(source, own):
            commented = '#' in lines[line - 1] or lines[line - 2].strip().startswith('#')
            if not commented and (relative, module) not in KNOWN_FUNCTION_LEVEL:
                unexplained.append(f'{relative}:{line} imports {module}')
    assert not unexplained, 'function-level imports without a reason:\n' + '\n'.join(unexplained)


def test_the_function_level_import_check_sees_one():
    """The scan finds an import of another package inside a function.

    It does not report one of the package's own modules nor one at module level.
    """
    source = ('from specprune_ros.pruning import build_method\n\n\ndef f():\n'
              '    from specprune_ros.sim import scene\n    from specprune_ros.core import masks\n')
    assert function_level_imports(source, 'specprune_ros.core') == [(5, 'specprune_ros.sim')]
