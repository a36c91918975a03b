"""The ROS packaging itself: package.xml, setup.py entry points, and (under colcon test) the install tree."""
import argparse
import ast
import importlib
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = 'specprune_ros'


def package_xml() -> ElementTree.Element:
    return ElementTree.parse(ROOT / 'package.xml').getroot()


def test_package_xml_is_format_3_with_a_valid_maintainer():
    root = package_xml()
    assert root.get('format') == '3'
    assert root.findtext('name') == PACKAGE
    email = root.find('maintainer').get('email')
    assert re.fullmatch(r'[^@\s]+@[^@\s]+\.[a-z]{2,}', email), email
    assert root.find('export/build_type').text == 'ament_python'


def test_every_ros_package_imported_by_the_glue_is_an_exec_depend():
    declared = {e.text for e in package_xml().findall('exec_depend')}
    imported = set()
    for path in (ROOT / PACKAGE).rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                top = name.split('.')[0]
                if top.endswith(('_msgs', '_srvs', '_interfaces')) or top in ('rclpy', 'launch', 'launch_ros'):
                    imported.add(top)
    assert imported, 'the package should import some ROS packages'
    assert imported <= declared, f'imported but not declared in package.xml: {sorted(imported - declared)}'


def test_console_scripts_point_at_callables():
    tree = ast.parse((ROOT / 'setup.py').read_text())
    scripts = [ast.literal_eval(n) for n in ast.walk(tree) if isinstance(n, ast.Constant)
               and isinstance(n.value, str) and re.fullmatch(r'\w+ = [\w.]+:\w+', n.value)]
    assert any(s.startswith('specprune_node = ') for s in scripts)
    for script in scripts:
        module, function = script.split(' = ')[1].split(':')
        assert callable(getattr(importlib.import_module(module), function)), script


def _installed_prefix() -> Path | None:
    for prefix in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep):
        if prefix and (Path(prefix) / 'share/ament_index/resource_index/packages' / PACKAGE).exists():
            return Path(prefix)
    return None


def test_install_tree_has_launch_config_and_executables():
    prefix = _installed_prefix()
    if prefix is None:
        pytest.skip('specprune_ros is not installed in an ament prefix (run under `colcon test`; CI does)')
    share = prefix / 'share' / PACKAGE
    for relative in ('package.xml', 'launch/specprune.launch.py', 'config/specprune.yaml'):
        assert (share / relative).is_file(), relative
    assert os.access(prefix / 'lib' / PACKAGE / 'specprune_node', os.X_OK)


# rosdep keys (rosdistro rosdep/python.yaml) of the third-party Python packages the package imports at run time;
# those without a key are named here and installed with pip.
ROSDEP_KEYS = {'numpy': 'python3-numpy', 'cv2': 'python3-opencv', 'yaml': 'python3-yaml', 'torch': 'python3-torch',
               'transformers': 'python3-transformers-pip', 'PIL': 'python3-pil', 'tqdm': 'python3-tqdm',
               'matplotlib': 'python3-matplotlib', 'mujoco': 'python3-mujoco-pip', 'rosbags': 'python3-rosbags-pip',
               'psutil': 'python3-psutil',
               'tokenizers': 'python3-transformers-pip',    # installed with transformers
               'cv_bridge': 'cv_bridge'}                     # a ROS package, used when installed
WITHOUT_ROSDEP_KEY = {'safetensors'}


def test_every_third_party_python_import_is_an_exec_depend_or_named_as_pip_only():
    import sys
    declared = {e.text for e in package_xml().findall('exec_depend')}
    ros = {'rclpy', 'launch', 'launch_ros', 'ament_index_python'}
    imported = set()
    for path in (ROOT / PACKAGE).rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                top = name.split('.')[0]
                if top in sys.stdlib_module_names or top == PACKAGE or top in ros \
                        or top.endswith(('_msgs', '_srvs', '_interfaces')):
                    continue
                imported.add(top)
    unknown = imported - set(ROSDEP_KEYS) - WITHOUT_ROSDEP_KEY
    assert not unknown, f'imported but neither a rosdep key nor pip-only: {sorted(unknown)}'
    missing = {ROSDEP_KEYS[name] for name in imported & set(ROSDEP_KEYS)} - declared
    assert not missing, f'package.xml lacks exec_depend {sorted(missing)}'


def console_scripts() -> dict[str, str]:
    tree = ast.parse((ROOT / 'setup.py').read_text())
    entries = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
               and re.fullmatch(r'\w+ = [\w.]+:\w+', n.value)]
    return dict(entry.split(' = ') for entry in entries)


def test_console_scripts_carry_the_package_prefix():
    names = console_scripts()
    assert {'specprune_node', 'specprune_sim_bridge', 'specprune_bag_player', 'specprune_bag_recorder',
            'specprune_evaluate_bag', 'specprune_record_sim_bag'} <= set(names)
    assert all(name.startswith('specprune_') for name in names), sorted(names)


class _Captured(Exception):
    def __init__(self, parser) -> None:
        super().__init__('parser captured')
        self.parser = parser


def _capture_parser(monkeypatch, run) -> 'argparse.ArgumentParser':
    """The parser a command builds: its ``parse_args`` raises instead of parsing."""
    def capture(self, *args, **kwargs):
        raise _Captured(self)
    monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', capture)
    monkeypatch.setattr(argparse.ArgumentParser, 'parse_known_args', capture)
    with pytest.raises(_Captured) as caught:
        run()
    monkeypatch.undo()
    return caught.value.parser


def _command_files() -> list[Path]:
    return sorted(p for folder in ('scripts', 'benchmarks') for p in (ROOT / folder).glob('*.py')
                  if 'argparse' in p.read_text() or 'main(' in p.read_text())


