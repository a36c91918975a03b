"""The reference VLA: tokenizer, shapes, checkpoints, the policy's input checks, and training."""
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from specprune_ros.codecs.instruction import InstructionError
from specprune_ros.core.token_layout import TokenRole
from specprune_ros.policy.reference_checkpoint import load_checkpoint, save_checkpoint, warm_start
from specprune_ros.policy.errors import CheckpointError, ObservationError
from specprune_ros.policy.interface import Observation
from specprune_ros.models.loading import load_policy, tiny_random_config
from specprune_ros.policy.reference_backend import reference_policy
from specprune_ros.policy.reference_vla import ReferenceVLA, sincos_positions_2d
from specprune_ros.policy.tokenizer import PAD, UNK, WordTokenizer
from specprune_ros.pruning.registry import build_method
from specprune_ros.sim.vocab import VOCABULARY


def tiny_model(seed: int = 0) -> ReferenceVLA:
    torch.manual_seed(seed)
    return ReferenceVLA(tiny_random_config()).eval()


def observation(rng: np.random.Generator, **overrides) -> Observation:
    fields = dict(images={c: rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for c in ('agentview', 'wrist')},
                  instruction='pick up the red cube', proprio=np.zeros(6, np.float32))
    fields.update(overrides)
    return Observation(**fields)


def random_episodes(count: int = 4) -> list:
    """Tiny 5-step pick episodes of random pixels and actions, for training-loop tests."""
    from specprune_ros.training.demonstrations import Episode
    rng = np.random.default_rng(0)
    return [Episode(images={c: rng.integers(0, 255, (5, 96, 96, 3), dtype=np.uint8) for c in ('agentview', 'wrist')},
                    proprio=rng.normal(size=(5, 6)).astype(np.float32),
                    actions=rng.uniform(-1, 1, (5, 7)).astype(np.float32),
                    instruction='pick up the red cube', family='pick', seed=i, success=True) for i in range(count)]


def test_tokenizer_pads_truncates_and_maps_unknown_words():
    tokenizer = WordTokenizer(('pick', 'up', 'the', 'red', 'cube'), max_words=4)
    ids, n = tokenizer.encode('Pick up the RED, cube!')
    assert n == 4 and ids == [tokenizer.tokens.index(w) for w in ('pick', 'up', 'the', 'red')]
    ids, n = tokenizer.encode('grab the cube')
    assert n == 3 and ids[0] == tokenizer.tokens.index(UNK) and ids[3] == tokenizer.tokens.index(PAD)


def test_layout_and_forward_shapes():
    model = tiny_model()
    layout = model.layout(num_words=5)
    roles = layout.roles()
    assert layout.num_visual == 2 * 144 and int((roles == TokenRole.VISUAL).sum()) == 288
    assert int((roles == TokenRole.TEXT).sum()) == 5 and int((roles == TokenRole.ACTION).sum()) == 56
    images = torch.randint(0, 255, (3, 2, 3, 96, 96), dtype=torch.uint8)
    words = torch.zeros(3, model.config.max_words, dtype=torch.long)
    with torch.no_grad():
        actions, result = model(images, words, 5, torch.zeros(3, 6))
    assert actions.shape == (3, 8, 7)
    assert result.hidden.shape == (3, layout.num_tokens, model.config.hidden_size)


def test_checkpoint_round_trip_gives_identical_actions(tmp_path):
    model = tiny_model()
    save_checkpoint(model, tmp_path / 'ckpt', extra={'training': {'steps_done': 0}})
    loaded = load_checkpoint(tmp_path / 'ckpt')
    rng = np.random.default_rng(0)
    obs = observation(rng)
    a = reference_policy(model).predict(obs).actions
    b = reference_policy(loaded).predict(obs).actions
    assert a.shape == (8, 7) and np.array_equal(a, b)
    assert np.all(np.abs(a) <= 1.0)


