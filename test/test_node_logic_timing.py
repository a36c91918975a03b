"""Pure-function tests of the input synchroniser and the chunk scheduler."""
import numpy as np
import pytest

from specprune_ros.control.chunk_scheduler import ChunkScheduler, ChunkSettings, control_rate_warning
from specprune_ros.control.input_sync import InputSynchronizer, StaleInput, SyncLimits

FRAME = np.zeros((4, 4, 3), np.uint8)


def synchronizer(needs_proprio=False, **limits):
    return InputSynchronizer(('front', 'wrist'), SyncLimits(**limits), needs_proprio)


def fill(sync, stamp, cameras=('front', 'wrist')):
    for camera in cameras:
        sync.put_frame(camera, FRAME, stamp, stamp + 0.01)


def test_reasons_in_order():
    sync = synchronizer(needs_proprio=True, max_image_age_s=0.5, max_camera_skew_s=0.1, max_state_age_s=0.5)
    assert "no frame yet from camera 'front'" in sync.staleness(10.0)
    fill(sync, 10.0, ('front',))
    assert "'wrist'" in sync.staleness(10.0)
    fill(sync, 10.0)
    assert sync.staleness(10.1) == 'no instruction yet'
    sync.put_instruction('pick')
    assert 'no robot state' in sync.staleness(10.1)
    sync.put_proprio(np.zeros(6), 10.0)
    assert sync.staleness(10.1) == ''
    fill(sync, 10.6)
    assert 'robot state stale' in sync.staleness(10.6)


def test_age_skew_and_future_are_judged_by_stamp():
    sync = synchronizer(max_image_age_s=0.5, max_camera_skew_s=0.1, max_future_stamp_s=0.05)
    sync.put_instruction('pick')
    fill(sync, 10.0)
    assert sync.staleness(10.4) == ''
    assert 'stale' in sync.staleness(10.6) and 'max_image_age_s' in sync.staleness(10.6)
    sync.put_frame('wrist', FRAME, 10.3, 10.3)
    assert 'out of sync' in sync.staleness(10.35)
    sync.put_frame('front', FRAME, 10.3, 10.3)
    assert 'in the future' in sync.staleness(10.2)


def test_older_frames_never_replace_newer_ones_and_drops_are_counted():
    sync = synchronizer()
    sync.put_instruction('pick')
    fill(sync, 10.0)
    fill(sync, 9.0)                      # out of order: ignored
    assert sync.frames['front'].stamp == 10.0
    fill(sync, 10.1)                     # supersedes an unused frame
    assert sync.frames_dropped == 4 and sync.frames_received == 4
    assert sync.has_new_frames()
    snapshot = sync.snapshot(10.2)
    assert snapshot.newest_stamp == 10.1 and set(snapshot.images) == {'front', 'wrist'}
    assert not sync.has_new_frames()
    sync.put_frame('wrist', FRAME, 10.2, 10.2)
    assert not sync.has_new_frames()     # a new set needs every camera
    sync.put_frame('front', FRAME, 10.2, 10.2)
    assert sync.has_new_frames()
    assert sync.frames_dropped == 4      # the used frame was not dropped


def test_snapshot_raises_with_the_reason():
    sync = synchronizer()
    with pytest.raises(StaleInput, match='no frame yet'):
        sync.snapshot(0.0)


def test_instruction_change_detection():
    sync = synchronizer()
    assert not sync.put_instruction('a')      # first instruction is not a change
    assert not sync.put_instruction('a')
    assert sync.put_instruction('b')


def chunk(n=8, value=0.0):
    return np.tile(np.arange(n, dtype=float)[:, None] + value, (1, 7))


def test_time_indexing_skips_elapsed_steps():
    scheduler = ChunkScheduler(ChunkSettings(period_s=0.1, max_chunk_age_s=10.0))
    assert scheduler.action_at(0.0).action is None
    assert 'waiting' in scheduler.action_at(0.0).reason
    skipped = scheduler.accept(chunk(), start=1.0, now=1.25)   # inference took 0.25 s
    assert skipped == 2
    assert scheduler.action_at(1.25).step == 2
    assert scheduler.action_at(1.25).action[0] == 2.0
    assert scheduler.action_at(1.30).step == 3
    assert scheduler.action_at(1.7999).step == 7
    held = scheduler.action_at(1.80)
    assert held.action is None and 'exhausted' in held.reason


def test_boundaries_are_robust_to_float_error():
    scheduler = ChunkScheduler(ChunkSettings(period_s=0.1, max_chunk_age_s=10.0))
    scheduler.accept(chunk(), start=0.0, now=0.0)
    assert [scheduler.action_at(0.1 * k).step for k in range(8)] == list(range(8))


def test_chunk_age_deadline():
    scheduler = ChunkScheduler(ChunkSettings(period_s=0.1, max_chunk_age_s=0.3))
    scheduler.accept(chunk(), start=0.0, now=0.05)
    assert scheduler.action_at(0.29).action is not None
    late = scheduler.action_at(0.31)
    assert late.action is None and 'max_chunk_age_s' in late.reason


