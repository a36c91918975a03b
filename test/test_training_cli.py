"""The training and collection commands check their settings before loading data or running episodes."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from specprune_ros.sim.env import PROPRIO_LAYOUT
from specprune_ros.sim.vocab import VOCABULARY
from specprune_ros.training.demonstrations import FORMAT_NAME, Episode, write_episode, write_manifest

SCRIPTS = Path(__file__).resolve().parents[1] / 'scripts'
INSTRUCTIONS = {'pick': 'pick up the red cube', 'place': 'put the red cube on the blue plate',
                'push': 'push the red cube to the green zone'}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_dataset(root: Path, seeds: dict, image_size: int = 48) -> Path:
    """A dataset directory in the real format: random 4-step episodes of each family's ``seeds``."""
    rng = np.random.default_rng(0)
    entries = []
    for family, family_seeds in seeds.items():
        for seed in family_seeds:
            episode = Episode(images={c: rng.integers(0, 255, (4, image_size, image_size, 3), dtype=np.uint8)
                                      for c in ('agentview', 'wrist')},
                              proprio=rng.normal(size=(4, 6)).astype(np.float32),
                              actions=rng.uniform(-1, 1, (4, 7)).astype(np.float32),
                              instruction=INSTRUCTIONS[family], family=family, seed=seed, success=True)
            name = f'episodes/{family}_{seed:07d}.npz'
            write_episode(root / name, episode)
            entries.append({'file': name, 'family': family, 'seed': seed, 'instruction': episode.instruction,
                            'length': 4, 'success': True})
    write_manifest(root, {'format': FORMAT_NAME, 'version': 1, 'image_size': image_size,
                          'cameras': ['agentview', 'wrist'], 'proprio_layout': list(PROPRIO_LAYOUT),
                          'vocabulary': list(VOCABULARY), 'sim_fingerprint': 'not-checked', 'episodes': entries})
    return root


@pytest.fixture
def trainer_script(monkeypatch):
    """The training script with episode loading recorded (``.loaded``) and training replaced by a recorder."""
    script = load_script('train_reference_vla')
    script.loaded, script.trained = [], []
    for name in ('read_episode', 'iter_episodes'):
        if hasattr(script, name):
            monkeypatch.setattr(script, name, recording(script.loaded, getattr(script, name)))

    def training(model_config, train_config, episodes, out, **kwargs):
        script.trained.append((train_config, list(episodes)))
        return out / 'checkpoint'

    monkeypatch.setattr(script, 'train', training)
    return script


def recording(calls: list, function):
    """``function``, noting each call's first argument in ``calls``."""
    def wrapper(*args, **kwargs):
        calls.append(args[0])
        return function(*args, **kwargs)
    return wrapper


def run_trainer(script, monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, 'argv', ['train_reference_vla.py', '--allow-sim-mismatch', *args])
    script.main()


@pytest.mark.parametrize('flags', [
    ['--steps', '0'], ['--steps', '-5'], ['--batch-size', '0'], ['--log-every', '0'], ['--save-every', '0'],
    ['--val-fraction', '1'], ['--val-fraction', '-0.1'], ['--token-drop-min-keep', '1.5'],
    ['--token-drop-min-keep', '0'], ['--token-drop-families', 'unifrom'], ['--bf16', 'maybe'],
    ['--init-from', 'no/such/checkpoint'], ['--max-episodes', '-1'], ['--hidden-size', '0'],
])
def test_bad_training_settings_exit_with_a_usage_error_before_loading(tmp_path, monkeypatch, trainer_script, flags,
                                                                      capsys):
    data = write_dataset(tmp_path / 'demos', {'pick': range(4)})
    with pytest.raises(SystemExit) as exit_:
        run_trainer(trainer_script, monkeypatch, '--data', str(data), '--out', str(tmp_path / 'run'), *flags)
    assert exit_.value.code == 2 and 'error' in capsys.readouterr().err
    assert not trainer_script.loaded and not trainer_script.trained


def test_paths_and_data_that_cannot_serve_the_run_are_refused_before_loading(tmp_path, monkeypatch, trainer_script):
    data = write_dataset(tmp_path / 'demos', {'pick': range(4)})
    (tmp_path / 'a_file').write_text('')
    (tmp_path / 'used').mkdir()
    (tmp_path / 'used' / 'train_state.pt').write_bytes(b'')
    odd = write_dataset(tmp_path / 'odd', {'pick': range(4)}, image_size=20)
    single = write_dataset(tmp_path / 'single', {'pick': [0]})
    for flags in (['--data', str(data), '--export', str(tmp_path / 'a_file' / 'ckpt')],
                  ['--data', str(data), '--out', str(tmp_path / 'empty'), '--resume'],
                  ['--data', str(data), '--out', str(tmp_path / 'used')],
                  ['--data', str(odd)],
                  ['--data', str(single), '--val-fraction', '0.25'],
                  ['--data', str(data), str(data)]):
        flags = ['--out', str(tmp_path / 'run'), *flags]
        with pytest.raises(SystemExit) as exit_:
            run_trainer(trainer_script, monkeypatch, *flags)
        assert exit_.value.code == 2, flags
        assert not trainer_script.loaded and not trainer_script.trained, flags


def test_bf16_is_a_flag_or_a_boolean_word(tmp_path, monkeypatch, trainer_script):
    data = write_dataset(tmp_path / 'demos', {'pick': range(4)})
    for flags, expected in ((['--bf16'], True), (['--bf16', 'on'], True), (['--bf16', 'false'], False), ([], False)):
        run_trainer(trainer_script, monkeypatch, '--data', str(data), '--out', str(tmp_path / 'run'), *flags)
        assert trainer_script.trained[-1][0].bf16 is expected, flags


def test_max_episodes_takes_every_family_of_every_directory(tmp_path, monkeypatch, trainer_script):
    demos = write_dataset(tmp_path / 'demos', {family: range(4) for family in INSTRUCTIONS})
    recovery = write_dataset(tmp_path / 'recovery', {family: range(100, 104) for family in INSTRUCTIONS})
    run_trainer(trainer_script, monkeypatch, '--data', str(demos), str(recovery), '--out', str(tmp_path / 'run'),
                '--max-episodes', '12')
    episodes = trainer_script.trained[-1][1]
    chosen = sorted((ep.family, ep.seed >= 100) for ep in episodes)
    assert chosen == sorted([(family, recovered) for family in INSTRUCTIONS for recovered in (False, True)] * 2)
    assert sorted(ep.seed for ep in episodes) == [0] * 3 + [1] * 3 + [100] * 3 + [101] * 3   # lowest seeds first
    run_trainer(trainer_script, monkeypatch, '--data', str(demos), str(recovery), '--out', str(tmp_path / 'run'),
                '--max-episodes', '12', '--overwrite')
    assert [(ep.family, ep.seed) for ep in trainer_script.trained[-1][1]] == [(ep.family, ep.seed) for ep in episodes]


@pytest.mark.parametrize('flags', [['--episodes', '0'], ['--episodes', '-1'], ['--layer', '99'], ['--layer', '-99']])
def test_zone_coverage_refuses_no_episodes_and_a_layer_the_model_lacks(monkeypatch, flags):
    script = load_script('zone_coverage')
    measured = []
    monkeypatch.setattr(script, 'coverage', recording(measured, script.coverage))
    monkeypatch.setattr(sys, 'argv', ['zone_coverage.py', '--configs', 'none', *flags])
    with pytest.raises(SystemExit) as exit_:
        script.main()
    assert exit_.value.code == 2 and not measured