def test_instruction_film_changes_the_patch_features_only_once_trained():
    model = tiny_model()
    images = torch.randint(0, 255, (1, 2, 3, 96, 96), dtype=torch.uint8)
    red, _ = model.tokenizer.encode('pick up the red cube')
    blue, _ = model.tokenizer.encode('pick up the blue cube')
    visual = model.layout(5).visual_indices()

    def patches(ids):
        with torch.no_grad():
            return model.embed(images, torch.tensor([ids]), torch.zeros(1, 6))[0, visual]

    assert torch.equal(patches(red), patches(blue))        # FiLM starts as the identity (zero-initialised output)
    with torch.no_grad():
        model.film[-1].weight.normal_(0, 0.05)
    assert not torch.allclose(patches(red), patches(blue))  # then the instruction modulates the vision stem


def test_pointing_marks_tag_the_pointed_patches_of_the_fixed_camera_only():
    model = tiny_model()
    images = torch.randint(0, 255, (1, 2, 3, 96, 96), dtype=torch.uint8)
    ids, _ = model.tokenizer.encode('pick up the red cube')
    layout = model.layout(5)
    (start0, stop0), (start1, stop1) = layout.camera_spans

    def embed():
        with torch.no_grad():
            return model.embed(images, torch.tensor([ids]), torch.zeros(1, 6), with_pointing=True)

    plain, logits = embed()                                  # zero marker embedding: no change
    assert logits.shape == (1, 2, stop0 - start0)
    with torch.no_grad():
        model.pointed_embedding[0] = 1.0                     # mark the named object's patches with +1
    marked, _ = embed()
    delta = (marked - plain)[0]
    assert torch.equal(delta[start1:], torch.zeros_like(delta[start1:]))   # other camera, words, queries untouched
    strength = delta[start0:stop0].mean(-1)
    assert int(strength.argmax()) == int(logits[0, 0].argmax()) and abs(float(strength.max()) - 1.0) < 1e-5
    assert float(strength.min()) >= 0.0


def test_sincos_positions_are_distinct_per_patch():
    table = sincos_positions_2d(12, 64)
    assert table.shape == (144, 64)
    distances = torch.cdist(table, table) + torch.eye(144)
    assert float(distances.min()) > 0.05


def test_warm_start_keeps_the_function_of_a_checkpoint_without_film(tmp_path):
    torch.manual_seed(0)
    old = ReferenceVLA(dataclasses.replace(tiny_random_config(), language_film=False)).eval()
    save_checkpoint(old, tmp_path / 'old')
    new = ReferenceVLA(tiny_random_config()).eval()
    added = warm_start(new, tmp_path / 'old')
    assert added and all(name.split('.')[0] in ('film', 'localisation_head', 'pointed_embedding') for name in added)
    obs = observation(np.random.default_rng(1))
    assert np.array_equal(reference_policy(old).predict(obs).actions, reference_policy(new).predict(obs).actions)
    wider = ReferenceVLA(dataclasses.replace(tiny_random_config(), hidden_size=32, num_heads=2, num_kv_heads=2))
    with pytest.raises(CheckpointError, match='do not fit'):
        warm_start(wider, tmp_path / 'old')


def test_blind_proprio_entries_do_not_reach_the_policy_and_survive_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = ReferenceVLA(dataclasses.replace(tiny_random_config(), blind_proprio=(0, 1, 3, 4))).eval()
    rng = np.random.default_rng(2)
    base = observation(rng)
    policy = reference_policy(model)
    moved = np.array([0.2, -0.1, 0.0, 0.6, -0.8, 0.0], np.float32)     # tcp xy and yaw differ only
    lowered = np.array([0.0, 0.0, 0.05, 0.0, 0.0, 0.0], np.float32)    # tcp z differs
    actions = policy.predict(base).actions
    assert np.array_equal(actions, reference_policy(model).predict(dataclasses.replace(base, proprio=moved)).actions)
    lowered_actions = reference_policy(model).predict(dataclasses.replace(base, proprio=lowered)).actions
    assert not np.array_equal(actions, lowered_actions)
    save_checkpoint(model, tmp_path / 'blind')
    assert load_checkpoint(tmp_path / 'blind').config.blind_proprio == (0, 1, 3, 4)
    with pytest.raises(ValueError, match='outside'):
        dataclasses.replace(tiny_random_config(), blind_proprio=(6,))


