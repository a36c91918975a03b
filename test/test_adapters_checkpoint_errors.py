"""OpenVLA / OpenVLA-OFT directories that must fail at load, with the file named, instead of acting wrongly."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from specprune_ros.adapters import detect_kind, load_adapter, load_adapter_policy
from specprune_ros.adapters.tiny import DATASET, llama_layout_tokenizer, write_tiny_checkpoint
from specprune_ros.models.loading import load_policy
from specprune_ros.policy.errors import CheckpointError

from conftest import copy

HEAD = 'action_head--100_checkpoint.pt'
PROJECTOR = 'proprio_projector--100_checkpoint.pt'


def write_json(path, value):
    path.write_text(json.dumps(value))


# -- an OpenVLA-OFT directory without a loadable action head is not plain OpenVLA ------------------------------

def test_oft_without_its_action_head_is_refused_not_loaded_as_openvla(prismatic_checkpoints, tmp_path):
    directory = copy(prismatic_checkpoints['openvla-oft'], tmp_path)
    (directory / HEAD).unlink()
    for load in (detect_kind, lambda d: load_policy(str(d)), lambda d: load_adapter(d, device='cpu')):
        with pytest.raises(CheckpointError, match=r'missing action_head--<step>_checkpoint\.pt.*'
                                                  r'proprio_projector--100_checkpoint\.pt'):
            load(directory)


def test_a_misnamed_action_head_is_named_in_the_error(prismatic_checkpoints, tmp_path):
    directory = copy(prismatic_checkpoints['openvla-oft'], tmp_path)
    (directory / HEAD).rename(directory / 'action_head--100.pt')
    with pytest.raises(CheckpointError, match=r'missing action_head--<step>_checkpoint\.pt; found '
                                              r'action_head--100\.pt'):
        load_policy(str(directory))


@pytest.mark.parametrize('options', [{'chunk_size': 8}, {'num_images': 2}, {'proprio': False}])
def test_oft_options_without_an_action_head_are_refused(prismatic_checkpoints, tmp_path, options):
    directory = copy(prismatic_checkpoints['openvla'], tmp_path)
    write_json(directory / 'specprune_adapter.json', options)
    key = next(iter(options))
    with pytest.raises(CheckpointError, match=f'missing action_head.*specprune_adapter.json "{key}"'):
        load_policy(str(directory))


def test_plain_openvla_still_loads_as_openvla(prismatic_checkpoints, tmp_path):
    directory = copy(prismatic_checkpoints['openvla'], tmp_path)
    write_json(directory / 'specprune_adapter.json', {'unnorm_key': DATASET, 'gripper': 'libero'})
    assert detect_kind(directory) == 'openvla'
    assert load_policy(str(directory)).backend.kind == 'openvla'


# -- the proprio projector is required unless the model is declared proprio-free ------------------------------

def test_oft_without_its_proprio_projector_is_refused(prismatic_checkpoints, tmp_path):
    directory = copy(prismatic_checkpoints['openvla-oft'], tmp_path)
    (directory / PROJECTOR).unlink()
    with pytest.raises(CheckpointError, match=r'missing proprio_projector--<step>_checkpoint\.pt.*"proprio": false'):
        load_policy(str(directory))
    (directory / 'proprio_projector--100.pt').write_bytes(b'')
    with pytest.raises(CheckpointError, match=r'found proprio_projector--100\.pt'):
        load_adapter(directory, device='cpu', dtype='float32')


def test_proprio_false_declares_a_model_without_proprio(prismatic_checkpoints, tmp_path):
    directory = copy(prismatic_checkpoints['openvla-oft'], tmp_path)
    (directory / PROJECTOR).unlink()
    write_json(directory / 'specprune_adapter.json', {'chunk_size': 8, 'proprio': False})
    adapter = load_adapter(directory, device='cpu', dtype='float32')
    assert adapter.proprio_projector is None and adapter.proprio_dim == 0
    policy = load_adapter_policy(copy(prismatic_checkpoints['openvla-oft'], tmp_path, 'arg'), device='cpu',
                                 dtype='float32', proprio=True)
    assert policy.backend.proprio_dim == 8
    written = write_tiny_checkpoint(tmp_path / 'no_proprio', 'openvla-oft', proprio=False)
    assert load_adapter(written, device='cpu', dtype='float32').proprio_dim == 0


@pytest.mark.parametrize('value, message', [(False, '"proprio": false but the checkpoint has proprio_projector'),
                                            ('no', 'proprio: expected true or false')])
def test_proprio_option_must_agree_with_the_files(prismatic_checkpoints, tmp_path, value, message):
    directory = copy(prismatic_checkpoints['openvla-oft'], tmp_path)
    write_json(directory / 'specprune_adapter.json', {'chunk_size': 8, 'proprio': value})
    with pytest.raises(CheckpointError, match=message):
        load_adapter(directory, device='cpu', dtype='float32')


# -- normalisation statistics are checked at load ---------------------------------------------------------------

def _null_first(values):
    return [None, *values[1:]]


STATS_CASES = [
    ('action', lambda s: s.update(q01=_null_first(s['q01'])), r"action: 'q01' must be a list of numbers"),
    ('action', lambda s: s.update(q01=[float('nan')] + s['q01'][1:]), r"action: 'q01' has non-finite values"),
    ('action', lambda s: s.update(q01=[str(v) for v in s['q01']]), r"action: 'q01' must be a list of numbers"),
    ('action', lambda s: s.update(q99=s['q99'][:6]), r"action: 'q99' has 6 values, expected 7"),
    ('action', lambda s: s.update(mask=s['mask'][:6]), r"action: 'mask' has 6 values, expected 7"),
    ('action', lambda s: s.update(mask=['true'] * 7), r"action: 'mask' must be a list of true/false"),
    ('action', lambda s: [s.pop('q01'), s.pop('q99')], r"action: no 'q01' \(normalisation 'bounds_q99'"),
    ('action', lambda s: s.update(q01=s['q99'], q99=s['q01']), r"action: 'q99' < 'q01' in dimension\(s\) \[0, 1"),
    ('proprio', lambda s: s.update(q01=_null_first(s['q01'])), r"proprio: 'q01' must be a list of numbers"),
    ('proprio', lambda s: s.update(q01=s['q01'][:6], q99=s['q99'][:6]), r"proprio: 'q01' has 6 values, expected 8"),
    ('proprio', lambda s: s.update(q01=s['q99'], q99=s['q01']), r"proprio: 'q99' < 'q01'"),
]


@pytest.mark.parametrize('entry, change, message', STATS_CASES)
def test_malformed_oft_statistics_fail_at_load_naming_file_and_key(prismatic_checkpoints, tmp_path, entry, change,
                                                                   message):
    directory = copy(prismatic_checkpoints['openvla-oft'], tmp_path)
    stats = json.loads((directory / 'dataset_statistics.json').read_text())
    change(stats[DATASET][entry])
    write_json(directory / 'dataset_statistics.json', stats)
    with pytest.raises(CheckpointError, match=rf'dataset_statistics\.json: {DATASET}\.{message}'):
        load_policy(str(directory))


def test_malformed_openvla_statistics_in_config_fail_at_load(prismatic_checkpoints, tmp_path):
    directory = copy(prismatic_checkpoints['openvla'], tmp_path)
    config = json.loads((directory / 'config.json').read_text())
    config['norm_stats'][DATASET]['action']['q01'][0] = None
    write_json(directory / 'config.json', config)
    with pytest.raises(CheckpointError, match=rf"config\.json norm_stats: {DATASET}\.action: 'q01'"):
        load_policy(str(directory))


def test_the_statistics_of_the_chosen_normalisation_are_checked(prismatic_checkpoints, tmp_path):
    directory = copy(prismatic_checkpoints['openvla-oft'], tmp_path)
    stats = json.loads((directory / 'dataset_statistics.json').read_text())
    stats[DATASET]['action']['max'] = stats[DATASET]['action']['min'][:5]
    write_json(directory / 'dataset_statistics.json', stats)
    assert load_adapter_policy(directory, device='cpu', dtype='float32').backend.action_dim == 7   # q01/q99
    with pytest.raises(CheckpointError, match=r"action: 'max' has 5 values"):
        load_adapter_policy(directory, device='cpu', dtype='float32', normalization='bounds')


# -- paths, weights format and tokenizer ------------------------------------------------------------------------

def test_a_file_path_names_its_directory(prismatic_checkpoints):
    path = prismatic_checkpoints['openvla'] / 'config.json'
    with pytest.raises(CheckpointError, match=rf'is a file, not a directory.*\({prismatic_checkpoints["openvla"]}\)'):
        load_policy(str(path))


def test_a_hugging_face_cache_root_points_at_its_snapshot(prismatic_checkpoints, tmp_path):
    root = tmp_path / 'models--openvla--openvla-7b'
    shutil.copytree(prismatic_checkpoints['openvla'], root / 'snapshots' / 'abc123')
    with pytest.raises(CheckpointError, match=r'Hugging Face cache.*snapshots/abc123'):
        load_policy(str(root))
    assert load_policy(str(root / 'snapshots' / 'abc123')).backend.kind == 'openvla'


def test_pickled_weights_get_a_conversion_hint(tmp_path):
    directory = write_tiny_checkpoint(tmp_path / 'single', 'openvla', shards=1)
    torch.save(load_file(str(directory / 'model.safetensors')), directory / 'pytorch_model.bin')
    (directory / 'model.safetensors').unlink()
    with pytest.raises(CheckpointError, match=r'found pytorch_model\.bin: only safetensors.*convert'):
        load_policy(str(directory))


def test_a_tokenizer_of_another_vocabulary_is_refused(prismatic_checkpoints, tmp_path):
    directory = copy(prismatic_checkpoints['openvla'], tmp_path)
    llama_layout_tokenizer(300, seed=5, exact=False).save(str(directory / 'tokenizer.json'))
    with pytest.raises(CheckpointError, match=r'tokenizer has 300 pieces.*implies 384'):
        load_policy(str(directory))


# -- specprune_adapter.json: each value's type and range is checked at load --------------------------------------

BAD_OPTIONS = [
    ({'center_crop': 'false'}, 'center_crop: expected true or false'),      # a truthy string cropped every frame
    ({'lowercase_instruction': 'no'}, 'lowercase_instruction: expected true or false'),
    ({'cuda_graphs': 'false'}, 'cuda_graphs: expected true or false'),
    ({'chunk_size': '8'}, 'chunk_size: expected an integer'),
    ({'chunk_size': 0}, r'chunk_size: 0 is outside \[1, inf\)'),
    ({'num_images': 0}, r'num_images: 0 is outside \[1, inf\)'),
    ({'num_images': 2.5}, 'num_images: expected an integer'),
    ({'control_period_s': 0}, r'control_period_s: 0.0 is outside \(0, inf\)'),      # twists divide by it
    ({'control_period_s': -0.1}, r'control_period_s: -0.1 is outside \(0, inf\)'),  # reversed every motion
    ({'translation_scale_m': float('nan')}, 'translation_scale_m: nan is not finite'),
    ({'rotation_scale_rad': -0.2}, r'rotation_scale_rad: -0.2 is outside'),
    ({'camera_names': 'agentview'}, 'camera_names: expected a list'),       # read as nine one-letter cameras
    ({'camera_names': ['agentview', 'agentview']}, 'camera_names: one non-empty name per camera, no duplicates'),
    ({'camera_names': ['agentview', '']}, 'camera_names: one non-empty name per camera'),
    ({'unnorm_key': 5}, 'unnorm_key: expected a string'),
    ({'prompt_template': 3}, 'prompt_template: expected a string'),
    ({'attn_implementation': 'flash'}, "attn_implementation must be one of \\['sdpa', 'eager'\\]"),
]


@pytest.mark.parametrize('options, message', BAD_OPTIONS, ids=[str(o) for o, _ in BAD_OPTIONS])
def test_bad_adapter_options_fail_at_load_naming_the_option(prismatic_checkpoints, tmp_path, options, message):
    directory = copy(prismatic_checkpoints['openvla-oft'], tmp_path)
    write_json(directory / 'specprune_adapter.json', options)
    with pytest.raises(CheckpointError, match=f'malformed specprune_adapter.json: .*{message}'):
        load_policy(str(directory))


def test_good_adapter_options_load_as_written(prismatic_checkpoints, tmp_path):
    directory = copy(prismatic_checkpoints['openvla-oft'], tmp_path)
    write_json(directory / 'specprune_adapter.json',
               {'center_crop': False, 'lowercase_instruction': False, 'camera_names': ['front', 'hand'],
                'control_period_s': 0.05, 'chunk_size': 8.0, 'prompt_template': 'In: {instruction}? {{x}}\nOut:'})
    backend = load_policy(str(directory)).backend
    assert backend.transform.center_crop is False and backend.lowercase_instruction is False
    assert backend.camera_names == ('front', 'hand') and backend.action_spec.control_period_s == 0.05


def test_a_prompt_template_with_another_field_fails_at_load_not_at_every_step(prismatic_checkpoints, tmp_path):
    directory = copy(prismatic_checkpoints['openvla'], tmp_path)
    write_json(directory / 'specprune_adapter.json', {'prompt_template': 'In: {task} {instruction}\nOut:'})
    with pytest.raises(ValueError, match=r"prompt_template .*only \{instruction\} can be filled in"):
        load_policy(str(directory))


# -- an ALOHA / Bridge OFT checkpoint needs its platform's chunk length and normalisation ------------------------

def _renamed_statistics(directory, key):
    for name in ('config.json', 'dataset_statistics.json'):
        path = directory / name
        if path.exists():
            document = json.loads(path.read_text())
            stats = document['norm_stats'] if name == 'config.json' else document
            stats[key] = stats.pop(DATASET)
            path.write_text(json.dumps(document))


@pytest.mark.parametrize('key, options, message', [
    ('aloha1_put_x_into_pot_300_demos', {}, r'"chunk_size" \(aloha fine-tunes use 25\), "normalization" '
                                            r"\(aloha fine-tunes use 'bounds'\)"),
    ('aloha1_put_x_into_pot_300_demos', {'chunk_size': 25}, r'"normalization" \(aloha'),
    ('bridge_orig', {'normalization': 'bounds_q99'}, r'"chunk_size" \(bridge fine-tunes use 5\)'),
])
def test_an_aloha_or_bridge_oft_checkpoint_is_not_run_with_liberos_defaults(prismatic_checkpoints, tmp_path,
                                                                            key, options, message):
    directory = copy(prismatic_checkpoints['openvla-oft'], tmp_path)
    _renamed_statistics(directory, key)
    write_json(directory / 'specprune_adapter.json', options)
    with pytest.raises(CheckpointError, match=message):
        load_adapter(directory, device='cpu', dtype='float32')
    write_json(directory / 'specprune_adapter.json', {'chunk_size': 25 if 'aloha' in key else 5,
                                                      'normalization': 'bounds' if 'aloha' in key else 'bounds_q99'})
    adapter = load_adapter(directory, device='cpu', dtype='float32')
    assert adapter.chunk_size == (25 if 'aloha' in key else 5) and adapter.unnorm_key == key
