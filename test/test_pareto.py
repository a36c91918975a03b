"""The Pareto benchmark: its budget grid, its front, and a small run end to end (simulator + latency harness)."""
import json
import shutil

import matplotlib.image

from benchmark_scripts import load_benchmark_script


def load_pareto():
    return load_benchmark_script('pareto')


def test_budget_grid_sweeps_keep_ratios_and_specprune_scales():
    pareto = load_pareto()
    grid = pareto.budget_grid(['vla_pruner', 'specprune', 'vla_cache'], (0.5, 0.1), (1.0, 2.0))
    labels = [g['label'] for g in grid]
    assert labels == ['none', 'vla_pruner 50%', 'vla_pruner 10%', 'specprune x1', 'specprune x2', 'vla_cache']
    assert grid[2]['method_config'] == {'keep_ratio': 0.1}
    assert grid[4]['method_config'] == {'controller': {'alpha': 2.0}} and grid[5]['method_config'] is None
    ours = [entry['method_config'] for entry in pareto.budget_grid(['coverage_ranked'], (0.5, 0.35, 0.1), ())[1:4]]
    # fine mode keeps its 26 / 20 proportion; the early stage 50 / 20 of the final budget below the default, 30
    # points more above it (at most every patch), as the method's own budget knob keeps them
    assert ours == [{'keep_ratio': 0.5, 'fine_keep_ratio': 0.65, 'early_keep_ratio': 0.8},
                    {'keep_ratio': 0.35, 'fine_keep_ratio': 0.455, 'early_keep_ratio': 0.65},
                    {'keep_ratio': 0.1, 'fine_keep_ratio': 0.13, 'early_keep_ratio': 0.25}]
    from specprune_ros.pruning import build_method
    for ratio, settings in zip((0.5, 0.35, 0.1), ours):
        knob = build_method('coverage_ranked')
        knob.set_budget(ratio)
        configured = build_method('coverage_ranked', settings)
        for mode in ('coarse', 'fine'):
            for early in (False, True):
                assert abs(knob.keep_fraction(mode, early) - configured.keep_fraction(mode, early)) < 1e-9


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


def test_a_report_reseeds_a_fresh_cache_and_carries_rows_of_other_checkpoints(tmp_path, capsys, monkeypatch):
    pareto = load_pareto()
    small = ['--episodes-per-family', '1', '--methods', 'random', '--keep-ratios', '0.5', '--speed-steps', '0',
             '--workers', '1']
    first = pareto.main(small + ['--out', str(tmp_path / 'first')])
    report = tmp_path / 'first' / 'pareto.json'
    for row in first['rows']:                                   # the outcomes, one per episode, in evaluation order
        assert row['run']['outcomes'].count('1') / 3 == row['success'] and len(row['run']['outcomes']) == 3
        assert row['run']['key']['model'] == pareto.model_key('reference') and row['run']['key']['episodes'] == 1
    assert report.read_text().count('"run": {') == 2                # one line per row's outcomes

    def no_episodes(*args, **kwargs):
        raise AssertionError('an episode ran although its outcomes were seeded')
    monkeypatch.setattr(pareto, 'evaluate', no_episodes)
    capsys.readouterr()
    again = pareto.main(small + ['--out', str(tmp_path / 'again'), '--seed-cache-from', str(report)])
    assert 'seeded the cache with 2 configurations' in capsys.readouterr().out
    assert again['rows'] == json.loads(report.read_text())['rows']

    changed = json.loads(report.read_text())                    # as if an earlier default had been in force
    changed['rows'][1]['run']['key']['resolved']['num_layers'] += 1
    (tmp_path / 'changed.json').write_text(json.dumps(changed))
    seeded = pareto.main(small + ['--out', str(tmp_path / 'changed'), '--seed-cache-from',
                                  str(tmp_path / 'changed.json'), '--cached-only'])
    log = capsys.readouterr().out
    assert 'seeded the cache with 1 configurations' in log and '1: resolved configuration differs' in log
    assert [r['label'] for r in seeded['rows']] == ['none'] and 'random 50%: not run' in log

    older = json.loads(report.read_text())                      # an older report: no outcomes, timed speedups
    for row, speedup in zip(older['rows'], (1.0, 1.6)):
        row.pop('run')
        row.update(speedup=speedup, speedup_ci95=[speedup, speedup], kept_visual_ratio=0.5, total_ms=10.0)
    (tmp_path / 'older.json').write_text(json.dumps(older))
    both = pareto.main(small + ['--models', 'again=reference', '--out', str(tmp_path / 'both'), '--cached-only',
                                '--seed-cache-from', str(report), '--carry-rows-from', str(tmp_path / 'older.json')])
    assert [(r['checkpoint'], 'carried_from' in r) for r in both['rows']] == [
        ('again', False), ('again', False), ('reference', True), ('reference', True)]
    assert all(r['speed_from'] == r['carried_from'] for r in both['rows'][2:])     # nothing timed in this run
    table = (tmp_path / 'both' / 'pareto.md').read_text()
    assert '| config | speedup | again | reference (carried) |' in table and '| random 50% | 1.60x † |' in table
    assert f"## reference (carried from {older['meta']['commit']}, {older['meta']['date']})" in table
    assert older['meta']['command'] in table and both['meta']['carried']

    timed = {'none': {'speedup': 1.0, 'speedup_ci95': [1.0, 1.0], 'kept_visual_ratio': 1.0, 'total_ms': 20.0}}
    rows, runs = pareto.carry_rows(tmp_path / 'older.json', {'again'}, timed)   # this run's speed where it timed it
    assert rows[0]['total_ms'] == 20.0 and 'speed_from' not in rows[0]
    assert rows[1]['total_ms'] == 10.0 and rows[1]['speed_from'] in runs and rows[1]['on_front']


def test_budgets_named_twice_run_once_and_close_ones_keep_their_own_labels():
    pareto = load_pareto()
    grid = pareto.budget_grid(['random', 'random'], (0.125, 0.12, 0.12), (1.0,))
    labels = [g['label'] for g in grid]
    assert labels == ['none', 'random 12.5%', 'random 12%']          # were 'random 12%' twice, one result lost
    assert [g['budget'] for g in grid[1:]] == [0.125, 0.12]
    assert [g['label'] for g in pareto.budget_grid(['fastv'], pareto.KEEP_RATIOS, ())[1:]] == \
        ['fastv 75%', 'fastv 50%', 'fastv 35%', 'fastv 25%', 'fastv 15%', 'fastv 10%']


def test_cached_only_with_nothing_cached_writes_the_report_without_a_plot(tmp_path, capsys):
    load_pareto().main(['--models', 'tiny-random', '--methods', 'random', '--keep-ratios', '0.5',
                        '--episodes-per-family', '1', '--speed-steps', '0', '--cached-only', '--out', str(tmp_path)])
    assert 'no plot' in capsys.readouterr().out
    assert (tmp_path / 'pareto.md').is_file() and not (tmp_path / 'pareto.png').exists()


def test_a_speed_row_without_an_interval_shows_its_speedup():
    """One timed step gives a speedup but no bootstrap interval: the table shows the speedup alone."""
    pareto = load_pareto()
    assert pareto.speed_cell({'speedup': 1.5, 'speedup_ci95': (None, None)}, True) == '1.50x'
    assert pareto.speed_cell({'speedup': 1.5, 'speedup_ci95': (1.4, 1.6)}, True) == '1.50x (1.40-1.60)'
