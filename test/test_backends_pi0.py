"""pi0 / pi0.5 on tiny random checkpoints in LeRobot's layout.

Executor vs the model's own forward, every method, action-row attention from the expert, normalisation, and errors that
name the file at fault.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from specprune_ros.adapters.pi0.backend import Pi0Backend
from specprune_ros.adapters.pi0.checkpoint import is_pi0_directory, load_checkpoint
from specprune_ros.adapters.pi0.inference import Pi0Inference
from specprune_ros.adapters.pi0.processing import FeatureStats, discretise_state, resize_with_pad
from specprune_ros.adapters.pi0.tiny import write_tiny_checkpoint
from specprune_ros.codecs.image_decoding import fit_to
from specprune_ros.core.fixed_plan import FixedKeepSchedule
from specprune_ros.models.loading import load_policy
from specprune_ros.policy.errors import CheckpointError, ObservationError
from specprune_ros.policy.interface import Observation
from specprune_ros.pruning import build_method
from specprune_ros.pruning.registry import available_methods

INSTRUCTION = 'pick up the black bowl and place it on the plate'


@pytest.fixture(scope='module')
def pi0_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp('pi0'), 'pi0', seed=1)


@pytest.fixture(scope='module')
def pi05_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp('pi05'), 'pi05', seed=2)


def inference(directory, dtype=torch.float32, **kwargs) -> Pi0Inference:
    return Pi0Inference(load_checkpoint(directory, dtype=dtype), torch.device('cpu'), dtype, **kwargs)


def images(step: int = 0, height: int = 64, width: int = 80) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for cam in range(2):
        image = rng.integers(40, 200, size=(height, width, 3), dtype=np.uint8)
        image[4 + 4 * step:20 + 4 * step, 8 + 20 * cam:28 + 20 * cam] = (30, 220, 30)
        out.append(image)
    return out


def state(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=8).astype(np.float32)


@pytest.mark.parametrize('kind', ['pi0', 'pi05'])
def test_keep_all_through_the_executor_equals_the_models_own_forward(kind, pi0_dir, pi05_dir):
    model = inference(pi0_dir if kind == 'pi0' else pi05_dir, dtype=torch.float64)
    inp = model.encode(images(), INSTRUCTION, state())
    noise = model.sample_noise()
    for method in (None, build_method('none')):
        actions, result, _ = model.run(inp, method, model.context(inp, instruction=INSTRUCTION), noise)
        reference = model.reference(inp, noise)
        assert actions.shape == (50, 7)
        np.testing.assert_allclose(actions, reference, rtol=0, atol=1e-9)
        assert result.record.flops == pytest.approx(result.record.flops_full)
    # another noise draw gives another chunk: the flow starts from the noise
    other, _, _ = model.run(inp, None, None, model.sample_noise())
    assert np.abs(other - actions).max() > 1e-3


def test_pruning_changes_the_chunk_and_saves_prefix_and_expert_flops(pi0_dir):
    model = inference(pi0_dir)
    inp = model.encode(images(), INSTRUCTION, state())
    noise = model.sample_noise()
    full, _, _ = model.run(inp, None, None, noise)
    keep = inp.layout.visual_indices()[::2]
    pruned, result, _ = model.run(inp, FixedKeepSchedule(keep_before=keep), None, noise)
    record = result.record
    assert record.visual_kept_per_layer == [16] * 3
    assert record.info['expert_flops'] < record.info['expert_flops_full']
    assert record.info['prefix_flops'] < record.info['prefix_flops_full']
    assert np.abs(pruned - full).max() > 1e-4


@pytest.mark.parametrize('name', available_methods())
def test_every_method_runs_on_pi0_and_gives_finite_chunks(name, pi0_dir):
    model = inference(pi0_dir)
    method = build_method(name, seed=0)
    kept, reused = [], []
    for step in range(6):
        inp = model.encode(images(step), INSTRUCTION, state(step))
        actions, result, _ = model.run(inp, method, model.context(inp, step_index=step, instruction=INSTRUCTION))
        assert actions.shape == (50, 7) and np.isfinite(actions).all()
        kept.append(result.record.mean_visual_kept)
        reused.append(0 if result.record.reused is None else len(result.record.reused))
    if name == 'vla_cache':
        assert max(reused) > 0, 'vla_cache never reused keys/values'
    elif name != 'none':
        assert min(kept) < inp.layout.num_visual, f'{name} never pruned'


@pytest.mark.parametrize('name', ['vla_cache', 'specprune', 'vla_pruner'])
def test_device_side_checks_keep_and_reuse_what_host_side_checks_do(name, pi0_dir):
    """An accelerator checks keep / reuse sets on the device (no host sync); run here that path gives the same sets."""
    runs = {}
    for on_host in (True, False):
        model = inference(pi0_dir)
        model.runner.validate_on_host = on_host
        method = build_method(name, seed=0)
        sets = []
        for step in range(4):
            inp = model.encode(images(step), INSTRUCTION, state(step))
            _, result, _ = model.run(inp, method, model.context(inp, step_index=step, instruction=INSTRUCTION))
            reused = result.record.reused
            sets.append((result.record.visual_kept_per_layer, None if reused is None else reused.tolist()))
        runs[on_host] = sets
    assert runs[False] == runs[True]
    if name == 'vla_cache':
        assert any(reused for _, reused in runs[False]), 'nothing reused: the check path was not exercised'


def test_methods_run_on_pi05(pi05_dir):
    model = inference(pi05_dir)
    for name in ('vla_pruner', 'specprune', 'fastv'):
        method = build_method(name, seed=0)
        for step in range(5):
            inp = model.encode(images(step), INSTRUCTION, state(step))
            actions, _, _ = model.run(inp, method, model.context(inp, step_index=step, instruction=INSTRUCTION))
            assert actions.shape == (50, 7) and np.isfinite(actions).all()


def test_action_rows_are_the_experts_action_queries(pi0_dir):
    model = inference(pi0_dir)
    method = build_method('vla_pruner', {'warmup': False}, seed=0)
    inp = model.encode(images(), INSTRUCTION, state())
    _, result, _ = model.run(inp, method, model.context(inp, instruction=INSTRUCTION))
    record = result.record
    layer = model.runner.num_layers - 1
    keys, weights = record.attention[layer]['vlap_action']
    assert torch.equal(keys, result.cache.positions[layer])
    assert 'action queries' in record.info['action_rows']
    assert 'rows_fallback' not in record.info                   # 'action' rows existed in the method's layout
    # the summary is the expert's: the probability mass its 50 action rows put on the prefix keys (the rest is
    # on the expert's own keys), over every prefix key
    assert len(weights) == len(keys) and len(keys) < inp.layout.num_tokens    # pruned before this layer
    assert 0.0 < float(weights.sum()) < 1.0
    assert np.isfinite(weights.numpy()).all()
    # the method read it: its action history holds one step
    assert len(method.state.action_attention) == 1


def test_text_action_rows_mix_text_and_expert_rows(pi0_dir):
    model = inference(pi0_dir)
    method = build_method('specprune', {'task_rows': 'text_action'}, seed=0)
    inp = model.encode(images(), INSTRUCTION, state())
    _, result, _ = model.run(inp, method, model.context(inp, instruction=INSTRUCTION))
    entry = result.record.attention[0]['text_action']
    text_only = build_method('none', {'attention': [[0, 'text']]})
    _, plain, _ = model.run(inp, text_only, None, model.sample_noise())
    assert entry[1].shape == plain.record.attention[0]['text'][1].shape
    assert not torch.allclose(entry[1].float(), plain.record.attention[0]['text'][1].float())


def test_normalisation_round_trips_on_known_values():
    mean_std = FeatureStats('MEAN_STD', {'mean': np.array([1.0, -2.0], np.float32),
                                         'std': np.array([2.0, 0.5], np.float32)})
    np.testing.assert_allclose(mean_std.normalize([3.0, -1.0]), [1.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(mean_std.unnormalize([1.0, 2.0]), [3.0, -1.0], rtol=1e-6)
    quantiles = FeatureStats('QUANTILES', {'q01': np.array([-1.0, 0.0], np.float32),
                                           'q99': np.array([3.0, 10.0], np.float32)})
    np.testing.assert_allclose(quantiles.normalize([1.0, 10.0]), [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(quantiles.unnormalize([0.0, -1.0]), [1.0, 0.0], atol=1e-6)
    min_max = FeatureStats('MIN_MAX', {'min': np.array([0.0], np.float32), 'max': np.array([4.0], np.float32)})
    np.testing.assert_allclose(min_max.unnormalize(min_max.normalize([3.0])), [3.0], rtol=1e-6)
    values = np.array([0.3, -0.7], np.float32)
    for stats in (mean_std, quantiles):
        np.testing.assert_allclose(stats.unnormalize(stats.normalize(values)), values, atol=1e-6)


def test_checkpoint_statistics_are_used(pi0_dir, pi05_dir):
    stats = load_file(str(pi0_dir / 'policy_preprocessor_step_5_normalizer_processor.safetensors'))
    model = inference(pi0_dir)
    mean = stats['observation.state.mean'].numpy()
    np.testing.assert_allclose(model.normalized_state(mean), np.zeros(32), atol=1e-6)
    assert model.normalization.action.mode == 'MEAN_STD'
    np.testing.assert_allclose(model.unnormalize(np.zeros((50, 7), np.float32))[0], stats['action.mean'].numpy(),
                               rtol=1e-6)
    pi05 = inference(pi05_dir)
    assert pi05.normalization.state.mode == 'QUANTILES'
    q99 = load_file(str(pi05_dir / 'policy_preprocessor_step_2_normalizer_processor.safetensors'))
    np.testing.assert_allclose(pi05.normalized_state(q99['observation.state.q99'].numpy())[:8], np.ones(8),
                               atol=1e-6)


def test_pi05_state_tokens_and_prompt(pi05_dir):
    assert discretise_state(np.array([-1.0, 0.0, 0.999, 1.0])).tolist() == [0, 128, 255, 255]
    model = inference(pi05_dir)
    inp = model.encode(images(), INSTRUCTION, state())
    layout = inp.layout
    assert layout.proprio_span[1] > layout.proprio_span[0] > layout.text_span[1] > layout.text_span[0] > 32
    assert model.suffix_length == 50


def test_the_pi05_prompt_holds_the_robots_own_state_values_not_the_padding(pi05_dir):
    """An 8-D state gives 8 state numbers in the prompt (LeRobot 0.5+ / openpi), not 32 with 24 padding zeros."""
    model = inference(pi05_dir)
    normalized = model.normalized_state(state())
    assert normalized.shape == (32,) and not normalized[8:].any()           # the action expert's padded state
    bins = np.digitize(normalized[:8].astype(np.float64), np.linspace(-1, 1, 257)[:-1]) - 1
    expected = f"Task: {INSTRUCTION}, State: {' '.join(str(b) for b in bins)};\nAction: "
    encoded = model.prompt(INSTRUCTION, normalized)
    assert encoded.ids == model.tokenizer(expected, add_special_tokens=True)['input_ids']
    state_tokens = model.tokenizer.decode(encoded.ids[encoded.state[0]:encoded.state[1]])
    assert state_tokens.split() == [str(b) for b in bins]


def test_the_node_fits_camera_frames_to_pi0_as_resize_with_pad_does(pi0_dir):
    """A 640 x 480 camera: the node pads (not stretches) it to the square input; the model's own resize is a no-op."""
    policy = load_policy(str(pi0_dir))
    side = policy.image_size[0]
    assert policy.image_fit == 'pad' and policy.image_size == (side, side)
    yy, xx = np.mgrid[0:480, 0:640]
    frame = np.stack([xx * 255 // 639, yy * 255 // 479, (xx + yy) % 256], axis=-1).astype(np.uint8)
    fitted = fit_to(frame, policy.image_size, policy.image_fit)
    _, lerobot = resize_with_pad(frame, side)
    inner = int(480 / (640 / side))
    top = (side - inner) // 2
    assert fitted.shape == lerobot.shape == (side, side, 3)
    assert (fitted[:top] == 0).all() and (fitted[top + inner:] == 0).all() and fitted[top:top + inner].any(-1).all()
    assert np.abs(fitted.astype(int) - lerobot.astype(int)).mean() < 1.0
    _, shown = resize_with_pad(fitted, side)
    np.testing.assert_array_equal(shown, fitted)


def test_resize_with_pad_keeps_the_aspect_and_pads_black():
    frame = np.full((40, 80, 3), 255, dtype=np.uint8)
    pixels, shown = resize_with_pad(frame, 56)
    assert pixels.shape == (3, 56, 56) and shown.shape == (56, 56, 3)
    assert float(pixels.min()) == -1.0 and float(pixels.max()) == 1.0
    assert (shown[:14] == 0).all() and (shown[14:42] == 255).all() and (shown[42:] == 0).all()


def test_observation_errors(pi0_dir):
    model = inference(pi0_dir)
    with pytest.raises(ValueError, match='robot state'):
        model.encode(images(), INSTRUCTION, None)
    with pytest.raises(ValueError, match='expects 8'):
        model.encode(images(), INSTRUCTION, np.zeros(5))
    with pytest.raises(ValueError, match='NaN'):
        model.encode(images(), INSTRUCTION, np.full(8, np.nan))
    with pytest.raises(ValueError, match='2 camera'):
        model.encode(images()[:1], INSTRUCTION, state())


def test_an_absent_camera_is_left_out_of_the_sequence(pi0_dir):
    model = inference(pi0_dir, dtype=torch.float64)
    frames = images()
    inp = model.encode({'left_wrist_0_rgb': frames[1]}, INSTRUCTION, state())
    assert inp.layout.num_cameras == 1 and inp.layout.camera_spans == ((0, 16),)
    both = model.encode(dict(zip(model.config.camera_names, frames)), INSTRUCTION, state())
    torch.testing.assert_close(both.embeddings, model.encode(frames, INSTRUCTION, state()).embeddings)
    torch.testing.assert_close(inp.embeddings[0, :16], both.embeddings[0, 16:32])
    noise = model.sample_noise()
    actions, _, _ = model.run(inp, build_method('fastv'), model.context(inp, instruction=INSTRUCTION), noise)
    assert np.isfinite(actions).all()
    np.testing.assert_allclose(model.run(inp, None, None, noise)[0], model.reference(inp, noise), atol=1e-9)
    with pytest.raises(ValueError, match='unknown camera'):
        model.encode({'wrist': frames[0]}, INSTRUCTION, state())
    with pytest.raises(ValueError, match='no camera'):
        model.encode({}, INSTRUCTION, state())


def _broken(source, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


def test_missing_or_malformed_files_are_named(pi0_dir, tmp_path):
    assert is_pi0_directory(pi0_dir)
    cases = []
    d = _broken(pi0_dir, tmp_path, 'no_post_stats')
    (d / 'policy_postprocessor_step_0_unnormalizer_processor.safetensors').unlink()
    cases.append((d, 'policy_postprocessor_step_0_unnormalizer_processor.safetensors'))
    d = _broken(pi0_dir, tmp_path, 'bad_config')
    (d / 'config.json').write_text('{"type": "pi0", ')
    cases.append((d, 'config.json'))
    d = _broken(pi0_dir, tmp_path, 'bad_mode')
    config = json.loads((d / 'config.json').read_text())
    config['normalization_mapping']['ACTION'] = 'ZSCORE'
    (d / 'config.json').write_text(json.dumps(config))
    cases.append((d, 'config.json'))
    d = _broken(pi0_dir, tmp_path, 'no_weights')
    (d / 'model.safetensors').unlink()
    cases.append((d, 'model.safetensors'))
    d = _broken(pi0_dir, tmp_path, 'bad_weights')
    (d / 'model.safetensors').write_bytes(b'not a safetensors file')
    cases.append((d, 'model.safetensors'))
    d = _broken(pi0_dir, tmp_path, 'wrong_shape')
    state_dict = load_file(str(d / 'model.safetensors'))
    state_dict['model.state_proj.weight'] = torch.zeros(3, 3)
    save_file(state_dict, str(d / 'model.safetensors'))
    cases.append((d, 'state_proj.weight'))
    d = _broken(pi0_dir, tmp_path, 'missing_weight')
    state_dict = load_file(str(d / 'model.safetensors'))
    del state_dict['model.action_out_proj.bias']
    save_file(state_dict, str(d / 'model.safetensors'))
    cases.append((d, 'action_out_proj.bias'))
    d = _broken(pi0_dir, tmp_path, 'no_tokenizer')
    (d / 'tokenizer.json').unlink()
    cases.append((d, 'tokenizer'))
    d = _broken(pi0_dir, tmp_path, 'stats_shape')
    stats = load_file(str(d / 'policy_preprocessor_step_5_normalizer_processor.safetensors'))
    stats['observation.state.std'] = torch.ones(3)
    save_file(stats, str(d / 'policy_preprocessor_step_5_normalizer_processor.safetensors'))
    cases.append((d, 'observation.state.std'))
    for directory, name in cases:
        with pytest.raises(CheckpointError, match=name.replace('.', r'\.')):
            load_checkpoint(directory)


def _set_stat(directory, pipeline, key, change):
    steps = json.loads((directory / pipeline).read_text())['steps']
    name = next(step['state_file'] for step in steps if 'state_file' in step)
    stats = load_file(str(directory / name))
    stats[key] = change(stats[key].clone())
    save_file(stats, str(directory / name))
    return name


def _first(value):
    def change(tensor):
        tensor[0] = value
        return tensor
    return change


@pytest.mark.parametrize('kind, pipeline, key, change, message', [
    ('pi0', 'policy_postprocessor.json', 'action.mean', _first(float('nan')), 'action.mean has non-finite'),
    ('pi0', 'policy_preprocessor.json', 'observation.state.std', _first(-1.0),
     r'observation.state.std is negative in dimension\(s\) \[0\]'),
    ('pi05', 'policy_postprocessor.json', 'action.q01', lambda t: t + 10.0, r'action.q99 < action.q01'),
    ('pi05', 'policy_preprocessor.json', 'observation.state.q99', _first(float('inf')),
     'observation.state.q99 has non-finite'),
])
def test_malformed_statistics_fail_at_load(pi0_dir, pi05_dir, tmp_path, kind, pipeline, key, change, message):
    directory = _broken(pi0_dir if kind == 'pi0' else pi05_dir, tmp_path, 'stats')
    name = _set_stat(directory, pipeline, key, change)
    with pytest.raises(CheckpointError, match=rf'{name}: {message}'):
        load_policy(str(directory))


class ActionRowsRecorder:
    """Asks for action rows at every layer and remembers what the layer views carried."""

    name = 'recorder'

    def __init__(self, layers, keep_after_0=None):
        self.layers, self.keep_after_0, self.seen, self.record = layers, keep_after_0, {}, None

    def reset(self):
        pass

    def begin_step(self, context):
        from specprune_ros.core.step_types import AttentionRequest, StepPlan
        self.layout = context.layout
        return StepPlan(attention=[AttentionRequest(layer=layer, rows='action') for layer in self.layers])

    def after_layer(self, view):
        if 'action' in view.attention:
            self.seen[view.layer] = (view.key_indices.clone(), view.attention['action'].clone())
        return self.keep_after_0 if view.layer == 0 else None

    def end_step(self, record):
        self.record = record


def test_layer_views_carry_the_first_denoising_steps_action_rows(pi0_dir):
    model = inference(pi0_dir, action_rows='first')
    inp = model.encode(images(), INSTRUCTION, state())
    keep = inp.layout.visual_indices()[1::3]
    recorder = ActionRowsRecorder([0, 1, 2], keep_after_0=keep)
    model.run(inp, recorder, model.context(inp), model.sample_noise())
    assert recorder.layout.action_span == (inp.layout.num_tokens + 1, inp.layout.num_tokens + 51)
    assert sorted(recorder.seen) == [0, 1]                      # the last layer has no view
    for layer in (0, 1):
        keys, weights = recorder.seen[layer]
        record_keys, record_weights = recorder.record.attention[layer]['action']
        assert torch.equal(keys, record_keys)
        torch.testing.assert_close(weights.float(), record_weights.float(), rtol=1e-5, atol=1e-7)
    assert len(recorder.seen[1][0]) == len(inp.layout.non_visual_indices()) + len(keep)
    assert 2 in recorder.record.attention and 'action' in recorder.record.attention[2]


def test_specprune_on_action_rows_prunes_in_the_pass(pi0_dir):
    model = inference(pi0_dir)
    method = build_method('specprune', {'task_rows': 'action'}, seed=0)
    for step in range(3):
        inp = model.encode(images(step), INSTRUCTION, state(step))
        _, result, _ = model.run(inp, method, model.context(inp, step_index=step, instruction=INSTRUCTION))
        assert 'error' not in result.record.info, result.record.info.get('error')
    assert result.record.visual_kept_per_layer[-1] < inp.layout.num_visual


# -- behind the Policy interface -------------------------------------------------------------------------------


def observation(step: int = 0, names=('base_0_rgb', 'left_wrist_0_rgb'), proprio='default') -> Observation:
    return Observation(images=dict(zip(names, images(step))), instruction=INSTRUCTION,
                       proprio=state(step) if isinstance(proprio, str) else proprio)


def test_load_policy_by_directory_predicts_unnormalised_chunks(pi0_dir):
    policy = load_policy(str(pi0_dir), method='specprune', dtype='float32')
    assert isinstance(policy.backend, Pi0Backend) and policy.backend.name == 'pi0'
    assert policy.camera_names == ('base_0_rgb', 'left_wrist_0_rgb') and policy.proprio_dim == 8
    assert policy.action_spec.chunk_size == 50 and policy.action_spec.action_dim == 7
    outputs = [policy.predict(observation(step)) for step in range(3)]
    out = outputs[-1]
    assert out.actions.shape == (50, 7) and np.isfinite(out.actions).all()
    assert out.info['model'] == 'pi0' and out.info['method'] == 'specprune' and out.info['step_index'] == 2
    np.testing.assert_allclose(out.actions, policy.backend.inference.unnormalize(out.info['normalized_actions']),
                               rtol=1e-6)
    assert out.record.mean_visual_kept < 32
    policy.reset()
    assert policy.predict(observation()).info['step_index'] == 0


def test_policy_refuses_bad_observations(pi0_dir):
    policy = load_policy(str(pi0_dir), dtype='float32')
    with pytest.raises(ObservationError, match='robot state'):
        policy.predict(observation(proprio=None))
    with pytest.raises(ObservationError, match='NaN'):
        policy.predict(observation(proprio=np.full(8, np.nan)))
    with pytest.raises(ObservationError, match='left_wrist_0_rgb'):
        policy.predict(Observation(images={'base_0_rgb': images()[0]}, instruction=INSTRUCTION, proprio=state()))


@pytest.mark.parametrize('steps', [0, -5])
def test_n_action_steps_below_one_is_refused_at_load(pi0_dir, tmp_path, steps):
    directory = _broken(pi0_dir, tmp_path, f'steps_{steps}')
    config = json.loads((directory / 'config.json').read_text())
    config['n_action_steps'] = steps
    (directory / 'config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match='1 <= n_action_steps <= chunk_size'):
        load_policy(str(directory), dtype='float32')


def test_options_map_robot_cameras_and_fix_the_noise(pi05_dir, tmp_path):
    directory = _broken(pi05_dir, tmp_path, 'with_options')
    (directory / 'specprune_adapter.json').write_text(json.dumps(
        {'camera_map': {'base_0_rgb': 'agentview'}, 'noise_seed': 7, 'control_period_s': 0.05}))
    first = load_policy(str(directory), dtype='float32')
    assert first.camera_names == ('agentview',) and first.action_spec.control_period_s == 0.05
    obs = Observation(images={'agentview': images()[0]}, instruction=INSTRUCTION, proprio=state())
    a = first.predict(obs)
    assert a.record.layout.num_cameras == 1 and a.actions.shape == (50, 7)
    again = load_policy(str(directory), dtype='float32').predict(obs)
    np.testing.assert_array_equal(a.actions, again.actions)            # same seed, same noise, same chunk
    assert np.abs(first.predict(obs).actions - a.actions).max() > 1e-4  # the next draw differs
    first.reset()                                                       # a new episode starts the noise again
    np.testing.assert_array_equal(first.predict(obs).actions, a.actions)
    (directory / 'specprune_adapter.json').write_text(json.dumps({'camera_map': {'front': 'agentview'}}))
    with pytest.raises(ValueError, match='front'):
        load_policy(str(directory), dtype='float32')
    (directory / 'specprune_adapter.json').write_text(json.dumps({'cameras': ['agentview']}))
    with pytest.raises(CheckpointError, match='specprune_adapter.json'):
        load_policy(str(directory), dtype='float32')


@pytest.mark.parametrize('options, message', [
    ({'noise_seed': '3'}, 'noise_seed: expected an integer'),
    ({'control_period_s': 0}, r'control_period_s: 0.0 is outside \(0, inf\)'),
    ({'translation_scale_m': -0.02}, r'translation_scale_m: -0.02 is outside'),
    ({'action_names': 'abcdefg'}, 'action_names: expected a list'),           # read as seven one-letter names
    ({'camera_map': ['base_0_rgb']}, 'camera_map: checkpoint camera -> observation camera names'),
    ({'camera_map': {'base_0_rgb': ''}}, 'camera_map: checkpoint camera -> observation camera names'),
    ({'tokenizer': 5}, 'tokenizer: expected a string'),
])
def test_bad_options_fail_at_load_naming_the_option(pi0_dir, tmp_path, options, message):
    directory = _broken(pi0_dir, tmp_path, 'bad_options')
    (directory / 'specprune_adapter.json').write_text(json.dumps(options))
    with pytest.raises(CheckpointError, match=message):
        load_policy(str(directory), dtype='float32')
