"""Offline replay evaluation on real bag files (no DDS).

The unpruned policy reproduces the recorded chunks exactly and twice in a row (determinism), every pruning method's
deviation, kept tokens and latency are reported, and the CLI writes the markdown, JSON and PNG plots.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from specprune_ros.adapters.tiny import write_tiny_checkpoint
from specprune_ros.bags.replay_eval import ReplayConfig, evaluate_streams
from specprune_ros.bags.report import markdown, write_report
from specprune_ros.bags.sim_bag import SimBagOptions, record_sim_bag
from specprune_ros.bags.streams import StreamTopics, load_streams

ROOT = Path(__file__).resolve().parents[1]
SPECPRUNE_TINY = {'num_layers': 4}        # tiny-random has 4 decoder layers


@pytest.fixture(scope='module')
def policy_bag(tmp_path_factory):
    """An episode where tiny-random (unpruned) acted, executing 4 steps per chunk; its chunks are in the bag."""
    from specprune_ros.models.loading import load_policy
    policy = load_policy('tiny-random', 'none')
    path = tmp_path_factory.mktemp('replay') / 'policy_bag'
    result = record_sim_bag(path, SimBagOptions(families=('push',), max_steps=16, actor='policy', execute_steps=4,
                                                method='none', model='tiny-random'), policy=policy)
    assert result.counts['/specprune_node/action_chunk'] == 4
    return path


def test_unpruned_replay_reproduces_the_recorded_chunks_and_reports_each_method(policy_bag, tmp_path):
    streams = load_streams(policy_bag)
    assert streams.has_chunks and streams.has_commands
    config = ReplayConfig(model='tiny-random', methods=('specprune', 'random'),
                          method_configs={'specprune': SPECPRUNE_TINY}, progress=False)
    report = evaluate_streams(streams, config)
    assert report['schedule'] == 'recorded' and report['inferences'] == 4 and report['resets'] == [0]
    assert report['determinism'] == {'max_abs_diff': 0.0, 'identical': True}
    methods = report['methods']
    assert list(methods) == ['none', 'specprune', 'random']
    none = methods['none']
    assert none['vs_recorded_chunks']['max_abs'] == 0.0 and none['vs_recorded_chunks']['exact_steps'] == 4
    assert none['vs_unpruned']['max_abs'] == 0.0 and none['speedup'] == 1.0
    assert report['recorded_by'] == [{'method': 'none', 'model': 'tiny-random', 'inferences': 4}]
    # the recorded commands are the executed chunk rows
    assert none['vs_recorded_actions']['max_abs'] < 1e-6
    visual = none['visual_tokens']
    assert none['kept_visual_tokens']['mean'] == visual > 0
    for name in ('specprune', 'random'):
        entry = methods[name]
        assert 0 < entry['kept_visual_tokens']['mean'] < visual
        assert entry['vs_unpruned']['chunk_mae'] > 0 and np.isfinite(entry['speedup']) and entry['flops_ratio'] < 1
        assert len(entry['series']['latency_ms']) == len(entry['series']['kept']) == 4
        low, high = entry['speedup_ci95']
        assert entry['pruned'] and low <= entry['speedup'] <= high and entry['speedup_samples'] == [4, 4]
    text = markdown(report)
    assert 'identical' in text and '4/4 chunks reproduced exactly' in text and '| specprune |' in text
    assert 'Recorded by: method `none` with model `tiny-random` (4 inferences).' in text
    low, high = methods['specprune']['speedup_ci95']
    assert f"{methods['specprune']['speedup']:.2f}x ({low:.2f}-{high:.2f}, n=4/4)" in text
    paths = write_report(report, tmp_path / 'report')
    for key in ('markdown', 'json', 'latency', 'kept_tokens', 'action_error', 'kept_patches'):
        assert paths[key].is_file() and paths[key].stat().st_size > 0, key
    document = json.loads(paths['json'].read_text())
    assert '_examples' not in document and document['methods']['random']['vs_unpruned']['chunk_mae'] > 0


def test_cli_on_an_expert_bag_with_compressed_frames(tmp_path):
    bag = tmp_path / 'expert'
    record_sim_bag(bag, SimBagOptions(max_steps=9, storage='sqlite3', compressed=True))
    out = tmp_path / 'out'
    done = subprocess.run(
        [sys.executable, str(ROOT / 'scripts' / 'evaluate_bag.py'), str(bag), '--model', 'tiny-random',
         '--methods', 'fastv', '--method-config', 'fastv={prune_layer: 1}', '--camera',
         'agentview=/camera/agentview/image_raw/compressed', '--camera', 'wrist=camera/wrist/image_raw/compressed',
         '--stride', '3', '--out', str(out), '--quiet'],
        capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert done.returncode == 0, done.stderr[-3000:]
    assert '| fastv |' in done.stdout and 'Recorded by: unknown' in done.stdout
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith('wrote ') and not any(line.lstrip().startswith('{') for line in lines), lines[-3:]
    document = json.loads((out / 'replay.json').read_text())
    assert document['schedule'] == 'every' and document['inferences'] == 3
    assert document['camera_types'] == {'agentview': 'sensor_msgs/msg/CompressedImage',
                                        'wrist': 'sensor_msgs/msg/CompressedImage'}
    assert document['determinism']['identical']
    assert document['methods']['none']['vs_recorded_actions']['compared'] == 3   # the expert's commands
    assert sorted(p.name for p in out.glob('*.png')) == ['action_error.png', 'kept_patches.png', 'kept_tokens.png',
                                                         'latency.png']


def test_a_run_that_keeps_every_token_claims_no_speedup_and_plots_are_labelled(policy_bag, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from specprune_ros.bags import report as report_module
    streams = load_streams(policy_bag)
    config = ReplayConfig(model='tiny-random', methods=('random',), method_configs={'random': {'keep_ratio': 1.0}},
                          schedule='every', stride=4, repeat_baseline=False, progress=False)
    report = evaluate_streams(streams, config)
    entry = report['methods']['random']
    assert entry['kept_visual_tokens']['mean'] == entry['visual_tokens'] and not entry['pruned']
    rows = {line.split('|')[1].strip(): line for line in markdown(report).splitlines() if line.startswith('| ')}
    assert '| baseline |' in rows['none']
    assert f"unpruned (all {entry['visual_tokens']} tokens kept; latency ratio" in rows['random']
    report['resets'] = [0, 2]      # as if a second episode started at the third inference
    figures = {}

    def keep(fig, path):
        figures[path.name] = fig
        return path
    monkeypatch.setattr(report_module, '_save', keep)
    report_module.plot(report, tmp_path)
    assert set(figures) == {'latency.png', 'kept_tokens.png', 'action_error.png', 'kept_patches.png'}
    latency_axes = figures['latency.png'].axes[0]
    assert not latency_axes.patches, 'no (overlapping, translucent) histogram bars'
    assert [t.get_text().split(' (')[0] for t in latency_axes.get_yticklabels()] == ['none', 'random']
    for name in ('kept_tokens.png', 'action_error.png'):
        resets = [line.get_xdata()[0] for line in figures[name].axes[0].get_lines() if line.get_linestyle() == '--'
                  and len(set(line.get_xdata())) == 1]
        assert resets == [1.5], name
    labels = {text.get_text() for ax in figures['kept_patches.png'].axes for text in ax.texts}
    assert labels == {'agentview', 'wrist'}
    for fig in figures.values():
        plt.close(fig)


def test_an_oft_libero_checkpoint_reads_its_8d_state_from_a_bag(tmp_path):
    """The pose layout picks the state a bag's pose and gripper topics give; a mismatch names --pose-layout."""
    bag = tmp_path / 'expert'
    record_sim_bag(bag, SimBagOptions(max_steps=6, storage='sqlite3'))
    oft = write_tiny_checkpoint(tmp_path / 'oft', 'openvla-oft')
    common = [sys.executable, str(ROOT / 'scripts' / 'evaluate_bag.py'), str(bag), '--model', str(oft),
              '--methods', 'random', '--stride', '3', '--out', str(tmp_path / 'out'), '--quiet']
    environment = {**os.environ, 'OMP_NUM_THREADS': '1'}
    refused = subprocess.run(common, capture_output=True, text=True, timeout=300, env=environment)
    assert refused.returncode != 0 and 'expects 8 (an OpenVLA-OFT LIBERO checkpoint: --pose-layout libero)' \
        in refused.stderr, refused.stderr[-2000:]
    done = subprocess.run(common + ['--pose-layout', 'libero'], capture_output=True, text=True, timeout=300,
                          env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    libero = load_streams(bag, StreamTopics(pose_layout='libero'))
    reference = load_streams(bag)
    first, same = libero.observations[0], reference.observations[0]
    assert first.proprio.shape == (8,) and same.proprio.shape == (6,)
    assert first.proprio[6] == pytest.approx(-first.proprio[7])
    assert first.proprio[6] == pytest.approx(same.proprio[5] / 2)            # half the finger gap
    np.testing.assert_allclose(first.proprio[:3], same.proprio[:3])


def test_a_stride_the_recorded_schedule_does_not_use_is_reported_as_unused(policy_bag):
    """--stride with the default schedule on a bag with chunks: the report says stride null, and why."""
    streams = load_streams(policy_bag)
    config = ReplayConfig(model='tiny-random', methods=(), stride=3, repeat_baseline=False, progress=False)
    report = evaluate_streams(streams, config)
    assert report['schedule'] == 'recorded' and report['inferences'] == 4 and report['stride'] is None
    assert 'stride 3 not used: schedule recorded infers where the live node inferred' in markdown(report)
    every = evaluate_streams(streams, ReplayConfig(model='tiny-random', methods=(), schedule='every', stride=3,
                                                   repeat_baseline=False, progress=False))
    assert every['stride'] == 3 and not any('not used' in note for note in every['notes'])