def test_checkpoints_saved_before_newer_options_load_as_they_were_saved(tmp_path):
    torch.manual_seed(0)
    old = ReferenceVLA(dataclasses.replace(tiny_random_config(), pointing_marker=False)).eval()
    save_checkpoint(old, tmp_path / 'old')
    meta = json.loads((tmp_path / 'old' / 'config.json').read_text())
    for option in ('pointing_marker', 'blind_proprio'):
        del meta['config'][option]
    (tmp_path / 'old' / 'config.json').write_text(json.dumps(meta))
    loaded = load_checkpoint(tmp_path / 'old')
    assert loaded.pointed_embedding is None and loaded.config.blind_proprio == ()
    obs = observation(np.random.default_rng(3))
    assert np.array_equal(reference_policy(old).predict(obs).actions, reference_policy(loaded).predict(obs).actions)


def test_bad_checkpoints_name_the_missing_or_malformed_file(tmp_path):
    with pytest.raises(CheckpointError, match='config.json'):
        load_checkpoint(tmp_path)
    save_checkpoint(tiny_model(), tmp_path / 'c')
    (tmp_path / 'c' / 'model.safetensors').unlink()
    with pytest.raises(CheckpointError, match='missing model.safetensors'):
        load_checkpoint(tmp_path / 'c')
    (tmp_path / 'c' / 'config.json').write_text('{not json')
    with pytest.raises(CheckpointError, match='malformed config.json'):
        load_checkpoint(tmp_path / 'c')
    save_checkpoint(tiny_model(), tmp_path / 'd')
    meta = json.loads((tmp_path / 'd' / 'config.json').read_text())
    meta['config']['hidden_size'] = 96
    (tmp_path / 'd' / 'config.json').write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match='does not fit config.json'):
        load_checkpoint(tmp_path / 'd')


@pytest.mark.parametrize('overrides, message', [
    ({'images': {'agentview': np.zeros((96, 96, 3), np.uint8)}}, "camera 'wrist' missing"),
    ({'images': {'agentview': np.zeros((64, 96, 3), np.uint8), 'wrist': np.zeros((96, 96, 3), np.uint8)}},
     'expected'),
    ({'proprio': np.array([0, 0, np.nan, 0, 1, 0], np.float32)}, 'finite'),
    ({'proprio': None}, 'proprio'),
    ({'proprio': ['a'] * 6}, 'proprio must be 6 finite numbers'),
    ({'images': None}, 'images must map camera names to frames'),
    ({'images': {'agentview': [[0]], 'wrist': np.zeros((96, 96, 3), np.uint8)}}, 'expected a NumPy'),
    ({'instruction': None}, 'the instruction must be a str'),
    ({'instruction': b'pick up the red cube'}, 'the instruction must be a str, got bytes'),
    ({'executed_actions': np.float32(1.0)}, r'executed_actions: expected \(k, 7\) rows'),
    ({'executed_actions': np.zeros((3, 3))}, r'got shape \(3, 3\)'),          # read as motion before
    ({'executed_actions': np.zeros((2, 2, 7))}, r'got shape \(2, 2, 7\)'),
    ({'executed_actions': ['a']}, 'executed_actions: not an array of numbers'),
    ({'timestamp': 'now'}, 'timestamp must be seconds'),
    ({'timestamp': float('nan')}, 'timestamp must be finite'),
    ({'instruction': 'pick up the red cube and then put it down on the plate near the edge'},
     'instruction has 16 words; this model reads at most 12'),           # cut to 12 words before
])
def test_policy_refuses_bad_observations(overrides, message):
    policy = reference_policy(tiny_model())
    with pytest.raises(ObservationError, match=message):
        policy.predict(observation(np.random.default_rng(0), **overrides))


def test_an_instruction_of_the_models_full_length_is_read_whole():
    policy = reference_policy(tiny_model())
    twelve = 'put the red cube on the left plate push the blue cylinder'
    assert len(twelve.split()) == policy.backend.model.config.max_words
    assert policy.predict(observation(np.random.default_rng(0), instruction=twelve)).actions.shape[1] == 7


