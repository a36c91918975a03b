"""The ROS-free closed-loop harness and its statistics, on the real simulator."""
import json
import runpy
from pathlib import Path

import pytest

from specprune_ros.evaluation.closed_loop import (EpisodeResult, PolicySpec, evaluate, markdown_table, outcome_table,
                                                  run_episode, summarize, write_report)
import numpy as np

from specprune_ros.evaluation.statistics import paired_difference, wilson_interval
from specprune_ros.models.loading import load_policy
from specprune_ros.policy.errors import CheckpointError
from specprune_ros.sim import EVAL_SEED_START, TabletopEnv
from specprune_ros.sim.outcomes import OUTCOMES


@pytest.mark.parametrize('wins, trials, low, high', [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634),
                                                     (10, 10, 0.7225, 1.0), (80, 100, 0.7112, 0.8666)])
def test_wilson_interval_known_values(wins, trials, low, high):
    got = wilson_interval(wins, trials)
    assert got[0] == pytest.approx(low, abs=1e-3) and got[1] == pytest.approx(high, abs=1e-3)


def correlated_pairs(rng, n: int, p_control: float, p_lost: float, p_gained: float):
    """Paired outcomes: the treated run succeeds where the control did, except for losses and gains."""
    control = rng.random(n) < p_control
    flip = rng.random(n)
    treated = np.where(control, flip >= p_lost, flip < p_gained)
    return treated, control


def test_paired_difference_covers_the_true_difference_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    p_control, p_lost, p_gained = 0.9, 0.12, 0.3          # true difference: 0.9 * -0.12 + 0.1 * 0.3 = -0.078
    truth = -p_control * p_lost + (1 - p_control) * p_gained
    covered, paired_width, unpaired_width = 0, [], []
    for _ in range(2000):
        treated, control = correlated_pairs(rng, 100, p_control, p_lost, p_gained)
        delta, low, high = paired_difference(treated, control)
        assert low <= delta <= high
        assert delta == pytest.approx(treated.mean() - control.mean())
        covered += low <= truth <= high
        paired_width.append(high - low)
        l1, u1 = wilson_interval(int(treated.sum()), 100)
        l2, u2 = wilson_interval(int(control.sum()), 100)
        unpaired_width.append(np.hypot(treated.mean() - l1, u2 - control.mean())
                              + np.hypot(u1 - treated.mean(), control.mean() - l2))
    assert 0.93 <= covered / 2000 <= 0.975
    # pairing helps: failures shared with the baseline narrow the interval against independent samples
    assert np.median(paired_width) < 0.8 * np.median(unpaired_width)


def paired_outcomes(both: int, only_treated: int, only_control: int, neither: int):
    treated = [True] * both + [True] * only_treated + [False] * only_control + [False] * neither
    control = [True] * both + [False] * only_treated + [True] * only_control + [False] * neither
    return treated, control


def test_paired_difference_reproduces_the_published_worked_example():
    """Statistics with Confidence (Altman et al., 2nd ed., ch. 6, Table 6.2; Newcombe 1998, method 10).

    41 pairs, 14 positive on both, 5 on the first only, 0 on the second only, 22 on neither: difference 12.2%, 95% CI
    1.15% to 22.65% (with the continuity-corrected phi; without it the interval would be 2.2% to 21.7%).
    """
    delta, low, high = paired_difference(*paired_outcomes(14, 5, 0, 22))
    assert delta == pytest.approx(5 / 41)
    assert low == pytest.approx(0.0115, abs=5e-5) and high == pytest.approx(0.2265, abs=5e-5)
    # the correction only ever shrinks a positive correlation: a negative one (AD < BC) is used as it is
    delta, low, high = paired_difference(*paired_outcomes(2, 10, 3, 1))
    p1, p2, n = 12 / 16, 5 / 16, 16
    (l1, u1), (l2, u2) = wilson_interval(12, n), wilson_interval(5, n)
    phi = (2 * 1 - 10 * 3) / np.sqrt(12 * 4 * 5 * 11)
    assert low == pytest.approx(delta - np.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    assert high == pytest.approx(delta + np.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))


