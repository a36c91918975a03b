"""The reference VLA: tokenizer, shapes, checkpoints, the policy runtime's input checks, and training."""
import json

import numpy as np
import pytest
import torch

from specprune_ros.core.token_layout import TokenRole
from specprune_ros.policy.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from specprune_ros.policy.interface import Observation
from specprune_ros.policy.loading import tiny_random_config
from specprune_ros.policy.reference_vla import ReferenceVLA
from specprune_ros.policy.runtime import ObservationError, PrunedVLAPolicy
from specprune_ros.policy.tokenizer import PAD, UNK, WordTokenizer
from specprune_ros.sim.vocab import VOCABULARY


def tiny_model(seed: int = 0) -> ReferenceVLA:
    torch.manual_seed(seed)
    return ReferenceVLA(tiny_random_config()).eval()


def observation(rng: np.random.Generator, **overrides) -> Observation:
    fields = dict(images={c: rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for c in ('agentview', 'wrist')},
                  instruction='pick up the red cube', proprio=np.zeros(6, np.float32))
    fields.update(overrides)
    return Observation(**fields)


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
    a = PrunedVLAPolicy(model).predict(obs).actions
    b = PrunedVLAPolicy(loaded).predict(obs).actions
    assert a.shape == (8, 7) and np.array_equal(a, b)
    assert np.all(np.abs(a) <= 1.0)


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
])
def test_policy_refuses_bad_observations(overrides, message):
    policy = PrunedVLAPolicy(tiny_model())
    with pytest.raises(ObservationError, match=message):
        policy.predict(observation(np.random.default_rng(0), **overrides))


def test_training_runs_exports_and_resumes(tmp_path):
    from specprune_ros.policy.training import TrainConfig, train
    from specprune_ros.sim.dataset import Episode
    rng = np.random.default_rng(0)
    episodes = [Episode(images={c: rng.integers(0, 255, (5, 96, 96, 3), dtype=np.uint8) for c in ('agentview', 'wrist')},
                        proprio=rng.normal(size=(5, 6)).astype(np.float32),
                        actions=rng.uniform(-1, 1, (5, 7)).astype(np.float32),
                        instruction='pick up the red cube', family='pick', seed=i, success=True) for i in range(4)]
    config = tiny_random_config(VOCABULARY)
    settings = TrainConfig(steps=3, batch_size=2, warmup_steps=1, bf16=False, threads=1, log_every=1, save_every=2,
                           val_fraction=0.25)
    exported = train(config, settings, episodes, tmp_path / 'run')
    model = load_checkpoint(exported)
    assert model.config.proprio_mean and len(model.config.proprio_mean) == 6
    log = [json.loads(line) for line in (tmp_path / 'run' / 'loss_log.jsonl').read_text().splitlines()]
    assert [e['step'] for e in log] == [1, 2, 3] and all(np.isfinite(e['loss']) for e in log)
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