def _parsers(monkeypatch) -> dict[str, 'argparse.ArgumentParser']:
    import runpy
    import sys
    from specprune_ros.bags import cli
    parsers = {'specprune_evaluate_bag': cli.evaluate_parser(), 'specprune_record_sim_bag': cli.record_sim_parser()}
    for path in _command_files():
        monkeypatch.setattr(sys, 'argv', [str(path)])
        parsers[str(path.relative_to(ROOT))] = _capture_parser(
            monkeypatch, lambda: runpy.run_path(str(path), run_name='__main__'))
    for name, target in console_scripts().items():
        if name not in parsers and name not in ('specprune_node', 'specprune_sim_bridge'):   # ROS arguments only
            module, function = target.split(':')
            parsers[name] = _capture_parser(monkeypatch, lambda: getattr(importlib.import_module(module), function)([]))
    return parsers


EXAMPLE = re.compile(r'^\s*(python3? (?P<script>\S+\.py)|python3? -m (?P<module>[\w.]+)'
                     r'|(?!specprune_ros\b)(?P<console>specprune_[a-z_]+)(?= |$)'
                     r'|ros2 launch specprune_ros (?P<launch>\S+))')


def _check_example_commands(text: str, where: str) -> list[str]:
    """Problems with the example command lines in ``text``.

    A command that does not exist, or a line whose continuation backslash was swallowed (the next line's indentation
    ends up inside it).
    """
    problems = []
    scripts = console_scripts()
    lines = text.splitlines()
    for k, line in enumerate(lines):
        match = EXAMPLE.match(line)
        if not match:
            continue
        if match['script'] and not (ROOT / match['script']).is_file():
            problems.append(f'{where}: no script {match["script"]}')
        if match['module'] and importlib.util.find_spec(match['module']) is None:
            problems.append(f'{where}: no module {match["module"]}')
        if match['console'] and match['console'] not in scripts:
            problems.append(f'{where}: no console script {match["console"]}')
        if match['launch'] and not (ROOT / 'launch' / match['launch']).is_file():
            problems.append(f'{where}: no launch file {match["launch"]}')
        command = line.strip()
        while command.endswith('\\') and k + 1 < len(lines):
            k += 1
            if not lines[k].startswith(' ' * (len(line) - len(line.lstrip()) + 1)):
                problems.append(f'{where}: the continuation of {command[:40]!r} is not indented')
            command = lines[k].strip()
        if re.search(r'\S {3,}\S', line.split('#')[0]):
            problems.append(f'{where}: a swallowed line continuation in {line.strip()[:80]!r}')
    return problems


def test_every_command_help_renders_its_examples_and_documents_every_option(monkeypatch):
    from specprune_ros.command_line import HelpFormatter
    parsers = _parsers(monkeypatch)
    assert len(parsers) >= 15, sorted(parsers)
    problems = []
    for name, parser in parsers.items():
        if not issubclass(parser.formatter_class, HelpFormatter):
            problems.append(f'{name}: --help does not use specprune_ros.command_line.HelpFormatter')
        for action in parser._actions:
            if not (action.help or '').strip():
                problems.append(f'{name}: {"/".join(action.option_strings) or action.dest} has no help')
        problems += _check_example_commands(parser.format_help(), name)
    assert not problems, '\n'.join(problems)


def test_every_command_takes_task_families_space_or_comma_separated(monkeypatch):
    parsers = {name: parser for name, parser in _parsers(monkeypatch).items()
               if any('--families' in action.option_strings for action in parser._actions)}
    assert len(parsers) >= 7, sorted(parsers)
    for name, parser in parsers.items():
        given = [arg for action in parser._actions if action.required
                 for arg in ((action.option_strings[0], 'x') if action.option_strings else ('x',))]
        for families in (['pick,push'], ['pick', 'push'], ['pick,', 'push', 'pick']):
            assert parser.parse_args([*given, '--families', *families]).families == ['pick', 'push'], (name, families)
        with pytest.raises(SystemExit):
            parser.parse_args([*given, '--families', 'pick,pik'])


def test_docstrings_name_commands_that_exist():
    problems = []
    names = set(console_scripts())
    for path in sorted([*(ROOT / PACKAGE).rglob('*.py'), *(ROOT / 'scripts').glob('*.py'),
                        *(ROOT / 'benchmarks').glob('*.py'), *(ROOT / 'launch').glob('*.py')]):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node):
                text = ast.get_docstring(node, clean=False)
                where = f'{path.relative_to(ROOT)}:{getattr(node, "lineno", 1)}'
                problems += _check_example_commands(text, where)
                for group in re.findall(r'console scripts? ((?:``\w+``(?:,| and| or)?\s*)+)', text):
                    problems += [f'{where}: no console script {n}' for n in re.findall(r'``(\w+)``', group)
                                 if n not in names]
    assert not problems, '\n'.join(problems)


@pytest.mark.parametrize('module, names', [('specprune_ros.ros.policy_node', ('model ', 'method ', 'camera_topics ')),
                                           ('specprune_ros.ros.sim_bridge_node', ('mode ', 'episodes_per_family '))])
def test_the_nodes_help_lists_their_parameters_and_starts_nothing(module, names):
    """``specprune_node --help`` prints every parameter and exits; it must not start a node that publishes."""
    pytest.importorskip('rclpy', reason='ROS 2 (rclpy) is not installed: the nodes cannot be imported without it; '
                        'their help text is checked without ROS in test_node_logic_parameters.py')
    env = {**os.environ, 'ROS_DOMAIN_ID': '197'}
    done = subprocess.run([sys.executable, '-m', module, '--help'], capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith('usage: ') and all(f'  {name}(default:' in done.stdout for name in names)
    assert '[INFO]' not in done.stdout + done.stderr          # no node was created (it logs its configure)
