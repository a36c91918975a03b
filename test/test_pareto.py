"""The Pareto benchmark: its budget grid, its front, and a small run end to end (simulator + latency harness)."""
import importlib.util
import json
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


def test_small_sweep_end_to_end_and_resumes_from_its_cache(tmp_path, capsys):
    pareto = load_pareto()
    argv = ['--episodes-per-family', '1', '--methods', 'random', '--keep-ratios', '0.5', '--speed-steps', '2',
            '--speed-width', '64', '--speed-layers', '2', '--out', str(tmp_path)]
    first = pareto.main(argv)
    rows = {r['label']: r for r in first['rows']}
    assert set(rows) == {'none', 'random 50%'}
    assert rows['none']['episodes'] == 3 and rows['none']['delta_vs_none'] == 0.0
    assert rows['none']['speedup'] == 1.0 and 0.3 < rows['random 50%']['kept_visual_ratio'] < 0.7
    assert any(r['on_front'] for r in first['rows'])
    saved = json.loads((tmp_path / 'pareto.json').read_text())
    assert saved['rows'] == json.loads(json.dumps(first['rows']))
    assert matplotlib.image.imread(tmp_path / 'pareto.png').shape[0] > 100
    capsys.readouterr()
    again = pareto.main(argv)                                   # the success phase comes from the cache
    assert capsys.readouterr().out.count('(cached)') == 2
    assert [r['success'] for r in again['rows']] == [r['success'] for r in first['rows']]
