"""Demonstration dataset: write/read round trip, a tiny real collection, and episode pictures."""
import json
import numpy as np
import pytest

from specprune_ros.sim import PROPRIO_DIM
from specprune_ros.training.demonstrations import (FORMAT_NAME, Episode, check_sim_fingerprint, collect_demonstrations,
                                                   iter_episodes, read_episode, read_manifest, sim_fingerprint,
                                                   write_episode)
from specprune_ros.sim.tasks import EVAL_SEED_START, TRAIN_SEED_START
from specprune_ros.sim.visualize import save_gif, save_strip


def _fake_episode(t=5, size=16):
    rng = np.random.default_rng(0)
    return Episode(images={'agentview': rng.integers(0, 255, (t, size, size, 3), dtype=np.uint8),
                           'wrist': rng.integers(0, 255, (t, size, size, 3), dtype=np.uint8)},
                   proprio=rng.normal(size=(t, PROPRIO_DIM)).astype(np.float32),
                   actions=rng.uniform(-1, 1, (t, 7)).astype(np.float32),
                   instruction='pick up the red cube', family='pick', seed=12, success=True,
                   meta={'noise': 0.1, 'target': 'red_cube'})


def test_write_read_round_trip(tmp_path):
    ep = _fake_episode()
    path = write_episode(tmp_path / 'episodes' / 'pick_0000012.npz', ep)
    back = read_episode(path)
    assert back.instruction == ep.instruction and back.family == 'pick' and back.seed == 12 and back.success
    assert back.meta == ep.meta and len(back) == 5
    for cam in ep.images:
        np.testing.assert_array_equal(back.images[cam], ep.images[cam])
        assert back.images[cam].dtype == np.uint8
    np.testing.assert_array_equal(back.proprio, ep.proprio)
    np.testing.assert_array_equal(back.actions, ep.actions)
    only = read_episode(path, cameras=['wrist'])
    assert list(only.images) == ['wrist']
    assert read_episode(path, load_images=False).images == {}
    with np.load(path, allow_pickle=False) as z:                # plain npz, no pickle needed
        assert z['image_agentview'].shape == (5, 16, 16, 3)
    # no manifest: iter_episodes falls back to the files
    assert [e.seed for e in iter_episodes(tmp_path)] == [12]


def test_write_rejects_bad_shapes(tmp_path):
    ep = _fake_episode()
    ep.images['wrist'] = ep.images['wrist'][:3]
    with pytest.raises(ValueError):
        write_episode(tmp_path / 'x.npz', ep)


def test_collect_small_dataset_and_pictures(tmp_path):
    out = tmp_path / 'demos'
    manifest = collect_demonstrations(out, families=('pick', 'push'), episodes_per_family=1,
                                      seed_start=TRAIN_SEED_START, noise=0.1, workers=1, image_size=48,
                                      progress=False)
    on_disk = read_manifest(out)
    assert on_disk == json.loads(json.dumps(manifest)) and on_disk['format'] == FORMAT_NAME
    assert [e['family'] for e in on_disk['episodes']] == ['pick', 'push']
    episodes = list(iter_episodes(out))
    assert len(episodes) == 2
    for ep, entry in zip(episodes, on_disk['episodes']):
        assert ep.success and len(ep) == entry['length'] > 5
        assert ep.images['agentview'].shape == (len(ep), 48, 48, 3)
        assert ep.proprio.shape == (len(ep), PROPRIO_DIM) and ep.actions.shape == (len(ep), 7)
        assert ep.instruction == entry['instruction']
        assert ep.seed < EVAL_SEED_START
    assert [e.family for e in iter_episodes(out, families=['push'], load_images=False)] == ['push']
    strip = save_strip(episodes[0], tmp_path / 'strip.png', num_frames=4, title=episodes[0].instruction)
    gif = save_gif(episodes[1], tmp_path / 'ep.gif')
    assert strip.stat().st_size > 1000 and gif.stat().st_size > 1000
    # re-running keeps what is there and runs nothing new
    again = collect_demonstrations(out, families=('pick',), episodes_per_family=1, workers=1, image_size=48,
                                   progress=False)
    assert again['attempts']['pick']['run'] == 1
    # data from another version of the simulator is refused, not merged
    assert on_disk['sim_fingerprint'] == sim_fingerprint(48)
    check_sim_fingerprint(on_disk, out)
    stale = {**on_disk, 'sim_fingerprint': '0123456789abcdef'}
    (out / 'manifest.json').write_text(json.dumps(stale))
    with pytest.raises(ValueError, match='another version of the simulator'):
        collect_demonstrations(out, families=('pick',), episodes_per_family=1, workers=1, image_size=48,
                               progress=False)


