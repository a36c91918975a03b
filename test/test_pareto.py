"""The Pareto benchmark: its budget grid, its front, and a small run end to end (simulator + latency harness)."""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import matplotlib.image

ROOT = Path(__file__).resolve().parents[1]


def load_pareto():
    spec = importlib.util.spec_from_file_location('pareto', ROOT / 'benchmarks' / 'pareto.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_budget_grid_sweeps_keep_ratios_and_specprune_scales():
    pareto = load_pareto()
    grid = pareto.budget_grid(['vla_pruner', 'specprune', 'vla_cache'], (0.5, 0.1), (1.0, 2.0))
    labels = [g['label'] for g in grid]
    assert labels == ['none', 'vla_pruner 50%', 'vla_pruner 10%', 'specprune x1', 'specprune x2', 'vla_cache']
    assert grid[2]['method_config'] == {'keep_ratio': 0.1}
    assert grid[4]['method_config'] == {'controller': {'alpha': 2.0}} and grid[5]['method_config'] is None
    ours = pareto.budget_grid(['coverage_ranked'], (0.5,), ())[1]['method_config']
    assert ours == {'keep_ratio': 0.5, 'fine_keep_ratio': 0.65}      # fine mode keeps its 26 / 20 proportion


def test_front_keeps_only_configurations_nothing_beats_in_both():
    pareto = load_pareto()
    points = [('none', 1.0, 0.95), ('a', 1.5, 0.95), ('b', 2.0, 0.80), ('c', 1.8, 0.70), ('d', 2.0, 0.85),
              ('e', 1.5, 0.95)]
    assert pareto.pareto_front(points) == ['a', 'e', 'd']   # ties stay; 'none' is beaten by 'a' at equal success


def test_checkpoints_are_named_after_themselves_or_by_name():
    pareto = load_pareto()
    assert pareto.parse_models(['reference', 'fair=outputs/fair_checkpoint', 'outputs/plain/']) == {
        'reference': 'reference', 'fair': 'outputs/fair_checkpoint', 'plain': 'outputs/plain/'}
    try:
        pareto.parse_models(['a/x', 'b/x'])
    except ValueError as error:
        assert 'NAME=DIRECTORY' in str(error)
    else:
        raise AssertionError('two checkpoints with one name were accepted')


def test_small_sweep_end_to_end_and_resumes_from_its_cache(tmp_path, capsys):
    pareto = load_pareto()
    copy = tmp_path / 'copy'
    shutil.copytree(pareto.REFERENCE_CHECKPOINT, copy)
    argv = ['--episodes-per-family', '1', '--methods', 'random', '--keep-ratios', '0.5', '--speed-steps', '2',
            '--speed-width', '64', '--speed-layers', '2', '--models', 'reference', f'copy={copy}',
            '--out', str(tmp_path)]
    first = pareto.main(argv)
    assert [r['checkpoint'] for r in first['rows']] == ['reference', 'reference', 'copy', 'copy']
    copied = {r['label']: r for r in first['rows'] if r['checkpoint'] == 'copy'}
    rows = {r['label']: r for r in first['rows'] if r['checkpoint'] == 'reference'}
    assert {k: v['success'] for k, v in copied.items()} == {k: v['success'] for k, v in rows.items()}
    assert set(rows) == {'none', 'random 50%'}
    assert rows['none']['episodes'] == 3 and rows['none']['delta_vs_none'] == 0.0
    assert rows['none']['speedup'] == 1.0 and 0.3 < rows['random 50%']['kept_visual_ratio'] < 0.7
    assert any(r['on_front'] for r in first['rows'])
    saved = json.loads((tmp_path / 'pareto.json').read_text())
    assert saved['rows'] == json.loads(json.dumps(first['rows']))
    assert matplotlib.image.imread(tmp_path / 'pareto.png').shape[0] > 100
    capsys.readouterr()
    again = pareto.main(argv)                                   # the success phase comes from the cache
    assert capsys.readouterr().out.count('(cached)') == 4
    table = (tmp_path / 'pareto.md').read_text()
    assert '## Every checkpoint' in table and '| config | speedup | reference | copy |' in table
    budget = argv.index('0.5')
    wider = argv[:budget] + ['0.5', '0.25'] + argv[budget + 1:] + ['--cached-only', '--speed-steps', '0']
    partial = pareto.main(wider)                                # a larger grid reports only what was run
    assert capsys.readouterr().out.count('not run on') == 2
    assert [r['label'] for r in partial['rows']] == ['none', 'random 50%'] * 2
    assert all(r['speedup'] is None for r in partial['rows'])
    assert [r['success'] for r in again['rows']] == [r['success'] for r in first['rows']]
