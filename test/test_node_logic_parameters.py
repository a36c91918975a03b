"""The node parameter schema, the params file and the launch configuration (no rclpy, no launch)."""
import ast
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import yaml

from specprune_ros.bridge.settings import BridgeSettings
from specprune_ros.command_line import help_requested, parameters_help
from specprune_ros.control.parameters import NodeParameters, ParameterError
from specprune_ros.ros import launch_config
from specprune_ros.ros.launch_config import LAUNCH_ARGUMENTS, format_value, node_command, node_setup

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = ROOT / 'config' / 'specprune.yaml'
LAUNCH_FILE = ROOT / 'launch' / 'specprune.launch.py'


def test_defaults_are_valid_and_described():
    assert NodeParameters().validate() == []
    for name, info in NodeParameters.infos().items():
        assert info.description, name
        default = getattr(NodeParameters(), name)
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            assert info.low is not None and info.high is not None, f'{name} needs a range'


def test_params_file_lists_every_parameter_validly():
    values = launch_config.params_file_values(str(PARAMS_FILE))
    assert set(values) == set(NodeParameters.infos()), 'config/specprune.yaml must list every parameter'
    params = NodeParameters.from_mapping(values)
    assert params.validate() == []
    assert params.autostart is True


@pytest.mark.parametrize('changes, fragment', [
    ({'method': 'magic'}, "method: ['magic'] not among"),
    ({'dtype': 'int8'}, 'dtype'),
    ({'control_rate_hz': 0.0}, 'control_rate_hz: 0.0 is outside'),
    ({'action_scale': 1.5}, 'action_scale'),
    ({'replan_every_steps': 0}, 'replan_every_steps'),
    ({'blend_old_weight': 1.0}, 'blend_old_weight: 1.0 is outside'),
    ({'max_linear_accel': 0.0}, 'max_linear_accel: 0.0 is outside'),     # zero would freeze the velocity
    ({'finger_joint_names': ['']}, 'finger_joint_names: [\'\'] holds an empty name'),
    ({'camera_topics': ['a']}, 'must have the same length'),
    ({'camera_transports': ['raw', 'h264']}, "camera_transports: ['h264']"),
    ({'camera_names': ['a', 'a'], 'camera_topics': ['x', 'y']}, 'duplicates'),
    ({'camera_topics': ['ok/topic', 'bad topic']}, 'not a valid topic name'),
    ({'method_config': '{unclosed'}, "method_config (method 'specprune') is not valid YAML"),
    ({'method_config': '[1, 2]'}, "method_config (method 'specprune') must be a mapping"),
    ({'method': 'fastv', 'method_config': '{keep_ratio: 1.5}'}, "method 'fastv': keep_ratio: 1.5 is outside [0, 1]"),
    ({'method': 'fastv', 'method_config': '{keep_ratio: -0.2}'}, "method 'fastv': keep_ratio: -0.2 is outside"),
    ({'method': 'random', 'method_config': '{keep_ratio: soon}'}, "method 'random': keep_ratio: expected a number"),
    ({'method': 'specprune', 'method_config': '{controller: {alpha: .nan}}'}, 'controller.alpha: nan is not finite'),
    ({'method': 'fastv', 'method_config': '{keep_rato: 0.2}'}, "method 'fastv': unknown FastVConfig field"),
    ({'method': 'specprune_statc'}, "(did you mean 'specprune_static'?)"),
    ({'camera_frames': ['front_optical']}, 'camera_frames: 1 entries for 2 cameras'),
    ({'device': 'tpu'}, 'device'),
    ({'model': '  '}, 'model: empty'),
    ({'max_image_age_s': 'soon'}, 'max_image_age_s: expected float'),
    ({'enabled': 1}, 'enabled: expected bool'),
    ({'command_frame': 'base link'}, 'command_frame'),
])
def test_invalid_parameters_have_clear_messages(changes, fragment):
    params = NodeParameters(**{**NodeParameters.defaults(), **changes})
    errors = params.validate()
    assert any(fragment in error for error in errors), errors
    with pytest.raises(ParameterError, match='invalid parameters'):
        params.check()


