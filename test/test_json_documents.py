"""Reports are standard JSON: what was not measured is ``null`` (never ``NaN``), and reading one back still renders."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from specprune_ros.bridge.episodes import EpisodeLog, EpisodeSpec, markdown_summary, summarize_outcomes, write_summary
from specprune_ros.core.json_documents import is_missing, number_text, strict_json
from specprune_ros.evaluation.closed_loop import markdown_table, summarize, write_report


def _refuse(constant: str):
    raise ValueError(f'{constant} is not JSON')


def strict_load(path: Path):
    """The document at ``path``, refusing the ``NaN`` / ``Infinity`` words Python's json writes by default."""
    return json.loads(Path(path).read_text(), parse_constant=_refuse)


def test_non_finite_and_numpy_values_become_plain_json():
    document = {'nan': float('nan'), 'inf': float('-inf'), 'f32': np.float32('nan'), 'i64': np.int64(3),
                'array': np.array([1.5, np.nan]), 'pair': (0.5, float('inf')), 'nested': [{'x': np.float64(2.0)}],
                'none': None, 'text': 'NaN'}
    assert json.loads(strict_json(document, indent=2), parse_constant=_refuse) == {
        'nan': None, 'inf': None, 'f32': None, 'i64': 3, 'array': [1.5, None], 'pair': [0.5, None],
        'nested': [{'x': 2.0}], 'none': None, 'text': 'NaN'}
    with pytest.raises(TypeError):                 # anything else is refused, never written as something invalid
        strict_json({'path': object()})
    assert strict_json({'path': Path('/x')}, default=str) == '{"path": "/x"}'


def test_missing_numbers_render_as_a_dash():
    assert is_missing(None) and is_missing(float('nan')) and is_missing(np.float32('inf'))
    assert not is_missing(0.0) and not is_missing(np.int64(0))
    assert number_text(None) == number_text(float('nan')) == '-'
    assert number_text(0.4567, '.1f', scale=100) == '45.7' and number_text(None, missing='n/a') == 'n/a'


def test_a_bridge_summary_with_an_empty_episode_is_strict_json_and_renders_again(tmp_path):
    """An episode with no control period has no jerk, speed or hold share: null in the file, '-' in the table."""
    empty = EpisodeLog(EpisodeSpec('pick', 0), 'pick it up', 0, 0.1).outcome(0.0)
    summary = summarize_outcomes([empty], label='none', mode='sync')
    assert np.isnan(summary['overall']['mean_abs_jerk'])
    json_path, _ = write_summary(summary, tmp_path / 'summary.json')
    read_back = strict_load(json_path)['summary']
    assert read_back['overall']['mean_abs_jerk'] is None and read_back['overall']['hold_fraction'] is None
    assert markdown_summary([read_back]) == markdown_summary([summary])
    row = markdown_summary([read_back]).splitlines()[-1]
    assert row.startswith('| none | sync | all | 0.0% (0/1)') and '| - |' in row


def test_a_closed_loop_report_without_episodes_is_strict_json_and_renders_again(tmp_path):
    summary = summarize([], 'none')
    assert np.isnan(summary['overall']['latency_ms_median'])
    json_path, md_path = write_report([summary], tmp_path, run={'model': 'reference', 'scale': float('nan')})
    document = strict_load(json_path)
    assert document['results'][0]['overall']['latency_ms_median'] is None
    assert document['run'] == {'model': 'reference', 'scale': None} and 'scale: null' in md_path.read_text()
    assert markdown_table(document['results']) == markdown_table([summary])
    assert markdown_table([summary]).splitlines()[-1] == '| none | all | 0.0% (0/0) | 0.0-100.0% | - | - | - | - | -% |'