@pytest.mark.parametrize('start', [0.0, 12.3, 1.7e9 + 0.3])
def test_a_chunk_runs_out_at_max_chunk_age_whatever_its_start(start):
    """Ticks on the step grid (sim time): the step at exactly max_chunk_age_s is not published, as time_left says."""
    scheduler = ChunkScheduler(ChunkSettings(period_s=0.1, max_chunk_age_s=0.6))
    scheduler.accept(chunk(), start=start, now=start)
    steps = [scheduler.action_at(start + 0.1 * k).step for k in range(8)]
    assert steps[:6] == list(range(6)) and steps[6:] == [-1, -1], steps
    assert scheduler.time_left(start + 0.6) <= 1e-9


def test_a_blend_keeps_one_weight_per_step_when_the_node_ticks_faster_than_the_policy():
    settings = ChunkSettings(period_s=0.1, mode='blend', blend_old_weight=0.5, blend_decay=0.5, max_chunk_age_s=10.0)
    scheduler = ChunkScheduler(settings)
    scheduler.accept(np.full((8, 7), 0.0), start=0.0, now=0.0)
    scheduler.accept(np.full((8, 7), 0.8), start=0.2, now=0.27)          # arrives 70 ms into the new chunk's step 0
    values = {now: scheduler.action_at(now).action[0] for now in (0.27, 0.32, 0.37, 0.42, 0.47)}   # 20 Hz ticks
    assert values[0.27] == pytest.approx(0.4)                            # step 0: old weight 0.5
    assert values[0.32] == pytest.approx(values[0.37]) == pytest.approx(0.6)    # step 1: 0.25 at both ticks
    assert values[0.42] == pytest.approx(values[0.47]) == pytest.approx(0.7)    # step 2: 0.125


def test_a_control_rate_below_the_policy_rate_is_warned_about():
    assert control_rate_warning(10.0, 0.1) == '' and control_rate_warning(20.0, 0.1) == ''
    message = control_rate_warning(5.0, 0.1)
    assert 'about 50% of its actions are never commanded' in message and 'at least 10' in message
    assert control_rate_warning(20.0, 0.05) == '' and '(0.05 s per action)' in control_rate_warning(15.0, 0.05)


def test_replace_drops_the_old_chunk():
    scheduler = ChunkScheduler(ChunkSettings(period_s=0.1, mode='replace', max_chunk_age_s=10.0))
    scheduler.accept(chunk(value=100.0), start=0.0, now=0.0)
    scheduler.accept(chunk(value=0.0), start=0.2, now=0.25)
    assert scheduler.action_at(0.25).action[0] == 0.0 and scheduler.previous is None


def test_blend_fades_the_old_chunk_out():
    settings = ChunkSettings(period_s=0.1, mode='blend', blend_old_weight=0.5, blend_decay=0.5, max_chunk_age_s=10.0)
    scheduler = ChunkScheduler(settings)
    scheduler.accept(np.full((8, 7), 1.0), start=0.0, now=0.0)
    scheduler.accept(np.full((8, 7), -1.0), start=0.2, now=0.2)
    # k-th step after the new chunk: old weight 0.5 * 0.5**k
    expected = [0.5 * 1 + 0.5 * -1, 0.25 - 0.75, 0.125 - 0.875]
    for k, value in enumerate(expected):
        assert scheduler.action_at(0.2 + 0.1 * k + 1e-4).action[0] == pytest.approx(value)
    # the old chunk ends at t = 0.8: only the new one afterwards
    assert scheduler.action_at(0.85).action[0] == pytest.approx(-1.0)
    assert scheduler.previous is None


def test_blend_drops_an_old_chunk_past_max_chunk_age():
    """Even at the heaviest old weight allowed, a plan older than max_chunk_age_s never reaches the robot."""
    settings = ChunkSettings(period_s=0.1, mode='blend', blend_old_weight=0.9, blend_decay=1.0, max_chunk_age_s=0.6)
    scheduler = ChunkScheduler(settings)
    scheduler.accept(np.full((10, 7), 1.0), start=0.0, now=0.0)
    scheduler.accept(np.full((10, 7), -1.0), start=0.4, now=0.4)
    assert scheduler.action_at(0.55).action[0] == pytest.approx(0.9 - 0.1)
    assert scheduler.action_at(0.65).action[0] == pytest.approx(-1.0) and scheduler.previous is None


def test_blend_without_overlap_is_a_replace():
    scheduler = ChunkScheduler(ChunkSettings(period_s=0.1, mode='blend', max_chunk_age_s=10.0))
    scheduler.accept(np.full((2, 7), 1.0), start=0.0, now=0.0)
    scheduler.accept(np.full((8, 7), -1.0), start=0.5, now=0.5)   # the old chunk already ended
    assert scheduler.previous is None and scheduler.action_at(0.5).action[0] == -1.0


def test_clear_and_bad_chunks():
    scheduler = ChunkScheduler(ChunkSettings())
    with pytest.raises(ValueError):
        scheduler.accept(np.zeros(7), 0.0, 0.0)
    scheduler.accept(chunk(), 0.0, 0.0)
    scheduler.clear()
    assert scheduler.action_at(0.0).action is None
