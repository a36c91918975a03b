"""The simulation closed loop over real DDS (ROS_DOMAIN_ID 70).

The policy node, the sim bridge and the bag recorder as processes, started the way ``sim.launch.py`` starts them
(``scripts/run_sim_closed_loop.py``).

Step-synchronous mode executes exactly what the ROS-free harness executes on the same seeds (same actions, to
float rounding), and the recorded bag replays offline to the node's own chunks bit for bit.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip('rclpy', reason='ROS 2 (rclpy) is not installed: scripts/setup_env.sh installs the wheels; '
                    'the closed loop runs without ROS in test_evaluation.py, the sync protocol in test_bridge_core.py')

from specprune_ros.ros.sim_runner import SimRun, run_simulation  # noqa: E402

DOMAIN = 70
STEPS = 24
FAMILIES = ('pick', 'push')
SEED = 1_000_000


@pytest.fixture(scope='module')
def sync_run(tmp_path_factory):
    base = tmp_path_factory.mktemp('sim_sync')
    progress: list[str] = []
    run = SimRun(arguments={'model': 'tiny-random', 'method': 'none', 'mode': 'sync', 'families': ','.join(FAMILIES),
                            'max_steps': str(STEPS), 'label': 'tiny-none',
                            'summary_path': str(base / 'tiny_keep0.25')},     # a dot in the name is no suffix
                 bridge_parameters={'save_actions': True}, domain_id=DOMAIN, log_dir=base / 'logs',
                 record_bag=base / 'run_bag', timeout_s=300, progress=progress.append)
    result = run_simulation(run)
    assert result['returncode'] == 0 and result['summary'] is not None, json.dumps(result['outputs'], indent=1)
    return {'result': result, 'bag': base / 'run_bag', 'progress': progress}


def harness_actions(env, policy, family: str, seed: int, steps: int) -> np.ndarray:
    """The ROS-free harness's loop (a chunk of 8 executed open loop, then re-plan), keeping the actions."""
    from specprune_ros.policy.interface import Observation
    observation = env.reset(seed=seed, family=family)
    policy.reset()
    actions, executed, done = [], None, False
    while len(actions) < steps and not done:
        output = policy.predict(Observation(images=observation.images, instruction=observation.instruction,
                                            proprio=observation.proprio, executed_actions=executed))
        for action in output.actions:
            observation, done, _ = env.step(action)
            actions.append(action)
            if done or len(actions) == steps:
                break
        executed = output.actions
    return np.asarray(actions, dtype=np.float64)


def test_sync_mode_executes_what_the_ros_free_harness_executes(sync_run):
    document = sync_run['result']['summary']
    summary = document['summary']
    assert summary['mode'] == 'sync' and summary['label'] == 'tiny-none'
    assert document['policy']['use_sim_time'] is True and document['policy']['replan_every_steps'] == 8
    counters = summary['sync_counters']
    assert counters['timeouts'] == counters['missing_inferences'] == counters['late_commands'] == 0, counters
    episodes = summary['episodes']
    assert [(e['family'], e['seed']) for e in episodes] == [(f, SEED) for f in FAMILIES]
    from specprune_ros.models.loading import load_policy
    from specprune_ros.sim import TabletopEnv
    env, policy = TabletopEnv(image_size=96), load_policy('tiny-random', 'none')
    for episode in episodes:
        assert episode['steps'] == STEPS and episode['inferences'] == STEPS // 8
        assert episode['hold_fraction'] == 0.0 and episode['resends'] == 0
        ros = np.asarray(episode['actions'])
        expected = harness_actions(env, policy, episode['family'], episode['seed'], STEPS)
        np.testing.assert_allclose(ros, expected, rtol=0, atol=1e-9)
    env.close()


def test_sync_run_reports_each_episode_and_the_model_latency_on_the_wall_clock(sync_run):
    """Sim time stands still while the node infers in step-synchronous mode.

    The latency shown is the model call's wall time, never the 0 ms the sim clock measures.
    """
    from specprune_ros.bridge.episodes import markdown_summary
    assert [line.split(':')[0] for line in sync_run['progress']] == \
        [f'episode {k + 1}/{len(FAMILIES)} {family} seed {SEED}' for k, family in enumerate(FAMILIES)]
    assert all('success' in line or 'failure' in line for line in sync_run['progress'])
    summary = sync_run['result']['summary']['summary']
    assert summary['overall']['model_latency_ms_median'] > 0
    assert sync_run['result']['summary_path'].endswith('tiny_keep0.25.json')
    row = markdown_summary([summary]).splitlines()[-1].split('|')
    header = markdown_summary([summary]).splitlines()[0].split('|')
    assert float(row[header.index(' model ms (median) ')]) > 0
    assert row[header.index(' inference ms (median) ')].strip() == 'n/a (sim clock)'