@pytest.mark.parametrize('instruction, kind, message', [
    ('ピックアップ 赤い キューブ', 'instruction_empty', 'no word this model reads'),
    ('xyzzy plugh frobnicate', 'instruction_unknown_words', r'does not know \(xyzzy, plugh, frobnicate\)'),
    ('pick up the red block please', 'instruction_unknown_words', r'does not know \(block, please\)'),
    ('pick up the red cube ' * 4, 'instruction_too_long', 'has 20 words; this model reads at most 12'),
])
def test_the_reference_vla_refuses_instructions_it_cannot_read(instruction, kind, message):
    """Words outside its closed vocabulary would read as <unk>: the model would act on another task."""
    policy = reference_policy(tiny_model())
    with pytest.raises(InstructionError, match=message) as refused:
        policy.check_instruction(instruction)
    assert refused.value.kind == kind
    with pytest.raises(ObservationError, match=message):
        policy.predict(observation(np.random.default_rng(0), instruction=instruction))
    policy.check_instruction('Push the Yellow cylinder to the left zone.')       # case and punctuation are fine


def test_a_failed_step_does_not_restart_the_methods_episode():
    """The action head fails once after the method saw the step: the retry goes on, it is not a new episode."""
    policy = reference_policy(tiny_model(), build_method('vla_cache'))
    still = observation(np.random.default_rng(0))               # a still scene: VLA-Cache reuses its K/V
    for _ in range(3):
        policy.predict(still)
    actions = policy.backend.actions

    def fail_once(normalized):
        policy.backend.actions = actions
        raise RuntimeError('action head failed')
    policy.backend.actions = fail_once
    with pytest.raises(RuntimeError, match='action head failed'):
        policy.predict(still)
    output = policy.predict(still)
    assert output.info['step_index'] == 4 and not output.record.info.get('reset')
    assert output.record.reused is not None                     # the K/V cache of the episode is still there


def test_executed_actions_with_nan_are_left_out_not_fatal():
    """A NaN or Inf executed action is no motion to read: SpecPrune's change detection goes on without it."""
    policy = reference_policy(tiny_model(), build_method('specprune'))
    rng = np.random.default_rng(0)
    still = np.tile(np.array([0.05, 0, -0.05, 0, 0, 0, 1], np.float32), (4, 1))
    policy.predict(observation(rng, executed_actions=still))
    for bad in (np.nan, np.inf):
        executed = still.copy()
        executed[2, 0] = bad
        assert np.isfinite(policy.predict(observation(rng, executed_actions=executed)).actions).all()


def test_training_runs_exports_and_resumes(tmp_path):
    from specprune_ros.training.trainer import TrainConfig, train
    episodes = random_episodes()
    config = tiny_random_config(VOCABULARY)
    settings = TrainConfig(steps=3, batch_size=2, warmup_steps=1, bf16=False, threads=1, log_every=1, save_every=2,
                           val_fraction=0.25)
    exported = train(config, settings, episodes, tmp_path / 'run')
    model = load_checkpoint(exported)
    assert model.config.proprio_mean and len(model.config.proprio_mean) == 6
    log = [json.loads(line) for line in (tmp_path / 'run' / 'loss_log.jsonl').read_text().splitlines()]
    assert [e['step'] for e in log] == [1, 2, 3] and all(np.isfinite(e['loss']) for e in log)
    assert all(np.isfinite(e['localisation']) and np.isfinite(e['pointing']) for e in log)
    assert {'val_localisation', 'val_pointing', 'val_pointing_hit'} <= set(log[-1])
    settings.steps = 5
    train(tiny_random_config(VOCABULARY), settings, episodes, tmp_path / 'run', resume=True)
    steps = [json.loads(line)['step'] for line in (tmp_path / 'run' / 'loss_log.jsonl').read_text().splitlines()]
    assert steps[-2:] == [4, 5]
    settings.steps = 2
    again = train(tiny_random_config(VOCABULARY), settings, episodes, tmp_path / 'warm', init_from=exported,
                  export_dir=tmp_path / 'warm_ckpt')
    meta = json.loads((again / 'config.json').read_text())
    assert meta['training']['steps_done'] == 5 + 2
    assert meta['config']['proprio_mean'] == model.config.proprio_mean
    blind = dataclasses.replace(tiny_random_config(VOCABULARY), blind_proprio=(0, 1))
    again = train(blind, settings, episodes, tmp_path / 'blind', init_from=exported, export_dir=tmp_path / 'blind_ckpt')
    assert json.loads((again / 'config.json').read_text())['config']['blind_proprio'] == [0, 1]   # the run's choice


