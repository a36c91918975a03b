"""The peer benchmark (``benchmarks/peer_latency.py``): what it says without the peers, and, opt-in, a tiny run.

The tiny run needs checkouts of the papers' public code named by ``SPECPRUNE_PEER_SPECPRUNE_VLA``
(github.com/alexwhz-sjtu/SpecPrune-VLA) and ``SPECPRUNE_PEER_VLA_PRUNER`` (github.com/MINT-SJTU/VLA-Pruner); each
part is skipped, with that reason, when its variable is unset. It runs the benchmark at a tiny shape (128 wide x 16
layers: VLA-Pruner reads its temporal attention at layer 15) through the simulator's frames and checks the report's
schema, that the peers' unpruned outputs agree with ours (the same model is timed on both sides) and that the
pruned runs on both sides kept fewer visual tokens. Times are not asserted: speed lives in the benchmark.
"""
import os

import numpy as np
import pytest

from benchmark_scripts import load_benchmark_script

ROW_KEYS = {'comparison', 'label', 'side', 'pruned', 'median_ms', 'p10_ms', 'p90_ms', 'n', 'kept_visual_per_layer',
            'speedup_over_own_unpruned', 'speedup_ci95'}
RATIO_KEYS = {'method', 'ours', 'theirs', 'ours_over_theirs', 'ours_over_theirs_ci95', 'ours_faster_by',
              'target_ours_over_theirs_at_most', 'meets_target'}
TINY = ['--width', '128', '--layers', '16', '--vision-scale', '0.05', '--steps', '1', '--warmup', '3',
        '--threads', '2', '--quiet']


def load_benchmark():
    return load_benchmark_script('peer_latency')


def peer_or_skip(variable: str) -> str:
    path = os.environ.get(variable, '')
    if not path:
        reason = f'opt-in: set {variable} to a checkout of the peer\'s public code to run this comparison'
        print(reason)
        pytest.skip(reason)
    return path


def test_without_checkouts_it_names_what_is_missing_and_measures_nothing(tmp_path, monkeypatch, capsys):
    benchmark = load_benchmark()
    monkeypatch.delenv(benchmark.ENV_SPECPRUNE, raising=False)
    monkeypatch.setenv(benchmark.ENV_VLA_PRUNER, str(tmp_path))       # set, but not a VLA-Pruner checkout
    assert benchmark.main(['--out', str(tmp_path / 'out')]) is None
    printed = capsys.readouterr().out
    assert f'{benchmark.ENV_SPECPRUNE} is not set' in printed
    assert f'{benchmark.ENV_VLA_PRUNER}={tmp_path}: no src/openvla/prismatic/extern/hf/modeling_prismatic.py' in printed
    assert not (tmp_path / 'out').exists()


def test_block_view_stand_in_matches_the_patch_grid():
    """SpecPrune-VLA's similarity code cuts 224 px frames into 14 px patches through this stand-in."""
    benchmark = load_benchmark()
    image = np.arange(28 * 42 * 3).reshape(28, 42, 3)
    blocks = benchmark._view_as_blocks(image, (14, 14, 3))
    assert blocks.shape == (2, 3, 1, 14, 14, 3)
    assert (blocks[1, 2, 0] == image[14:28, 28:42]).all()


def _check_part(part: dict, labels: int, layer_visual: int) -> None:
    assert len(part['rows']) == labels
    for row in part['rows']:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row['n'] == 1 and row['median_ms'] > 0
        assert row['p10_ms'] <= row['median_ms'] <= row['p90_ms']
    for ratio in part['ratios']:
        assert RATIO_KEYS <= set(ratio), RATIO_KEYS - set(ratio)
    assert part['agreement']['agree'], part['agreement']
    for row in part['rows']:
        if row['pruned']:
            assert row['kept_visual_per_layer'] < layer_visual, row
        else:
            assert row['kept_visual_per_layer'] == layer_visual, row


def test_tiny_run_against_specprune_vla(tmp_path, monkeypatch):
    path = peer_or_skip('SPECPRUNE_PEER_SPECPRUNE_VLA')
    monkeypatch.setenv('SPECPRUNE_PEER_SPECPRUNE_VLA', path)
    benchmark = load_benchmark()
    report = benchmark.main(TINY + ['--only', 'specprune', '--out', str(tmp_path)])
    assert {'command', 'commit', 'date', 'device', 'torch'} <= set(report['meta'])
    (part,) = report['parts']
    assert part['name'] == 'specprune'
    _check_part(part, labels=5, layer_visual=512)
    for camera in ('primary', 'wrist'):
        check = part['defects']['layer1_topk'][camera]
        assert 0 <= check['picks_in_true_topk_mean'] <= check['k']
    assert (tmp_path / 'peer_latency.json').is_file() and (tmp_path / 'peer_latency.md').is_file()


def test_tiny_run_against_vla_pruner(tmp_path, monkeypatch):
    path = peer_or_skip('SPECPRUNE_PEER_VLA_PRUNER')
    monkeypatch.setenv('SPECPRUNE_PEER_VLA_PRUNER', path)
    benchmark = load_benchmark()
    report = benchmark.main(TINY + ['--only', 'vla_pruner'])
    (part,) = report['parts']
    assert part['name'] == 'vla_pruner'
    assert part['peer_process']['transformers'].startswith('4.39')
    _check_part(part, labels=4, layer_visual=256)
