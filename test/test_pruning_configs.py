"""Method settings are type- and range-checked when the method is built, naming the setting."""
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from specprune_ros.control.parameters import NodeParameters
from specprune_ros.core.dataclass_mapping import InvalidTypeError
from specprune_ros.pruning import available_methods, build_method, method_config
from specprune_ros.pruning.methods.coverage_ranked import CoverageRankedConfig
from specprune_ros.pruning.methods.fastv import FastVConfig
from specprune_ros.pruning.methods.specprune import SpecPruneConfig

ROOT = Path(__file__).resolve().parents[1]

# (method, settings, fragment of the message: the setting and, where it says, the value)
BAD_SETTINGS = [
    # every method: the base settings
    ('random', {'num_layers': 0}, 'num_layers: 0 is outside [1, inf)'),
    ('random', {'num_layers': 6.5}, 'num_layers: expected an integer, got 6.5'),
    ('specprune', {'max_gap_s': 'x'}, "max_gap_s: expected a number, got 'x'"),
    ('vla_cache', {'max_gap_s': float('inf')}, 'max_gap_s: inf is not finite'),
    ('fastv', {'reset_on_step_index': 'no'}, "reset_on_step_index: expected true or false, got 'no'"),
    # random
    ('random', {'keep_ratio': -0.5}, 'keep_ratio: -0.5 is outside [0, 1]'),
    ('random', {'keep_ratio': 1.5}, 'keep_ratio: 1.5 is outside [0, 1]'),
    ('random', {'keep_ratio': '0.5'}, "keep_ratio: expected a number, got '0.5'"),
    ('random', {'keep_ratio': True}, 'keep_ratio: expected a number, got True'),
    ('random', {'keep_ratio': float('nan')}, 'keep_ratio: nan is not finite'),
    ('random', {'per_camera': 'no'}, "per_camera: expected true or false, got 'no'"),
    # fastv
    ('fastv', {'keep_ratio': -0.1}, 'keep_ratio: -0.1 is outside [0, 1]'),
    ('fastv', {'keep_ratio': '0.5'}, "keep_ratio: expected a number, got '0.5'"),
    ('fastv', {'prune_layer': 0}, 'prune_layer: 0 is outside [1, inf)'),
    ('fastv', {'prune_layer': -1}, 'prune_layer: -1 is outside [1, inf)'),
    ('fastv', {'prune_layer': 2.5}, 'prune_layer: expected an integer, got 2.5'),
    ('fastv', {'rows': 'bogus'}, "FastVConfig.rows must be one of ['text', 'action', 'text_action', 'prefill',"),
    # divprune
    ('divprune', {'keep_ratio': -0.1}, 'keep_ratio: -0.1 is outside [0, 1]'),
    ('divprune', {'keep_ratio': '0.5'}, "keep_ratio: expected a number, got '0.5'"),
    # vla_pruner
    ('vla_pruner', {'keep_ratio': -0.1}, 'keep_ratio: -0.1 is outside [0, 1]'),
    ('vla_pruner', {'keep_ratio': 2.0}, 'keep_ratio: 2.0 is outside [0, 1]'),
    ('vla_pruner', {'gamma': -1.0}, 'gamma: -1.0 is outside (0, 1]'),
    ('vla_pruner', {'gamma': 0}, 'gamma: 0.0 is outside (0, 1]'),
    ('vla_pruner', {'gamma': '0.8'}, "gamma: expected a number, got '0.8'"),
    ('vla_pruner', {'fusion_weight': 2.0, 'combine': 'sum'}, 'fusion_weight: 2.0 is outside [0, 1]'),
    ('vla_pruner', {'prune_layer': 0}, 'prune_layer: 0 is outside [1, inf)'),
    ('vla_pruner', {'window': 0}, 'window: 0 is outside [1, inf)'),
    ('vla_pruner', {'window': -1, 'use_action': False}, 'window: -1 is outside [0, inf)'),
    ('vla_pruner', {'action_layer': 1.5}, 'action_layer: expected an integer, got 1.5'),
    ('vla_pruner', {'use_semantic': False, 'use_action': False}, 'use_semantic, use_action: both false'),
    # vla_cache
    ('vla_cache', {'similarity_threshold': 2.0}, 'similarity_threshold: 2.0 is outside [-1, 1]'),
    ('vla_cache', {'max_static_fraction': -1.0}, 'max_static_fraction: -1.0 is outside [0, 1]'),
    ('vla_cache', {'max_static_fraction': 1.5}, 'max_static_fraction: 1.5 is outside [0, 1]'),
    ('vla_cache', {'task_relevant_fraction': -1.0}, 'task_relevant_fraction: -1.0 is outside [0, 1]'),
    ('vla_cache', {'max_consecutive_reuse': -1}, 'max_consecutive_reuse: -1 is outside [0, inf)'),
    ('vla_cache', {'attention_layer': 'deep'}, "attention_layer: expected an integer, got 'deep'"),
    # coverage_ranked
    ('coverage_ranked', {'keep_ratio': 0.0}, 'keep_ratio: 0.0 is outside (0, 1]'),
    ('coverage_ranked', {'keep_ratio': '0.2'}, "keep_ratio: expected a number, got '0.2'"),
    ('coverage_ranked', {'fine_keep_ratio': 1.5}, 'fine_keep_ratio: 1.5 is outside (0, 1]'),
    ('coverage_ranked', {'early_keep_ratio': -1.0}, 'early_keep_ratio: -1.0 is outside [0, 1]'),
    ('coverage_ranked', {'early_keep_ratio': '0.5'}, "early_keep_ratio: expected a number, got '0.5'"),
    ('coverage_ranked', {'cells': [0, 4]}, 'cells[0]: 0 is outside [1, inf)'),
    ('coverage_ranked', {'cells': [4, '4']}, "cells[1]: expected an integer, got '4'"),
    ('coverage_ranked', {'cells': [4, 4, 4]}, 'cells: (4, 4, 4) is not (rows, cols)'),
    ('coverage_ranked', {'cell_quota': -1}, 'cell_quota: -1 is outside [0, inf)'),
    ('coverage_ranked', {'smoothing': 0}, 'smoothing: 0.0 is outside (0, 1]'),
    ('coverage_ranked', {'forget': 1.5}, 'forget: 1.5 is outside [0, 1]'),
    ('coverage_ranked', {'prior': -0.5}, 'prior: -0.5 is outside [0, 1]'),
    ('coverage_ranked', {'explore': 50.0}, 'explore: 50.0 is outside [0, 10]'),
    ('coverage_ranked', {'warmup_steps': -1}, 'warmup_steps: -1 is outside [0, inf)'),
    ('coverage_ranked', {'refine_layer': 2.5}, 'refine_layer: expected an integer, got 2.5'),
    ('coverage_ranked', {'controller': {'paper_speed': -0.4}}, 'controller.paper_speed: -0.4 is outside [0, inf)'),
    # specprune (and its presets)
    ('specprune', {'layer_drop_fraction': -0.5}, 'layer_drop_fraction: -0.5 is outside [0, 1]'),
    ('specprune', {'layer_drop_fraction': 1.5}, 'layer_drop_fraction: 1.5 is outside [0, 1]'),
    ('specprune', {'min_visual_fraction': 2.0}, 'min_visual_fraction: 2.0 is outside [0, 1]'),
    ('specprune', {'importance_beta': 2.0}, 'importance_beta: 2.0 is outside (0, 1]'),
    ('specprune', {'importance_k': -5.0}, 'importance_k: -5.0 is outside [0, inf)'),
    ('specprune', {'static_gathers': 0}, 'static_gathers: 0 is not 1 or 2'),
    ('specprune', {'static_gathers': 3}, 'static_gathers: 3 is not 1 or 2'),
    ('specprune', {'global_k_scale': -1.0}, 'global_k_scale: -1.0 is outside [0, inf)'),
    ('specprune', {'layer0_k_scale': -1.0}, 'layer0_k_scale: -1.0 is outside [0, inf)'),
    ('specprune', {'global_layer': '-1'}, "global_layer: expected an integer, got '-1'"),
    ('specprune', {'layer_prune_layers': [2, 'x']}, "layer_prune_layers[1]: expected an integer, got 'x'"),
    ('specprune', {'importance_layers': [1.5]}, 'importance_layers[0]: expected an integer, got 1.5'),
    ('specprune', {'controller': {'alpha': -1.0}}, 'controller.alpha: -1.0 is outside [0, inf)'),
    ('specprune', {'controller': {'alpha': 'x'}}, "controller.alpha: expected a number, got 'x'"),
    ('specprune', {'controller': {'k_fine': -40}}, 'controller.k_fine: -40.0 is outside [0, inf)'),
    ('specprune', {'controller': {'reference_patches': 0}}, 'controller.reference_patches: 0 is outside [1, inf)'),
    ('specprune', {'controller': {'warmup_actions': -1}}, 'controller.warmup_actions: -1 is outside [0, inf)'),
    ('specprune', {'controller': {'camera_scale': [1.0, -0.5]}}, 'controller.camera_scale[1]: -0.5 is outside'),
    ('specprune', {'controller': {'camera_scale': ['1']}}, "controller.camera_scale[0]: expected a number, got '1'"),
    ('specprune', {'change': {'threshold': 'x'}}, "change.threshold: expected a number, got 'x'"),
    ('specprune', {'change': {'threshold': 1.5}}, 'change.threshold: 1.5 is outside [-1, 1]'),
    ('specprune', {'change': {'min_reference_back': 0}}, 'change.min_reference_back: 0 is outside [2, inf)'),
    ('specprune', {'change': {'min_reference_back': 4, 'max_reference_back': 3}},
     'change.max_reference_back: 3 is outside [4, inf)'),
    ('specprune', {'change': {'max_changed_fraction': -0.5}}, 'change.max_changed_fraction: -0.5 is outside [0, 1]'),
    ('specprune', {'change': {'max_static_fraction_fine': 1.1}}, 'change.max_static_fraction_fine: 1.1 is outside'),
    ('specprune_static', {'layer_drop_fraction': 2.0}, 'layer_drop_fraction: 2.0 is outside [0, 1]'),
    ('specprune_static_layer', {'controller': {'alpha': -0.8}}, 'controller.alpha: -0.8 is outside [0, inf)'),
    # none
    ('none', {'attention': [[0, 'bogus']]}, "attention[0] rows must be one of ['text',"),
    ('none', {'attention': ['x:text']}, "attention[0] layer: expected an integer, got 'x'"),
    ('none', {'attention': [[0, 'text', 1]]}, 'attention[0]: [0, \'text\', 1] is not (layer, rows)'),
    ('none', {'self_speculation': 1}, 'self_speculation: expected true or false, got 1'),
]