def test_sim_fingerprint_follows_the_scene(monkeypatch):
    from specprune_ros.sim import scene
    before = sim_fingerprint(48)
    assert sim_fingerprint(48) == before                         # deterministic
    original = scene.build_mjcf
    moved = lambda size=640: original(size).replace('fovy="40"', 'fovy="45"')   # noqa: E731
    monkeypatch.setattr(scene, 'build_mjcf', moved)
    assert sim_fingerprint(48) != before                         # another camera: another simulator


@pytest.mark.parametrize('seed_start', [EVAL_SEED_START - 5, EVAL_SEED_START, EVAL_SEED_START + 1000])
def test_train_seeds_cannot_reach_eval_range(tmp_path, seed_start):
    with pytest.raises(ValueError, match='held-out evaluation seeds'):
        collect_demonstrations(tmp_path, episodes_per_family=10, seed_start=seed_start, workers=1, progress=False)


def test_recovery_demonstrations_start_where_the_policy_left_off(tmp_path):
    """Take-over collection.

    The committed policy drives first, the expert's part is recorded and labelled with where the target really is at the
    hand-over.
    """
    import torch
    from specprune_ros.models.loading import load_policy
    threads = torch.get_num_threads()
    torch.set_num_threads(1)         # as in a collector worker: float sums, and so the policy's path, follow it
    try:
        _check_recovery_demonstrations(tmp_path, load_policy('reference'))
    finally:
        torch.set_num_threads(threads)


def _check_recovery_demonstrations(tmp_path, policy):
    from specprune_ros.training.trainer import LOCALISATION_SCALE, localisation_targets
    from specprune_ros.training.demonstrations import record_takeover_episode
    from specprune_ros.sim.env import TabletopEnv
    env = TabletopEnv(image_size=96)
    episode = None
    for seed in range(TRAIN_SEED_START + 300, TRAIN_SEED_START + 306):   # a seed the policy does not solve alone
        episode = record_takeover_episode(env, policy, 'push', seed, noise=0.1)
        if episode is not None and episode.success:
            break
    assert episode is not None and episode.success
    steps = episode.meta['policy_steps']
    assert steps > 0 and steps % 8 == 0
    start = env.reset(seed=episode.seed, family='push', render=False)
    assert np.abs(episode.proprio[0] - start.proprio).max() > 1e-3      # not the reset state
    assert len(episode) + steps <= env.max_steps
    targets, mask = localisation_targets(episode)
    np.testing.assert_allclose(targets[0, :2], np.asarray(episode.meta['start_target_xy']) * LOCALISATION_SCALE,
                               rtol=1e-6)
    again = record_takeover_episode(env, policy, 'push', episode.seed, noise=0.1)
    np.testing.assert_array_equal(again.actions, episode.actions)       # deterministic under the seed
    env.close()
    # through the collector (one worker): the manifest says which policy drove
    out = tmp_path / 'recovery'
    manifest = collect_demonstrations(out, families=('push',), episodes_per_family=1, workers=1,
                                      seed_start=episode.seed, image_size=96, progress=False,
                                      takeover_model='reference')
    assert manifest['takeover_model'] == 'reference' and manifest['episodes'][0]['seed'] == episode.seed
    (stored,) = list(iter_episodes(out))
    np.testing.assert_array_equal(stored.actions, episode.actions)