def test_paired_difference_edge_cases():
    same = np.array([True] * 80 + [False] * 20)
    delta, low, high = paired_difference(same, same)
    assert delta == 0.0 and -0.05 < low < 0.0 < high < 0.05
    delta, low, high = paired_difference(np.ones(50, bool), np.zeros(50, bool))
    assert delta == 1.0 and 0.85 < low < 1.0 and high == 1.0
    swapped = paired_difference(*correlated_pairs(np.random.default_rng(1), 60, 0.7, 0.2, 0.2)[::-1])
    forward = paired_difference(*correlated_pairs(np.random.default_rng(1), 60, 0.7, 0.2, 0.2))
    assert swapped == pytest.approx((-forward[0], -forward[2], -forward[1]))
    assert np.isnan(paired_difference([], [])[0])
    with pytest.raises(ValueError, match='differ in length'):
        paired_difference([True], [True, False])


def test_episode_executes_part_of_each_chunk_until_the_step_limit():
    env = TabletopEnv()
    policy = load_policy('tiny-random', 'random', {'keep_ratio': 0.5})
    result = run_episode(env, policy, 'pick', EVAL_SEED_START, execute_steps=6, max_steps=45)
    assert not result.success  # a random-initialised policy does not pick anything up
    assert result.steps == 45
    assert len(result.latencies_s) == 8  # ceil(45 / 6) chunks
    assert all(k == pytest.approx(144.0) for k in result.visual_kept)  # 50% of 2 x 144 from layer 0 on
    assert all(0.4 < r < 0.7 for r in result.flops_ratio)


def test_a_chunk_with_nan_holds_one_step_and_the_episode_goes_on():
    """As the policy node does: no motion for a step (gripper as last commanded), counted, then a new chunk."""
    env = TabletopEnv()
    policy = load_policy('tiny-random', 'none')
    predict, calls = policy.predict, []

    def nan_on_the_second_call(observation):
        output = predict(observation)
        calls.append(observation.executed_actions)
        if len(calls) == 2:
            output.actions = np.full_like(output.actions, np.nan)
        return output
    policy.predict = nan_on_the_second_call
    result = run_episode(env, policy, 'pick', EVAL_SEED_START, execute_steps=4, max_steps=13)
    assert result.non_finite_chunks == 1 and result.steps == 13 and len(calls) == 4     # 4 + 1 held + 4 + 4
    held = calls[2]
    assert held.shape == (1, 7) and not held[0, :6].any() and held[0, 6] == calls[1][-1, 6]
    assert summarize([result])['overall']['non_finite_chunks'] == 1


def test_a_family_named_twice_is_refused():
    """Its episodes would run twice and narrow the confidence interval falsely."""
    with pytest.raises(ValueError, match='name a family twice'):
        evaluate(PolicySpec(model='tiny-random', method='none'), ['pick', 'pick'], 1)


def test_parallel_evaluation_matches_serial_and_reports(tmp_path):
    spec = PolicySpec(model='tiny-random', method='none')
    serial = evaluate(spec, ['push'], 1, workers=1, progress=False, max_steps=24)
    parallel = evaluate(spec, ['push', 'pick'], 1, workers=2, progress=False, max_steps=24)
    assert [(r.family, r.seed, r.steps, r.success) for r in serial] == \
        [(r.family, r.seed, r.steps, r.success) for r in parallel if r.family == 'push']
    assert all(r.steps == 24 and len(r.latencies_s) == 3 for r in parallel)
    assert all(r.outcome in OUTCOMES and r.outcome != 'success' for r in parallel)
    won = EpisodeResult('pick', 7, True, 20, [0.01], [288.0], [1.0], [0.0], outcome='success')
    summary = summarize(parallel + [won], 'none')
    assert summary['families']['pick']['successes'] == 1 and summary['overall']['episodes'] == 3
    assert summary['families']['pick']['outcomes']['success'] == 1
    assert sum(summary['overall']['outcomes'].values()) == 3
    json_path, md_path = write_report([summary], tmp_path)
    assert json.loads(json_path.read_text())['results'][0]['label'] == 'none'
    assert '| none | pick | 50.0% (1/2)' in md_path.read_text()
    assert markdown_table([summary]).count('\n') == 4
    assert 'How the episodes ended' in md_path.read_text() and '| none | all |' in outcome_table([summary])