def test_every_method_has_bad_settings_in_the_table():
    assert {method for method, _, _ in BAD_SETTINGS} == set(available_methods())


@pytest.mark.parametrize('method, settings, fragment', BAD_SETTINGS,
                         ids=[f'{m}-{"-".join(map(str, s))}' for m, s, _ in BAD_SETTINGS])
def test_a_bad_setting_is_refused_when_the_method_is_built(method, settings, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        build_method(method, settings)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        method_config(method, settings)


def test_a_wrong_type_is_a_type_error_too():
    with pytest.raises(TypeError, match='keep_ratio') as error:
        build_method('random', {'keep_ratio': '0.5'})
    assert isinstance(error.value, InvalidTypeError) and error.value.path == 'keep_ratio'


def test_a_config_constructed_directly_is_checked_too():
    with pytest.raises(ValueError, match=re.escape("keep_ratio: expected a number, got '0.5'")):
        FastVConfig(keep_ratio='0.5')
    with pytest.raises(ValueError, match=re.escape('prune_layer: 0 is outside [1, inf)')):
        FastVConfig(prune_layer=0)
    with pytest.raises(ValueError, match=re.escape('controller.alpha: -1.0 is outside')):
        SpecPruneConfig(controller=dataclasses.replace(SpecPruneConfig().controller, alpha=-1.0))
    with pytest.raises(ValueError, match=re.escape('change.min_reference_back: 1 is outside [2, inf)')):
        SpecPruneConfig(change=dataclasses.replace(SpecPruneConfig().change, min_reference_back=1))
    with pytest.raises(ValueError, match='fine_keep_ratio'):
        dataclasses.replace(CoverageRankedConfig(), fine_keep_ratio=1.5)


@pytest.mark.parametrize('method', sorted(available_methods()))
def test_defaults_build(method):
    assert build_method(method).name == method


VALID_SETTINGS = [
    ('random', {'keep_ratio': 0.0}),                         # the floor: one token per camera
    ('random', {'keep_ratio': 1}),                           # an int for a float setting
    ('fastv', {'keep_ratio': 0.25, 'prune_layer': 2.0}),      # an integral float for an int setting
    ('fastv', {'prune_layer': 1, 'rows': 'text'}),
    ('vla_pruner', {'keep_ratio': 0.25, 'window': 3, 'prune_layer': 2, 'gamma': 1.0}),
    ('vla_pruner', {'window': 0, 'use_action': False}),
    ('vla_pruner', {'prune_layer': None, 'action_layer': -2}),
    ('vla_cache', {'similarity_threshold': -1.0, 'max_consecutive_reuse': 1, 'attention_layer': -1}),
    ('coverage_ranked', {'keep_ratio': 0.35, 'fine_keep_ratio': 0.45}),
    ('coverage_ranked', {'early_keep_ratio': 0.0, 'refine_layer': -2, 'cells': [3, 3], 'cell_quota': 0}),
    ('specprune', {'controller': {'alpha': 0.8, 'camera_scale': [1, 0.5]}, 'static_gathers': 1}),
    ('specprune', {'change': {'max_changed_fraction': 1.0, 'min_reference_back': 2, 'max_reference_back': 2},
                   'importance_every_layer': True, 'layer_prune_layers': [2, -2], 'controller': {'enter_z': -0.1}}),
    ('none', {'attention': [[0, 'text'], '-1:action'], 'self_speculation': True}),
    ('random', {'keep_regions': [[1, 0, 0, 1, 1]], 'max_gap_s': 0}),
]


@pytest.mark.parametrize('method, settings', VALID_SETTINGS)
def test_valid_settings_build_with_the_fields_types(method, settings):
    config = build_method(method, settings).config
    defaults = type(config)()
    for name, value in settings.items():
        if not isinstance(value, dict):
            assert getattr(config, name) == (tuple(value) if isinstance(value, list) else value)
        if isinstance(getattr(defaults, name), (int, float)):
            assert type(getattr(config, name)) is type(getattr(defaults, name))


def test_integral_floats_become_ints_and_ints_floats():
    config = method_config('fastv', {'prune_layer': 2.0, 'keep_ratio': 1})
    assert config.prune_layer == 2 and type(config.prune_layer) is int
    assert config.keep_ratio == 1.0 and type(config.keep_ratio) is float
    nested = method_config('specprune', {'controller': {'camera_scale': [1, 2], 'warmup_actions': 3.0}})
    scales = nested.controller.camera_scale
    assert scales == (1.0, 2.0) and all(type(s) is float for s in scales)
    assert type(nested.controller.warmup_actions) is int


def _node_method_settings(path: Path) -> tuple[str, dict]:
    values = yaml.safe_load(path.read_text())['/**']['ros__parameters']
    return values['method'], yaml.safe_load(values['method_config']) or {}


@pytest.mark.parametrize('name', ['specprune.yaml', 'openvla_oft.yaml'])
def test_the_shipped_parameter_files_method_settings_build(name):
    method, settings = _node_method_settings(ROOT / 'config' / name)
    build_method(method, settings)


def test_the_documented_examples_build():
    examples = [('fastv', {'keep_ratio': 0.25}), ('specprune', {'controller': {'alpha': 0.8}}),
                ('specprune', {'keep_regions': [[1, 0, 0, 1, 1]]}),
                ('coverage_ranked', {'keep_ratio': 0.35, 'fine_keep_ratio': 0.45}),
                ('specprune', {'change': {'max_changed_fraction': 1.0}, 'importance_every_layer': True})]
    for method, settings in examples:
        build_method(method, settings)


@pytest.mark.parametrize('method, setting, value, fragment', [
    ('vla_cache', 'similarity_threshold', 2.0, 'similarity_threshold: 2.0 is outside [-1, 1]'),
    ('specprune', 'static_gathers', 0, 'static_gathers: 0 is not 1 or 2'),
    ('specprune', 'change.threshold', 'x', "change.threshold: expected a number, got 'x'"),
    ('fastv', 'prune_layer', 2.5, 'prune_layer: expected an integer, got 2.5'),
    ('coverage_ranked', 'early_keep_ratio', -1.0, 'early_keep_ratio: -1.0 is outside [0, 1]'),
])
def test_the_node_refuses_a_bad_method_setting_at_configure_time(method, setting, value, fragment):
    params = NodeParameters.from_mapping({'method': method, f'method_settings.{setting}': value})
    errors = params.validate()
    assert len(errors) == 1 and errors[0].startswith(f'method_config / method_settings for method {method!r}: '
                                                     f'{fragment}'), errors
    good = NodeParameters.from_mapping({'method': method})
    assert good.validate() == []
