"""The ROS packaging itself: package.xml, setup.py entry points, and (under colcon test) the install tree."""
import ast
import importlib
import os
import re
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