def test_recorded_run_replays_offline_to_the_nodes_chunks_exactly(sync_run):
    from specprune_ros.bags.io import BagReader
    from specprune_ros.bags.replay_eval import ReplayConfig, evaluate_streams
    from specprune_ros.bags.streams import load_streams
    with BagReader(sync_run['bag']) as bag:
        counts = {topic: info.count for topic, info in bag.topics().items()}
        outcomes = [bag.deserialize(raw, msgtype) for _, msgtype, _, raw in bag.raw_messages(['/sim_bridge/episode'])]
    assert counts['/camera/agentview/image_raw'] == len(FAMILIES) * STEPS // 8   # frames on re-planning ticks
    assert counts['/specprune_node/action_chunk'] == len(FAMILIES) * STEPS // 8
    assert [o.hardware_id for o in outcomes] == [f'{f}:{SEED}' for f in FAMILIES]
    streams = load_streams(sync_run['bag'])
    assert len(streams.observations) == len(FAMILIES) * STEPS // 8 and streams.has_chunks
    report = evaluate_streams(streams, ReplayConfig(model='tiny-random', methods=('none',), progress=False))
    none = report['methods']['none']
    assert report['schedule'] == 'recorded' and len(report['resets']) == len(FAMILIES)
    assert none['vs_recorded_chunks']['max_abs'] == 0.0
    assert none['vs_recorded_chunks']['exact_steps'] == report['inferences'] == len(FAMILIES) * STEPS // 8
    assert report['determinism']['identical']
    # the commands the node sent are the chunk rows (the sim's applied actions)
    assert none['vs_recorded_actions']['max_abs'] < 1e-6


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
    """The committed reference VLA with SpecPrune-VLA inside the node (one family, four chunks).

    From the second chunk on SpecPrune reads the executed actions, so the node must hand it what the simulator
    applied (on this seed a wrong history changes the actions from step 24).
    """
    base = tmp_path_factory.mktemp('sim_reference')
    run = SimRun(arguments={'model': 'reference', 'method': 'specprune', 'mode': 'sync', 'families': 'place',
                            'max_steps': '32', 'label': 'reference-specprune'},
                 bridge_parameters={'save_actions': True}, domain_id=DOMAIN + 1, log_dir=base / 'logs',
                 timeout_s=300)
    result = run_simulation(run)
    assert result['returncode'] == 0 and result['summary'] is not None, json.dumps(result['outputs'], indent=1)
    return result


def test_reference_vla_with_specprune_runs_inside_the_node_as_in_the_harness(reference_run):
    from specprune_ros.models.loading import load_policy
    from specprune_ros.sim import TabletopEnv
    (episode,) = reference_run['summary']['summary']['episodes']
    assert episode['steps'] == 32 and episode['inferences'] == 4
    ros = np.asarray(episode['actions'])
    env = TabletopEnv(image_size=96)
    pruned = harness_actions(env, load_policy('reference', 'specprune'), 'place', SEED, 32)
    unpruned = harness_actions(env, load_policy('reference', 'none'), 'place', SEED, 32)
    env.close()
    np.testing.assert_allclose(ros, pruned, rtol=0, atol=1e-5)
    # the second chunk is statically pruned (the first has no reference frame), so it differs from unpruned
    assert np.abs(ros[8:] - unpruned[8:]).max() > 1e-4


def test_a_recorded_run_waits_for_the_recorder_on_every_topic_it_records():
    """The first episode starts only once the recorder listens to the frames and to every answer it records."""
    from specprune_ros.ros.sim_runner import DEFAULT_RECORD_TOPICS, recording_start_condition
    assert recording_start_condition(DEFAULT_RECORD_TOPICS, {}) == \
        {'min_camera_subscribers': 2, 'min_command_subscribers': 2}
    without_chunks = [t for t in DEFAULT_RECORD_TOPICS if not t.endswith('/action_chunk')]
    assert recording_start_condition(without_chunks, {})['min_command_subscribers'] == 1
    renamed = recording_start_condition([*DEFAULT_RECORD_TOPICS, '/arm/twist'], {'twist_topic': '/arm/twist'})
    assert renamed['min_command_subscribers'] == 2