@pytest.mark.parametrize('workers', [1, 2])
def test_a_policy_that_cannot_load_shows_its_own_error_with_workers_too(tmp_path, workers):
    spec = PolicySpec(model=str(tmp_path / 'no_checkpoint'), method='none')
    with pytest.raises(CheckpointError, match='no_checkpoint'):
        evaluate(spec, ['pick'], 2, workers=workers, progress=False, max_steps=4)


@pytest.mark.parametrize('options, message', [
    ({'episodes_per_family': 0}, 'episodes_per_family must be a positive integer'),
    ({'episodes_per_family': -3}, 'episodes_per_family must be a positive integer'),
    ({'execute_steps': 0}, 'execute_steps must be a positive integer'),     # ran the whole chunk
    ({'execute_steps': -1}, 'execute_steps must be a positive integer'),    # ran 7 of 8 by slicing
])
def test_counts_below_one_are_refused(options, message):
    arguments = {'episodes_per_family': 1, **options}
    with pytest.raises(ValueError, match=message):
        evaluate(PolicySpec(model='tiny-random', method='none'), ['pick'], workers=1, progress=False, **arguments)


def test_execute_steps_beyond_the_chunk_is_refused_not_cut():
    with pytest.raises(ValueError, match="execute_steps 9 exceeds the policy's chunk of 8 actions"):
        run_episode(TabletopEnv(image_size=96), load_policy('tiny-random'), 'pick', 1, execute_steps=9)


def test_the_cli_records_the_scored_rollout_and_names_its_run(tmp_path, capsys):
    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / 'scripts' / 'run_closed_loop.py'))
    argv = ['--model', 'tiny-random', '--families', 'push', '--episodes-per-family', '1', '--workers', '1',
            '--execute-steps', '1', '--seed-start', '1000001', '--out', str(tmp_path / 'eval'),
            '--record', str(tmp_path / 'episode.png')]
    assert script['main'](argv) == 0
    output = capsys.readouterr().out
    report = json.loads((tmp_path / 'eval' / 'closed_loop_none.json').read_text())
    scored = report['results'][0]['overall']
    assert report['run'] == {'model': 'tiny-random', 'method': 'none', 'method_config': None, 'families': ['push'],
                             'episodes_per_family': 1, 'seed_start': 1000001, 'execute_steps': 1}
    assert f"({'success' if scored['successes'] else 'failure'})" in output.split('recorded push seed 1000001')[1]
    assert 'execute_steps: 1' in (tmp_path / 'eval' / 'closed_loop_none.md').read_text()


def test_an_unwritable_report_directory_fails_before_the_episodes(tmp_path, capsys):
    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / 'scripts' / 'run_closed_loop.py'))
    (tmp_path / 'a_file').write_text('')
    assert script['main'](['--model', 'tiny-random', '--episodes-per-family', '1', '--workers', '1',
                           '--out', str(tmp_path / 'a_file')]) == 2
    assert '--out' in capsys.readouterr().err


@pytest.mark.parametrize('text, expected', [('{keep_ratio: 0.25}', {'keep_ratio': 0.25}),
                                            ('{"keep_ratio": 0.25}', {'keep_ratio': 0.25}), ('', {})])
def test_the_cli_takes_method_settings_as_yaml_like_the_other_commands(text, expected):
    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / 'scripts' / 'run_closed_loop.py'))
    assert script['build_parser']().parse_args(['--method-config', text]).method_config == expected


def test_the_cli_refuses_method_settings_that_are_no_mapping(capsys):
    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / 'scripts' / 'run_closed_loop.py'))
    with pytest.raises(SystemExit):
        script['build_parser']().parse_args(['--method-config', '[0.25]'])
    assert 'expected a mapping' in capsys.readouterr().err
