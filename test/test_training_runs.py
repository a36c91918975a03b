"""Training runs of the reference VLA: time limits per run, resuming, run directories and the validation split."""
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from specprune_ros.models.loading import tiny_random_config
from specprune_ros.sim.vocab import VOCABULARY
from specprune_ros.training import trainer as training
from specprune_ros.training.trainer import TrainConfig, train
from test_policy import random_episodes


def settings(**overrides) -> TrainConfig:
    """Small, quick training settings."""
    values = dict(steps=6, batch_size=2, warmup_steps=1, threads=1, log_every=1, save_every=100, val_fraction=0.25)
    values.update(overrides)
    return TrainConfig(**values)


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)['step'] for line in (out / 'loss_log.jsonl').read_text().splitlines()]


def saved_step(out: Path) -> int:
    return torch.load(out / 'train_state.pt', weights_only=False)['step']


def test_max_minutes_limits_each_run_so_the_same_command_resumed_keeps_training(tmp_path, monkeypatch):
    """Every optimiser step takes 10 s of a fake clock: a 0.5 minute run takes 4 steps, and so does its resumption."""
    clock = [1000.0]
    monkeypatch.setattr(training, 'time', types.SimpleNamespace(time=lambda: clock[0]))
    optimise = training._optimise

    def ten_seconds(*args):
        clock[0] += 10.0
        return optimise(*args)

    monkeypatch.setattr(training, '_optimise', ten_seconds)
    config = settings(steps=20, max_minutes=0.5)
    out = tmp_path / 'run'
    train(tiny_random_config(VOCABULARY), config, random_episodes(), out)
    first = saved_step(out)
    assert 1 < first < 20
    train(tiny_random_config(VOCABULARY), config, random_episodes(), out, resume=True)
    assert saved_step(out) == 2 * first
    assert logged_steps(out) == list(range(1, 2 * first + 1))


def test_a_run_directory_is_resumed_only_from_a_saved_state_and_never_overwritten_unasked(tmp_path):
    out = tmp_path / 'run'
    with pytest.raises(ValueError, match='nothing to resume'):
        train(tiny_random_config(VOCABULARY), settings(steps=2), random_episodes(), out, resume=True)
    assert not (out / 'train_state.pt').exists()
    train(tiny_random_config(VOCABULARY), settings(steps=4), random_episodes(), out)
    with pytest.raises(ValueError, match='--overwrite'):
        train(tiny_random_config(VOCABULARY), settings(steps=2), random_episodes(), out)
    assert saved_step(out) == 4 and logged_steps(out) == [1, 2, 3, 4]
    train(tiny_random_config(VOCABULARY), settings(steps=3), random_episodes(), out, overwrite=True)
    assert saved_step(out) == 3 and logged_steps(out) == [1, 2, 3]        # a new log, not appended to the old one


def test_validation_holds_out_whole_layouts_across_data_directories(tmp_path, monkeypatch):
    """Expert and recovery demonstrations of one (family, seed) never sit on both sides of the split."""
    expert, recovery = random_episodes(6), random_episodes(6)       # two directories with the same seeds
    for episode in recovery:
        episode.actions = -episode.actions
    banks = []
    bank = training.DemoBank

    def recording(episodes, *args):
        banks.append(list(episodes))
        return bank(episodes, *args)

    monkeypatch.setattr(training, 'DemoBank', recording)
    for seed in range(4):
        banks.clear()
        train(tiny_random_config(VOCABULARY), settings(steps=1, seed=seed, val_fraction=0.3), expert + recovery,
              tmp_path / f'run{seed}')
        trained, held_out = ({(ep.family, ep.seed) for ep in episodes} for episodes in banks)
        assert held_out and not trained & held_out
        assert len(banks[0]) + len(banks[1]) == 12


def test_val_fraction_zero_trains_on_every_episode_and_logs_no_validation(tmp_path):
    exported = train(tiny_random_config(VOCABULARY), settings(steps=2, val_fraction=0.0), random_episodes(),
                     tmp_path / 'run')
    assert json.loads((exported / 'config.json').read_text())['training']['episodes'] == 4
    log = [json.loads(line) for line in (tmp_path / 'run' / 'loss_log.jsonl').read_text().splitlines()]
    assert not any('val_loss' in entry for entry in log)


def test_a_single_layout_cannot_be_split_and_says_so_before_training(tmp_path):
    with pytest.raises(ValueError, match='cannot be split'):
        train(tiny_random_config(VOCABULARY), settings(), random_episodes(1), tmp_path / 'run')
    assert not (tmp_path / 'run' / 'train_state.pt').exists()


def test_a_resumed_run_reproduces_the_uninterrupted_one_exactly(tmp_path, monkeypatch):
    config = settings(steps=6, save_every=3, shift_pixels=4, token_drop_probability=0.5)
    train(tiny_random_config(VOCABULARY), config, random_episodes(), tmp_path / 'straight')
    optimise, calls = training._optimise, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt('stopped after the step-3 save')
        return optimise(*args)

    monkeypatch.setattr(training, '_optimise', interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_random_config(VOCABULARY), config, random_episodes(), tmp_path / 'resumed')
    monkeypatch.setattr(training, '_optimise', optimise)
    assert saved_step(tmp_path / 'resumed') == 3
    train(tiny_random_config(VOCABULARY), config, random_episodes(), tmp_path / 'resumed', resume=True)
    straight = torch.load(tmp_path / 'straight' / 'train_state.pt', weights_only=False)['model']
    resumed = torch.load(tmp_path / 'resumed' / 'train_state.pt', weights_only=False)['model']
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert logged_steps(tmp_path / 'resumed') == [1, 2, 3, 4, 5, 6]


def test_train_config_values_that_cannot_train_are_refused_before_any_work(tmp_path):
    for bad in (dict(steps=0), dict(batch_size=0), dict(log_every=0), dict(save_every=0), dict(val_fraction=1.0),
                dict(token_drop_min_keep=1.5), dict(token_drop_min_keep=0.0), dict(token_drop_families='unifrom')):
        with pytest.raises(ValueError):
            train(tiny_random_config(VOCABULARY), settings(**bad), random_episodes(), tmp_path / 'run')
        assert not (tmp_path / 'run').exists(), bad
    np.testing.assert_equal(settings().check(), None)