def test_localisation_targets_follow_the_task_layout_until_the_gripper_reaches_the_object():
    from specprune_ros.policy.reference_vla import LOCALISATION_SCALE
    from specprune_ros.training.trainer import localisation_targets
    from specprune_ros.training.demonstrations import Episode
    from specprune_ros.sim.tasks import sample_task
    spec, layout = sample_task('place', 7)
    obj = np.asarray(layout.objects[spec.target][:2], dtype=np.float32)
    tcp = np.array([[0.08, 0.0, 0.25], [*obj, 0.20], [*obj, 0.03], [0.0, 0.0, 0.10]], dtype=np.float32)
    proprio = np.concatenate([tcp, np.zeros((4, 3), np.float32)], axis=1)
    episode = Episode(images={}, proprio=proprio, actions=np.zeros((4, 7), np.float32), instruction=spec.instruction,
                      family='place', seed=7, success=True)
    targets, mask = localisation_targets(episode)
    np.testing.assert_allclose(targets[0, :2], obj * LOCALISATION_SCALE, rtol=1e-6)
    np.testing.assert_allclose(targets[0, 2:], np.asarray(layout.plates[spec.plate]) * LOCALISATION_SCALE, rtol=1e-6)
    assert mask[:, 0].tolist() == [1, 1, 0, 0]      # above the object is fine; low and close means it may move
    assert mask[:, 2].tolist() == [1, 1, 1, 1]      # the plate does not move
    pick_spec, _ = sample_task('pick', 7)
    _, pick_mask = localisation_targets(Episode(images={}, proprio=proprio, actions=np.zeros((4, 7), np.float32),
                                                instruction=pick_spec.instruction, family='pick', seed=7, success=True))
    assert not pick_mask[:, 2:].any()              # pick has no goal position


