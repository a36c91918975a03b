"""Collecting demonstrations: extending a dataset, settings checked up front, interrupted collections continued."""
import json

import pytest

from specprune_ros.training import demonstrations
from specprune_ros.training.demonstrations import collect_demonstrations, read_episode, read_manifest

SMALL = dict(workers=1, image_size=48, progress=False)


@pytest.fixture
def seeds_run(monkeypatch) -> list:
    """The (family, seed) of every episode the collector runs, in order."""
    run, job = [], demonstrations._collect_job

    def recording(*args):
        run.append((args[1], args[2]))
        return job(*args)

    monkeypatch.setattr(demonstrations, '_collect_job', recording)
    return run


def test_extending_a_dataset_runs_only_the_missing_episodes_and_counts_each_once(tmp_path, seeds_run):
    out = tmp_path / 'demos'
    collect_demonstrations(out, families=('pick',), episodes_per_family=2, noise=0.0, **SMALL)
    assert seeds_run == [('pick', 0), ('pick', 1)]
    seeds_run.clear()
    manifest = collect_demonstrations(out, families=('pick',), episodes_per_family=3, noise=0.0, **SMALL)
    assert seeds_run == [('pick', 2)]
    assert [e['seed'] for e in manifest['episodes']] == [0, 1, 2]
    assert manifest['attempts'] == {'pick': {'run': 3, 'succeeded': 3}}
    assert sorted(p.name for p in (out / 'episodes').glob('*.npz')) == [f'pick_000000{i}.npz' for i in range(3)]


def test_a_family_named_twice_is_collected_once(tmp_path, seeds_run):
    manifest = collect_demonstrations(tmp_path / 'demos', families=('pick', 'pick'), episodes_per_family=1,
                                      noise=0.0, **SMALL)
    assert seeds_run == [('pick', 0)]
    assert manifest['attempts'] == {'pick': {'run': 1, 'succeeded': 1}} and len(manifest['episodes']) == 1


def test_a_directory_of_episodes_with_other_settings_is_not_extended(tmp_path, seeds_run):
    out = tmp_path / 'demos'
    collect_demonstrations(out, families=('pick',), episodes_per_family=1, noise=0.3, **SMALL)
    seeds_run.clear()
    with pytest.raises(ValueError, match='noise'):
        collect_demonstrations(out, families=('pick',), episodes_per_family=2, noise=0.0, **SMALL)
    assert not seeds_run
    manifest = read_manifest(out)
    assert manifest['noise'] == 0.3 and len(manifest['episodes']) == 1
    assert all(read_episode(out / e['file'], load_images=False).meta['noise'] == 0.3 for e in manifest['episodes'])


@pytest.mark.parametrize('settings', [dict(episodes_per_family=0), dict(episodes_per_family=-5), dict(noise=-0.5),
                                      dict(image_size=50), dict(image_size=8), dict(families=())])
def test_settings_that_collect_nothing_usable_are_refused_before_any_episode(tmp_path, seeds_run, settings):
    values = dict(families=('pick',), episodes_per_family=1, noise=0.0, **SMALL)
    values.update(settings)
    with pytest.raises(ValueError):
        collect_demonstrations(tmp_path / 'demos', **values)
    assert not seeds_run and not (tmp_path / 'demos' / 'manifest.json').exists()


def test_an_interrupted_collection_lists_what_it_kept_and_a_rerun_continues(tmp_path, monkeypatch):
    out, run, job = tmp_path / 'demos', [], demonstrations._collect_job

    def interrupted(*args):
        run.append(args[2])
        if len(run) == 3:
            raise KeyboardInterrupt('Ctrl-C during the third episode')
        return job(*args)

    monkeypatch.setattr(demonstrations, '_collect_job', interrupted)
    with pytest.raises(KeyboardInterrupt):
        collect_demonstrations(out, families=('pick',), episodes_per_family=3, noise=0.0, **SMALL)
    manifest = read_manifest(out)
    assert [e['seed'] for e in manifest['episodes']] == [0, 1]
    assert manifest['attempts'] == {'pick': {'run': 2, 'succeeded': 2}}
    run.clear()
    manifest = collect_demonstrations(out, families=('pick',), episodes_per_family=3, noise=0.0, **SMALL)
    assert run == [2] and [e['seed'] for e in manifest['episodes']] == [0, 1, 2]


def test_episodes_a_killed_collection_wrote_but_never_listed_are_adopted(tmp_path, seeds_run):
    out = tmp_path / 'demos'
    collect_demonstrations(out, families=('pick',), episodes_per_family=2, noise=0.0, **SMALL)
    (out / 'manifest.json').unlink()              # killed before it could write its manifest
    seeds_run.clear()
    manifest = collect_demonstrations(out, families=('pick',), episodes_per_family=2, noise=0.0, **SMALL)
    assert not seeds_run and [e['seed'] for e in manifest['episodes']] == [0, 1]
    seeds_run.clear()
    with pytest.raises(ValueError, match='pick_0000000.npz'):   # ... but only episodes of the same settings
        (out / 'manifest.json').unlink()
        collect_demonstrations(out, families=('pick',), episodes_per_family=2, noise=0.2, **SMALL)
    assert not seeds_run


def test_collect_demos_refuses_bad_counts_and_sizes_with_a_usage_error(tmp_path, seeds_run, capsys):
    script = __import__('importlib').import_module('test_training_cli').load_script('collect_demos')
    for flags in (['--episodes-per-family', '0'], ['--noise', '-0.5'], ['--image-size', '50'], ['--workers', '0']):
        with pytest.raises(SystemExit) as exit_:
            script.main(['--out', str(tmp_path / 'demos'), '--families', 'pick', '--quiet', *flags])
        assert exit_.value.code == 2, flags
    assert not seeds_run
    assert script.main(['--out', str(tmp_path / 'demos'), '--families', 'pick', 'pick', '--episodes-per-family', '1',
                        '--workers', '1', '--image-size', '48', '--noise', '0', '--quiet']) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary['episodes'] == {'pick': 1} and summary['attempts'] == {'pick': {'run': 1, 'succeeded': 1}}


def test_seeds_the_take_over_policy_finishes_alone_are_no_failed_expert_attempts(tmp_path, monkeypatch):
    """Recovery collection: a seed the policy completes before the hand-over costs a seed, not an expert attempt."""
    def policy_finishes_even_seeds(env, policy, family, seed, noise):
        return None if seed % 2 == 0 else demonstrations.record_episode(env, family, seed, noise)

    monkeypatch.setattr(demonstrations, 'record_takeover_episode', policy_finishes_even_seeds)
    monkeypatch.setattr(demonstrations, '_worker_policy', lambda model: None)
    manifest = collect_demonstrations(tmp_path / 'recovery', families=('pick',), episodes_per_family=2, noise=0.0,
                                      takeover_model='reference', max_attempts_per_family=2, **SMALL)
    assert [e['seed'] for e in manifest['episodes']] == [1, 3]
    assert manifest['attempts'] == {'pick': {'run': 2, 'succeeded': 2, 'policy_finished': 2}}
    monkeypatch.setattr(demonstrations, 'record_takeover_episode', lambda *args: None)
    with pytest.raises(RuntimeError, match=r'take-over policy finished \{.pick.: 4\} episodes alone'):
        collect_demonstrations(tmp_path / 'finished', families=('pick',), episodes_per_family=1, noise=0.0,
                               takeover_model='reference', max_attempts_per_family=2, **SMALL)
