"""Benchmark scripts' own logic: target options and the plot of the pruning benchmark."""
import argparse
from pathlib import Path

import matplotlib.image
import pytest

from specprune_ros.evaluation.statistics import wilson_interval

from benchmark_scripts import load_benchmark_script

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    return load_benchmark_script('pruning_closed_loop')


def test_success_intervals_touching_0_and_100_percent_plot(tmp_path):
    """Wilson intervals of 0/n and n/n end a rounding error inside 0% / 100% for some n (0/11, 6/6).

    The error bars must not go negative.
    """
    benchmark = load_benchmark()
    rows = [{'config': 'all won', 'success': 1.0, 'ci95': wilson_interval(6, 6), 'speedup': 1.0},
            {'config': 'all lost', 'success': 0.0, 'ci95': wilson_interval(0, 11), 'speedup': 2.0},
            {'config': 'edge', 'success': 1.0, 'ci95': (0.6, 0.9999999999999999), 'speedup': 1.4},
            {'config': 'no speed', 'success': 0.5, 'ci95': wilson_interval(5, 10), 'speedup': float('nan')}]
    path = tmp_path / 'plot.png'
    benchmark.plot(rows, path)
    assert matplotlib.image.imread(path).shape[0] > 100


def test_wilson_interval_contains_the_rate_at_the_edges():
    for n in range(1, 200):
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0


def test_targets_come_from_the_command_line():
    benchmark = load_benchmark()
    assert benchmark.parse_target('vla_pruner 25%=1.8:0.03') == ('vla_pruner 25%', 1.8, 0.03)
    assert benchmark.parse_target('a=b=2:0.1') == ('a=b', 2.0, 0.1)
    for bad in ('vla_pruner', 'x=1.8', 'x=fast:0.1', '=1:0'):
        with pytest.raises(argparse.ArgumentTypeError, match='LABEL=SPEEDUP:LOSS'):
            benchmark.parse_target(bad)
    outcomes = {'none': [True] * 30, 'mine': [True] * 29 + [False], 'random 25%': [False] * 30}
    speed = {'mine': {'steady_speedup': 2.5}}
    lines = benchmark.target_lines(outcomes, speed, {}, targets=(('mine', 2.0, 0.2),), baselines=('random 25%',))
    assert len(lines) == 1 and '**mine**' in lines[0] and 'within 20 points: met' in lines[0]
    assert 'vs random 25%' in lines[0] and 'above: met' in lines[0] and 'target 2.0x' in lines[0]
    source = (ROOT / 'benchmarks' / 'pruning_closed_loop.py').read_text()
    assert 'issue' not in source


def test_a_failing_plot_loses_no_results(tmp_path, monkeypatch, capsys):
    benchmark = load_benchmark()

    def broken_plot(rows, path):
        raise ValueError("'yerr' must not contain negative values")
    monkeypatch.setattr(benchmark, 'plot', broken_plot)
    benchmark.main(['--model', 'tiny-random', '--episodes-per-family', '1', '--latency-episodes', '1',
                    '--workers', '1', '--threads', '1', '--configs', 'none', '--wide', '--execute-steps', '8',
                    '--target', 'none=1.0:0.5', '--out', str(tmp_path)])
    output = capsys.readouterr().out
    assert 'warning: the plot failed' in output and '| none |' in output
    assert (tmp_path / 'pruning_closed_loop.md').is_file() and (tmp_path / 'pruning_closed_loop.json').is_file()
    assert not (tmp_path / 'pruning_closed_loop.png').exists()
    assert '**none**' in (tmp_path / 'pruning_closed_loop.md').read_text()


def test_frame_decoding_benchmark_writes_both_paths_of_the_same_frames(tmp_path, monkeypatch):
    """A small run: one row per camera size, the scale the node would pick, both times and their difference."""
    monkeypatch.setenv('MUJOCO_GL', 'egl')
    decoding = load_benchmark_script('frame_decoding')
    report = decoding.main(['--sizes', '320x240', '640x480', '--frames', '2', '--repeats', '1', '--input', '96',
                            '--out', str(tmp_path)])
    rows = report['rows']
    assert [row['camera'] for row in rows] == ['320x240', '640x480'] and [row['scale'] for row in rows] == [2, 4]
    for row in rows:
        assert row['full_ms']['median'] > 0 and row['scaled_ms']['median'] > 0 and row['speedup'] > 0
        assert 0 <= row['mean_abs_difference'] < 3
    table = (tmp_path / 'frame_decoding.md').read_text()
    assert '| 640x480 |' in table and 'Commit: ' in table
    with pytest.raises(SystemExit):
        decoding.main(['--sizes', '640by480', '--out', str(tmp_path)])


@pytest.mark.parametrize('arguments, message', [
    (['--configs', 'specprune full'], "--configs: unknown label 'specprune full'"),
    (['--extra', 'none=random:{"keep_ratio": 0.02}'], r"--extra: label\(s\) \['none'\] already name a configuration"),
    (['--extra', 'mine=specprun'], "configuration 'mine': unknown pruning method 'specprun'"),
    (['--extra', 'mine=random:{"keep_ratio": 2}'], "configuration 'mine': keep_ratio: 2.0 is outside"),
    (['--target', 'vla_pruner 25=1.8:0.03'], "--target: no configuration 'vla_pruner 25' in this run"),
    (['--episodes-per-family', '0'], '--episodes-per-family must be at least 1'),
])
def test_a_run_that_would_waste_or_corrupt_results_is_refused_early(tmp_path, monkeypatch, arguments, message):
    benchmark = load_benchmark()
    ran = []
    monkeypatch.setattr(benchmark, 'evaluate', lambda *a, **k: ran.append(a) or [])
    with pytest.raises(SystemExit, match=message):
        benchmark.main(['--model', 'tiny-random', '--latency-episodes', '0', '--wide', '--out', str(tmp_path),
                        *arguments])
    assert not ran and not any(tmp_path.iterdir())


def test_the_report_header_survives_without_a_latency_phase(tmp_path):
    load_benchmark().main(['--model', 'tiny-random', '--episodes-per-family', '1', '--latency-episodes', '0',
                           '--workers', '1', '--configs', 'none', '--wide', '--execute-steps', '8',
                           '--out', str(tmp_path)])
    first = (tmp_path / 'pruning_closed_loop.md').read_text().splitlines()[0]
    assert first.startswith("Model 'tiny-random', 1 held-out episodes per family x 3 families")