def test_pointing_targets_land_on_the_named_object_in_the_shifted_camera_image():
    from specprune_ros.training.trainer import (image_targets, localisation_targets, pointing_distribution,
                                                random_shift)
    from specprune_ros.sim import TabletopEnv
    from specprune_ros.training.demonstrations import Episode
    from specprune_ros.sim.vocab import COLOUR_RGBA
    env = TabletopEnv()
    observation = env.reset(seed=11, family='place')
    frame = observation.images['agentview']
    episode = Episode(images={}, proprio=env.proprio()[None], actions=np.zeros((1, 7), np.float32),
                      instruction=env.task.instruction, family='place', seed=11, success=True)
    located, _ = localisation_targets(episode)
    pixels = image_targets(located, 'agentview', 96)[0]             # (object, plate) x (column, row)
    images = torch.from_numpy(np.stack([frame, frame])[None]).permute(0, 1, 4, 2, 3).contiguous()
    shifted, moved = random_shift(images, 4, torch.Generator().manual_seed(3))
    image = shifted[0, 0].permute(1, 2, 0).numpy()
    for (column, row), colour in zip(pixels + moved[0, 0].numpy(), (env.task.target.split('_')[0], env.task.plate)):
        seen = image[int(round(row)), int(round(column))].astype(float)
        expected = np.array(COLOUR_RGBA[colour][:3]) * 255
        others = [np.array(rgba[:3]) * 255 for name, rgba in COLOUR_RGBA.items() if name != colour]
        assert np.linalg.norm(seen - expected) < min(np.linalg.norm(seen - o) for o in others)
    target = pointing_distribution(torch.from_numpy(pixels)[None], grid=12, patch_size=8)[0]
    peak = target.argmax(-1)
    assert torch.equal(peak, torch.from_numpy((pixels[:, 1] // 8) * 12 + pixels[:, 0] // 8).long())
    assert torch.allclose(target.sum(-1), torch.ones(2))


def test_training_script_takes_the_union_of_several_demo_directories(tmp_path):
    """``--data A B`` (e.g. expert demos + recovery demos) trains on both; directories that disagree are refused."""
    import subprocess
    import sys
    from pathlib import Path
    from specprune_ros.training.demonstrations import FORMAT_NAME, Episode, write_episode, write_manifest
    from specprune_ros.sim.env import PROPRIO_LAYOUT
    rng = np.random.default_rng(0)
    roots = []
    for name, count in (('demos', 3), ('recovery', 5)):
        root = tmp_path / name
        entries = []
        for seed in range(count):
            episode = Episode(images={c: rng.integers(0, 255, (6, 48, 48, 3), dtype=np.uint8)
                                      for c in ('agentview', 'wrist')},
                              proprio=rng.normal(size=(6, 6)).astype(np.float32),
                              actions=rng.uniform(-1, 1, (6, 7)).astype(np.float32),
                              instruction='pick up the red cube', family='pick', seed=seed, success=True)
            write_episode(root / 'episodes' / f'pick_{seed:07d}.npz', episode)
            entries.append({'file': f'episodes/pick_{seed:07d}.npz', 'family': 'pick', 'seed': seed,
                            'instruction': episode.instruction, 'length': 6, 'success': True})
        write_manifest(root, {'format': FORMAT_NAME, 'version': 1, 'image_size': 48,
                              'cameras': ['agentview', 'wrist'], 'proprio_layout': list(PROPRIO_LAYOUT),
                              'vocabulary': list(VOCABULARY), 'sim_fingerprint': 'not-checked', 'episodes': entries})
        roots.append(root)
    script = Path(__file__).resolve().parents[1] / 'scripts' / 'train_reference_vla.py'
    command = [sys.executable, str(script), '--allow-sim-mismatch', '--out', str(tmp_path / 'run'),
               '--export', str(tmp_path / 'ckpt'), '--steps', '2', '--batch-size', '2', '--threads', '1',
               '--val-fraction', '0.25', '--hidden-size', '32', '--num-layers', '1', '--mlp-size', '64',
               '--num-heads', '2', '--data', *map(str, roots)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads((tmp_path / 'ckpt' / 'config.json').read_text())
    assert meta['training']['episodes'] == 8 - 2                     # 3 + 5 episodes, a quarter held out
    manifest = json.loads((roots[1] / 'manifest.json').read_text())
    manifest['vocabulary'] = manifest['vocabulary'][:-1]
    (roots[1] / 'manifest.json').write_text(json.dumps(manifest))
    refused = subprocess.run(command + ['--overwrite'], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and 'differ in vocabulary' in refused.stderr


def test_random_token_drop_prunes_only_visual_tokens_within_its_shares():
    from specprune_ros.training.token_drops import random_token_drop
    model = tiny_model()
    layout = model.layout(model.config.max_words)
    visual = set(layout.visual_indices().tolist())
    images = torch.randint(0, 255, (2, 2, 3, 96, 96), dtype=torch.uint8)
    embeddings = model.embed(images, torch.zeros(2, model.config.max_words, dtype=torch.long), torch.zeros(2, 6))
    generator = torch.Generator().manual_seed(0)
    stages = {'before': 0, 'inside': 0}
    for _ in range(40):
        schedule = random_token_drop(layout, model.config.num_layers, 0.25, generator)
        assert schedule.keep_before is not None or schedule.keep_after
        seen = len(visual)
        if schedule.keep_before is not None:
            stages['before'] += 1
            assert set(schedule.keep_before.tolist()) <= visual
            assert 0.25 * seen - 1 <= len(schedule.keep_before) <= seen
            seen = len(schedule.keep_before)
        for layer, keep in schedule.keep_after.items():
            stages['inside'] += 1
            assert 0 <= layer < model.config.num_layers - 1
            previous = schedule.keep_before if schedule.keep_before is not None else layout.visual_indices()
            assert set(keep.tolist()) <= set(previous.tolist()) and 0.25 * seen - 1 <= len(keep) <= seen
        result = model.runner(embeddings, layout, schedule)
        non_visual = layout.non_visual_indices()
        assert torch.isin(non_visual, result.kept).all()        # text, proprio and action queries always stay
        actions = model.decode_actions(result, layout)
        assert actions.shape == (2, 8, 7) and torch.isfinite(actions).all()
    assert stages['before'] >= 10 and stages['inside'] >= 10       # both stages are exercised
    again = random_token_drop(layout, model.config.num_layers, 0.25, torch.Generator().manual_seed(7))
    same = random_token_drop(layout, model.config.num_layers, 0.25, torch.Generator().manual_seed(7))
    assert torch.equal(again.keep_before if again.keep_before is not None else torch.empty(0),
                       same.keep_before if same.keep_before is not None else torch.empty(0))
    assert again.keep_after.keys() == same.keep_after.keys()


def train_recording_schedules(monkeypatch, settings, out_dir) -> tuple[list, object]:
    """Train a tiny reference VLA on random episodes; the token-drop schedule of every training batch, the export."""
    from specprune_ros.training import trainer as training
    schedules = []
    original = training.training_losses

    def recording(model, batch, bf16, schedule=None):
        if model.training:
            schedules.append(schedule)
        return original(model, batch, bf16, schedule)

    monkeypatch.setattr(training, 'training_losses', recording)
    return schedules, training.train(tiny_random_config(VOCABULARY), settings, random_episodes(), out_dir)


def test_pruning_aware_training_runs_the_decoder_on_dropped_tokens(tmp_path, monkeypatch):
    from specprune_ros.training.trainer import TrainConfig
    settings = TrainConfig(steps=12, batch_size=2, warmup_steps=1, threads=1, log_every=4, save_every=100,
                           val_fraction=0.25, token_drop_probability=0.5)
    schedules, exported = train_recording_schedules(monkeypatch, settings, tmp_path / 'run')
    dropped = [s for s in schedules if s is not None]
    assert len(schedules) == 12 and 0 < len(dropped) < 12
    assert json.loads((exported / 'config.json').read_text())['training']['token_drop_probability'] == 0.5
    log = [json.loads(line) for line in (tmp_path / 'run' / 'loss_log.jsonl').read_text().splitlines()]
    assert all(np.isfinite(e['loss']) for e in log)


TRAIN_AFTER_INFERENCE = """
import numpy as np, torch
from specprune_ros.models.loading import tiny_random_config
from specprune_ros.policy.interface import Observation
from specprune_ros.policy.reference_backend import reference_policy
from specprune_ros.policy.reference_vla import ReferenceVLA
from specprune_ros.pruning.registry import build_method
torch.manual_seed(0)
model = ReferenceVLA(tiny_random_config())
images = {c: np.full((96, 96, 3), 90, np.uint8) for c in ('agentview', 'wrist')}
words = 'pick up the red cube'
for method in ('none', 'specprune', 'vla_pruner', 'divprune', 'coverage_ranked'):   # each fills constant caches
    policy = reference_policy(model.eval(), build_method(method))
    policy.predict(Observation(images=images, instruction=words, proprio=np.zeros(6, np.float32)))
ids, count = model.tokenizer.encode(words)
actions, _ = model.train()(torch.full((1, 2, 3, 96, 96), 90, dtype=torch.uint8), torch.tensor([ids]), count,
                           torch.zeros(1, 6), method=build_method('random', {'keep_ratio': 0.5}))  # a token drop
actions.square().mean().backward()
print('trained', sum(p.grad is not None for p in model.parameters()))
"""


def test_a_model_trains_after_it_acted_in_the_same_process():
    """Constant tables first built inside a policy step (inference mode) serve a later training step (autograd)."""
    done = subprocess.run([sys.executable, '-c', TRAIN_AFTER_INFERENCE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith('trained'), done.stderr[-2000:]


@pytest.mark.parametrize('method', ['specprune', 'coverage_ranked', 'vla_pruner'])
def test_one_executed_action_as_a_vector_is_a_row_and_a_non_finite_one_is_left_out(method):
    """An (action_dim,) vector is one executed action.

    With NaN or Inf it is no motion (SpecPrune crashed, its state half updated): the step acts as one without it.
    """
    rng = np.random.default_rng(3)
    steps = [observation(rng) for _ in range(4)]
    plain = reference_policy(tiny_model(), build_method(method))
    fed = reference_policy(tiny_model(), build_method(method))
    for index, step in enumerate(steps):
        expected = plain.predict(dataclasses.replace(step, executed_actions=None if index < 2 else
                                                     np.array([[0.1, 0, 0, 0, 0, 0, 1.0]])))
        vector = {0: None, 1: np.array([0.1, np.nan, 0, 0, 0, 0, 1.0]), 2: np.array([0.1, 0, 0, 0, 0, 0, 1.0]),
                  3: np.array([[0.1, 0, 0, 0, 0, 0, 1.0], [np.inf, 0, 0, 0, 0, 0, 1.0]])}[index]
        got = fed.predict(dataclasses.replace(step, executed_actions=vector))
        np.testing.assert_array_equal(got.actions, expected.actions)


def test_an_empty_camera_frame_is_refused_not_resized_to_black(tmp_path):
    from specprune_ros.adapters.tiny import write_tiny_checkpoint     # transformers: only for this test
    policy = load_policy(str(write_tiny_checkpoint(tmp_path / 'oft', 'openvla-oft')))
    frames = {name: np.zeros((96, 96, 3), np.uint8) for name in policy.camera_names}
    for empty in ((0, 0, 3), (0, 96, 3), (96, 0, 3)):
        images = {**frames, policy.camera_names[0]: np.zeros(empty, np.uint8)}
        with pytest.raises(ObservationError, match=f"camera '{policy.camera_names[0]}': expected"):
            policy.predict(Observation(images=images, instruction='pick it up', proprio=np.zeros(8, np.float32)))


def test_the_reference_vla_refuses_half_precision_at_load():
    for model in ('reference', 'tiny-random'):
        for dtype in ('bfloat16', 'float16'):
            with pytest.raises(ValueError, match=f"runs in float32 only, got dtype '{dtype}'"):
                load_policy(model, dtype=dtype)


def test_a_wrong_checkpoint_path_is_reported_before_the_dtype(tmp_path):
    """A params file for a published checkpoint sets bfloat16: a mistyped path must still say what is wrong."""
    (tmp_path / 'weights.bin').write_bytes(b'')
    (tmp_path / 'empty').mkdir()
    for path, message in ((tmp_path / 'missing', 'does not exist'), (tmp_path / 'weights.bin', 'is a file'),
                          (tmp_path / 'empty', 'missing config.json')):
        with pytest.raises(CheckpointError, match=message):
            load_policy(str(path), dtype='bfloat16')


@pytest.mark.parametrize('method', ['specprune', 'vla_pruner'])
def test_an_observation_timestamp_resets_the_temporal_state_after_max_gap_s(method):
    rng = np.random.default_rng(4)
    policy = reference_policy(tiny_model(), build_method(method, {'max_gap_s': 0.5}))
    reasons = [policy.predict(observation(rng, timestamp=t)).record.info.get('reset') for t in (10.0, 10.2, 10.4, 12.0)]
    assert reasons[1:3] == ['', ''] and reasons[3] == 'gap'


def test_a_cuda_device_without_cuda_is_a_clear_error_and_auto_picks_what_exists():
    if torch.cuda.is_available():
        assert next(load_policy('tiny-random', device='cuda').backend.model.parameters()).device.type == 'cuda'
    else:
        with pytest.raises(ValueError, match='CUDA is not available'):
            load_policy('reference', device='cuda')
    expected = 'cuda' if torch.cuda.is_available() else 'cpu'
    assert next(load_policy('tiny-random', device='auto').backend.model.parameters()).device.type == expected
