"""The temporal token state: bounded memory, resets (explicit, instruction, gap, step index), ordering."""
import numpy as np
import torch

from specprune_ros.pruning.temporal_state import TemporalStateConfig, TemporalTokenState


def frames(value, cameras=2):
    return [np.full((4, 4, 3), value, dtype=np.uint8) for _ in range(cameras)]


def test_memory_bounded_whatever_the_episode_length():
    s = TemporalTokenState(TemporalStateConfig(frame_history=5, attention_window=3, action_history=10))
    for i in range(1000):
        s.push_frames(frames(i % 255))
        s.push_action_attention([torch.full((9,), float(i)), torch.full((9,), float(-i))])
        s.set_task_attention([torch.full((9,), float(i))] * 2)
        s.push_actions(np.full((8, 7), i, dtype=np.float64))
        s.finish_step()
    assert s.num_frames == 5 and len(s.action_attention) == 3 and len(s.actions) == 10
    assert s.steps == 1000
    # oldest first: the window holds steps 997, 998, 999
    assert [float(t[0]) for t in s.action_attention_window(0)] == [997.0, 998.0, 999.0]
    assert [float(t[0]) for t in s.action_attention_window(1)] == [-997.0, -998.0, -999.0]
    assert s.window_full


def test_frame_lookup_back_and_copies():
    s = TemporalTokenState()
    buf = frames(1)
    s.push_frames(buf)
    buf[0][:] = 99                                  # the caller reuses its buffer
    s.push_frames(frames(2))
    s.push_frames(frames(3))
    assert s.frame(0, 0)[0, 0, 0] == 3 and s.frame(1, 2)[0, 0, 0] == 1
    assert s.frame(0, 10)[0, 0, 0] == 1             # older than held -> the oldest
    assert TemporalTokenState().frame(0) is None


def test_explicit_reset_clears_everything():
    s = TemporalTokenState()
    s.push_frames(frames(1))
    s.set_task_attention([torch.ones(3)])
    s.push_action_attention([torch.ones(3)])
    s.push_actions(np.ones((2, 7)))
    s.finish_step()
    s.reset()
    assert s.num_frames == 0 and s.task_attention is None and not s.action_attention and not s.actions
    assert s.steps == 0 and s.resets == 1 and s.last_reset_reason == 'explicit'


def test_reset_on_new_instruction_only():
    s = TemporalTokenState()
    assert not s.observe_instruction('pick up the red block')
    s.push_frames(frames(1))
    assert not s.observe_instruction('pick up the red block')
    assert s.num_frames == 1
    assert s.observe_instruction('open the drawer')
    assert s.num_frames == 0 and s.last_reset_reason == 'instruction'
    assert not s.observe_instruction(None)


def test_reset_after_long_gap():
    s = TemporalTokenState(TemporalStateConfig(max_gap_s=1.5))
    s.push_frames(frames(1))
    assert not s.observe_gap(1.5)
    assert s.observe_gap(1.51) and s.num_frames == 0 and s.last_reset_reason == 'gap'
    s.push_frames(frames(1))
    assert not s.observe_time(10.0)
    assert not s.observe_time(11.0)
    assert s.num_frames == 1
    assert s.observe_time(13.0)
    assert s.num_frames == 0
    s.push_frames(frames(1))
    assert s.observe_time(12.0) and s.last_reset_reason == 'time went back'
    never = TemporalTokenState(TemporalStateConfig(max_gap_s=0))
    assert not never.observe_gap(1e9)


def test_reset_when_step_index_restarts():
    s = TemporalTokenState()
    for i in range(3):
        assert not s.observe_step_index(i)
        s.push_frames(frames(i))
        s.finish_step()
    assert s.observe_step_index(0)
    assert s.num_frames == 0 and s.steps == 0
    assert not s.observe_step_index(1)
    assert s.observe_step_index(1)                  # repeated index: a new episode too


def test_camera_count_change_drops_old_frames():
    s = TemporalTokenState()
    s.push_frames(frames(1, cameras=2))
    s.push_frames(frames(2, cameras=1))
    assert s.num_frames == 1


def test_recent_actions():
    s = TemporalTokenState(TemporalStateConfig(action_history=4))
    assert s.recent_actions().shape == (0, 7)
    s.push_actions(np.arange(14, dtype=float).reshape(2, 7))
    s.push_actions(np.arange(7, dtype=float))
    assert s.recent_actions().shape == (3, 7)
    assert s.recent_actions(1)[0, 0] == 0.0 and s.recent_actions(2)[0, 0] == 7.0