def test_from_mapping_coerces_ints_and_rejects_unknown_names():
    assert NodeParameters.from_mapping({'control_rate_hz': 20}).control_rate_hz == 20.0
    with pytest.raises(ParameterError, match="unknown parameter 'rate'"):
        NodeParameters.from_mapping({'rate': 3})
    with pytest.raises(ParameterError, match=r"unknown parameter 'control_rate' \(did you mean 'control_rate_hz'\?\)"):
        NodeParameters.from_mapping({'control_rate': 5.0})


def test_every_registered_pruning_method_is_a_valid_node_method():
    from specprune_ros.pruning.registry import available_methods
    for method in available_methods():          # specprune_static, specprune_static_layer, ...
        params = NodeParameters(method=method)
        assert params.validate() == [], method


def test_method_settings_nest_and_win_over_method_config():
    params = NodeParameters.from_mapping({'method': 'specprune', 'method_config': '{controller: {alpha: 0.5}}',
                                          'method_settings.controller.alpha': 0.8,
                                          'method_settings.layer_drop_fraction': 0.2})
    assert params.method_options() == {'controller': {'alpha': 0.8}, 'layer_drop_fraction': 0.2}
    assert params.validate() == []
    bad = NodeParameters.from_mapping({'method': 'vla_pruner', 'method_settings.keep_ratio': 1.5})
    assert bad.validate() == ["method_config / method_settings for method 'vla_pruner': keep_ratio: 1.5 is "
                              'outside [0, 1] (a fraction of the visual tokens)']
    typo = NodeParameters.from_mapping({'method': 'specprune', 'method_settings.task_rows': 'txt'})
    assert typo.validate() == ["method_config / method_settings for method 'specprune': SpecPruneConfig.task_rows "
                               "must be one of ['text', 'action', 'text_action', 'prefill'], not 'txt'"]


def test_method_options_parse():
    assert NodeParameters(method_config='{controller: {alpha: 0.8}}').method_options() == {'controller': {'alpha': 0.8}}
    assert NodeParameters(method_config='').method_options() == {}


def test_default_launch_setup():
    setup = node_setup({})
    assert Path(setup.params_file).is_file()
    assert setup.name == 'specprune_node' and setup.namespace == '' and setup.overrides == {}
    assert setup.remappings == []          # the bare node's topic names: delta_twist_cmds, gripper_command, ...
    assert 'use_sim_time' not in setup.overrides


def test_launch_starts_a_lifecycle_node_with_use_sim_time():
    setup = node_setup({'use_sim_time': 'true', 'twist_topic': '/servo_node/delta_twist_cmds'})
    assert setup.overrides['use_sim_time'] is True
    assert launch_config.LAUNCH_ACTION == 'LifecycleNode'
    kwargs = launch_config.launch_node_arguments(setup)
    assert kwargs['namespace'] == '' and kwargs['name'] == 'specprune_node'      # LifecycleNode needs both
    assert kwargs['parameters'] == [setup.params_file, {'use_sim_time': True}]
    assert kwargs['remappings'] == [('delta_twist_cmds', '/servo_node/delta_twist_cmds')]
    assert '-p' in setup.ros_arguments() and 'use_sim_time:=true' in setup.ros_arguments()
    with pytest.raises(ValueError, match='expected true or false'):
        node_setup({'use_sim_time': 'yes'})


def test_launch_arguments_become_typed_overrides_and_remappings():
    setup = node_setup({'model': 'tiny-random', 'method': 'fastv', 'namespace': 'arm',
                        'camera_topics': '/cam/front/image_raw, /cam/wrist/compressed',
                        'camera_transports': 'raw,compressed', 'autostart': 'False',
                        'method_config': '{keep_ratio: 0.25}', 'instruction_topic': '/task/instruction',
                        'twist_topic': 'delta_twist_cmds'})
    assert setup.namespace == '/arm'
    assert setup.overrides == {'model': 'tiny-random', 'method': 'fastv', 'autostart': False,
                               'camera_topics': ['/cam/front/image_raw', '/cam/wrist/compressed'],
                               'camera_transports': ['raw', 'compressed'], 'method_config': '{keep_ratio: 0.25}'}
    assert ('instruction', '/task/instruction') in setup.remappings
    assert not any(source == 'delta_twist_cmds' for source, _ in setup.remappings)


@pytest.mark.parametrize('arguments, fragment', [
    ({'method': 'magic'}, 'method'),
    ({'camera_topics': 'only_one'}, 'same length'),
    ({'autostart': 'maybe'}, 'expected true or false'),
    ({'colour': 'red'}, 'unknown launch arguments'),
    ({'params_file': '/nonexistent.yaml'}, 'does not exist'),
    ({'node_name': 'my node'}, "node_name: 'my node' is not a valid node name"),
    ({'log_level': 'verbose'}, "log_level: 'verbose' is not one of debug, info"),
    ({'twist_topic': '/servo node/cmds'}, "twist_topic: '/servo node/cmds' is not a valid topic name"),
    ({'namespace': 'my arm/'}, "namespace: 'my arm/' is not a valid namespace"),
])
def test_bad_launch_arguments_fail_early(arguments, fragment):
    with pytest.raises(ValueError, match=fragment):
        node_setup(arguments)


def test_ros_arguments_round_trip_through_yaml():
    setup = node_setup({'model': 'tiny-random', 'method': 'fastv', 'method_config': '{keep_ratio: 0.25}',
                        'autostart': 'true', 'use_sim_time': 'true',
                        'camera_names': 'a,b', 'camera_topics': 'x,y', 'namespace': '/ns'})
    args = setup.ros_arguments()
    assert args[:3] == ['--ros-args', '-r', '__node:=specprune_node']
    assert ['-r', '__ns:=/ns'] == args[3:5] and '--params-file' in args
    overrides = {}
    for flag, value in zip(args, args[1:]):
        if flag == '-p':
            name, text = value.split(':=', 1)
            overrides[name] = yaml.safe_load(text)
    assert overrides == setup.overrides
    command = node_command(setup, python='python3')
    assert command[:3] == ['python3', '-m', 'specprune_ros.ros.policy_node']


@pytest.mark.parametrize('value', ['tiny-random', 'true', '1.5', '{a: 1}', '', 'x: y', True, 3, 2.5, ['a', 'b']])
def test_format_value_preserves_type(value):
    assert yaml.safe_load(format_value(value)) == value


def test_launch_file_is_thin_and_uses_the_tested_config():
    tree = ast.parse(LAUNCH_FILE.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == 'specprune_ros.ros.launch_config' for alias in node.names}
    assert {'node_setup', 'LAUNCH_ARGUMENTS'} <= imported
    assert 'launch_node_arguments' in imported
    actions = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and node.module == 'launch_ros.actions' for alias in node.names}
    assert actions == {launch_config.LAUNCH_ACTION}
    functions = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    assert 'generate_launch_description' in functions


def test_launch_file_builds_when_launch_ros_exists():
    if importlib.util.find_spec('launch_ros') is None or importlib.util.find_spec('launch') is None:
        pytest.skip('launch / launch_ros are not installable here (no ros2 launch); the node configuration '
                    'is covered by the launch_config tests and started by the DDS tests with node_command()')
    spec = importlib.util.spec_from_file_location('specprune_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    declared = {entity.name for entity in description.entities if hasattr(entity, 'default_value')}
    assert declared == {arg.name for arg in LAUNCH_ARGUMENTS}


def test_the_params_file_section_of_the_launched_node_is_checked(tmp_path):
    """A section for the node's own name (or namespace/name) is what ROS applies to it, so launch checks it."""
    params_file = tmp_path / 'robot.yaml'
    params_file.write_text('/**:\n  ros__parameters:\n    model: tiny-random\n'
                           'left_arm_policy:\n  ros__parameters:\n    max_linear_speed: 0.1\n'
                           '/left/left_arm_policy:\n  ros__parameters:\n    chunk_mode: blend\n')
    values = launch_config.params_file_values(str(params_file), 'left_arm_policy', '/left')
    assert values['max_linear_speed'] == 0.1 and values['chunk_mode'] == 'blend'
    assert 'max_linear_speed' not in launch_config.params_file_values(str(params_file))
    setup = node_setup({'params_file': str(params_file), 'node_name': 'left_arm_policy', 'namespace': 'left/'})
    assert (setup.name, setup.namespace) == ('left_arm_policy', '/left')
    params_file.write_text(params_file.read_text().replace('blend', 'wobble'))
    with pytest.raises(ValueError, match='chunk_mode'):
        node_setup({'params_file': str(params_file), 'node_name': 'left_arm_policy', 'namespace': '/left'})
    node_setup({'params_file': str(params_file)})          # another node's section does not apply


def test_openvla_oft_overrides_layer_validly_over_the_defaults():
    base = launch_config.params_file_values(str(PARAMS_FILE))
    overrides = launch_config.params_file_values(str(ROOT / 'config' / 'openvla_oft.yaml'))
    assert set(overrides) <= set(NodeParameters.infos())
    params = NodeParameters.from_mapping({**base, **overrides})
    assert params.validate() == []
    assert params.device == 'cuda' and params.dtype == 'bfloat16'


def test_params_file_method_settings_nest_like_ros_and_are_checked(tmp_path):
    params_file = tmp_path / 'robot.yaml'
    params_file.write_text('/**:\n  ros__parameters:\n    model: tiny-random\n    method: fastv\n'
                           '    method_settings:\n      keep_ratio: 0.25\n')
    assert launch_config.params_file_values(str(params_file))['method_settings.keep_ratio'] == 0.25
    assert node_setup({'params_file': str(params_file)}).params_file == str(params_file)
    params_file.write_text(params_file.read_text().replace('0.25', '1.5'))
    with pytest.raises(ValueError, match=r"method 'fastv': keep_ratio: 1.5 is outside \[0, 1\]"):
        node_setup({'params_file': str(params_file)})
    with pytest.raises(ValueError, match=r"unknown parameter 'max_linear_sped' \(did you mean 'max_linear_speed'\?\)"):
        launch_config.check_overrides(launch_config.default_params_file(), {'max_linear_sped': 0.1})


def test_launch_file_starts_the_tested_setup_as_a_lifecycle_node(monkeypatch):
    """Run launch/specprune.launch.py against stand-ins for launch / launch_ros (not installable here)."""
    import sys
    import types

    class Recorder:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    class LifecycleNode(Recorder):
        pass

    class LaunchConfiguration:
        values = {'use_sim_time': 'true', 'twist_topic': '/servo_node/delta_twist_cmds', 'namespace': 'arm'}

        def __init__(self, name):
            self.name = name

        def perform(self, context):
            defaults = {arg.name: arg.default for arg in LAUNCH_ARGUMENTS}
            return self.values.get(self.name, defaults[self.name])

    modules = {'launch': {'LaunchDescription': Recorder},
               'launch.actions': {'DeclareLaunchArgument': Recorder, 'OpaqueFunction': Recorder},
               'launch.substitutions': {'LaunchConfiguration': LaunchConfiguration},
               'launch_ros': {}, 'launch_ros.actions': {'LifecycleNode': LifecycleNode}}
    for name, attributes in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location('specprune_launch_stand_in', LAUNCH_FILE)
    launch_file = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_file)
    description = launch_file.generate_launch_description()
    declared = [action.args[0] for action in description.args[0] if action.args]
    assert declared == [arg.name for arg in LAUNCH_ARGUMENTS] and 'use_sim_time' in declared
    (node,) = description.args[0][-1].kwargs['function'](None)
    assert isinstance(node, LifecycleNode)
    assert node.kwargs['namespace'] == '/arm' and node.kwargs['executable'] == 'specprune_node'
    assert node.kwargs['parameters'][1] == {'use_sim_time': True}
    assert node.kwargs['remappings'] == [('delta_twist_cmds', '/servo_node/delta_twist_cmds')]


@pytest.mark.parametrize('parameters', [NodeParameters, BridgeSettings])
def test_a_nodes_help_lists_every_parameter_with_its_default_and_meaning(parameters):
    text = parameters_help('specprune_node', 'The node.', parameters)
    defaults = parameters.defaults()
    for name, default in defaults.items():
        assert f'  {name} (default: {default!r})\n' in text
    described = [line for line in text.splitlines() if line.startswith('      ') and line.strip()]
    assert len(described) == len(dataclasses.fields(parameters))            # one meaning line per parameter


def test_help_is_asked_for_only_among_the_nodes_own_arguments():
    assert help_requested(['--help']) and help_requested(['-h', '--ros-args', '-p', 'model:=x'])
    assert not help_requested(['--ros-args', '-p', 'model:=--help']) and not help_requested([])
