"""The controller under bad input and skewed clocks.

Rejected messages hold the robot from the next tick, future stamps are refused and counted, arrival time bounds
freshness, and reset / re-activation forget everything stored (DDS-free; the node wiring is covered by
test_ros_bad_input.py).
"""
import numpy as np
import pytest

from specprune_ros.control.controller import PolicyController
from specprune_ros.codecs.image_decoding import ImageError, aspect_distortion, check_image_size
from specprune_ros.codecs.instruction import DuplicateFilter
from specprune_ros.control.parameters import NodeParameters
from specprune_ros.policy.interface import ActionSpec, PolicyOutput

CAMERAS = ('agentview', 'wrist')
FRAME = np.zeros((8, 8, 3), np.uint8)
UPRIGHT = (0.0, 0.0, 0.0, 1.0)


class SteadyClock:
    """The controller's arrival clock, moved by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.value = start

    def __call__(self) -> float:
        return self.value


def make(clock=None, **overrides):
    params = NodeParameters(**{'max_image_age_s': 0.5, 'max_state_age_s': 0.5, 'max_future_stamp_s': 0.1,
                               **overrides})
    controller = PolicyController(params, CAMERAS, ActionSpec(), needs_proprio=True, clock=clock or SteadyClock())
    controller.set_active(True)
    controller.put_instruction('pick up the red cube')
    return controller


def feed(controller, stamp, now=None, cameras=CAMERAS):
    now = stamp if now is None else now
    for camera in cameras:
        assert controller.put_frame(camera, FRAME, stamp, now, 'cam') == ''
    assert controller.put_pose((0.1, 0.0, 0.2), UPRIGHT, stamp, now, 'base_link') == ''
    assert controller.put_gripper(0.04, stamp, now) == ''


def moving(controller, now):
    """Run one inference with a constant 0.5 action and return the next tick's command."""
    request = controller.next_request(now)
    assert request is not None
    actions = np.full((8, 7), 0.5, dtype=np.float32)
    assert controller.accept(request, PolicyOutput(actions=actions, latency_s=0.01), now + 0.01) is not None
    command = controller.tick(now + 0.02)
    assert not command.holding and command.twist.any()
    return command


def errors(controller):
    return dict(controller.stats.input_errors)


def test_a_future_state_stamp_is_rejected_counted_and_cannot_keep_the_state_fresh():
    clock = SteadyClock()
    controller = make(clock)
    feed(controller, 10.0)
    moving(controller, 10.0)
    # ee_pose stamped 20 s ahead: refused, counted, and the robot holds from the next tick
    error = controller.put_pose((0.1, 0.0, 0.2), UPRIGHT, 30.0, 10.05, 'base_link')
    assert 'ahead of the node clock' in error and 'max_future_stamp_s' in error
    assert errors(controller) == {'state_future_stamp': 1}
    command = controller.tick(10.06)
    assert command.holding and 'ee_pose stamp is 19.950 s ahead' in command.hold_reason
    assert not command.twist.any()
    # the same for the gripper state
    assert 'ahead' in controller.put_gripper(0.04, 30.0, 10.07)
    assert errors(controller) == {'state_future_stamp': 2}


def test_arrival_time_bounds_freshness_whatever_the_stamps_say():
    clock = SteadyClock()
    controller = make(clock, max_future_stamp_s=60.0)          # a lax limit lets far-ahead stamps in
    feed(controller, 40.0, now=10.0)                            # every stamp 30 s ahead, within the limit
    moving(controller, 10.0)
    clock.value += 0.3
    assert not controller.tick(10.3).holding                    # 0.3 s without news: still fresh
    clock.value += 0.3                                          # then the publishers die
    command = controller.tick(10.6)
    assert command.holding and 'stale: no new frame for 0.600 s' in command.hold_reason
    # only the state stops coming: its arrival time ages it although every stamp is "young"
    for camera in CAMERAS:
        controller.put_frame(camera, FRAME, 40.6, 10.6, 'cam')
    assert 'robot state stale: 0.600 s old' in controller.tick(10.61).hold_reason


def test_one_dead_state_part_ages_the_state():
    clock = SteadyClock()
    controller = make(clock)
    feed(controller, 10.0)
    for step in range(1, 7):                                    # the gripper keeps coming, the pose does not
        clock.value += 0.1
        controller.put_gripper(0.04, 10.0 + 0.1 * step, 10.0 + 0.1 * step)
        for camera in CAMERAS:
            controller.put_frame(camera, FRAME, 10.0 + 0.1 * step, 10.0 + 0.1 * step, 'cam')
    assert 'robot state stale' in controller.tick(10.6).hold_reason


def test_a_future_camera_frame_is_never_stored_and_does_not_lock_the_camera_out():
    controller = make()
    feed(controller, 10.0)
    error = controller.put_frame('wrist', FRAME, 3610.0, 10.05, 'cam')      # one hour ahead
    assert "camera 'wrist' frame stamp is 3599.950 s ahead" in error
    assert errors(controller) == {'image_future_stamp': 1}
    assert controller.sync.frames['wrist'].stamp == 10.0                    # not stored
    assert 'invalid input' in controller.tick(10.06).hold_reason
    assert controller.put_frame('wrist', FRAME, 10.1, 10.1, 'cam') == ''    # the next valid frame is taken
    assert controller.sync.frames['wrist'].stamp == 10.1 and not controller.faults


@pytest.mark.parametrize('stamp, kind, message', [
    (5.0, 'image_stale_stamp', "camera 'wrist' frame stamp is 5.050 s old on arrival"),
    (9.85, 'image_stamp_backwards', "camera 'wrist' frame stamp went back by 0.150 s (from 10.000 to 9.850"),
], ids=['stale_on_arrival', 'backwards'])
def test_a_stale_or_backwards_camera_frame_is_rejected_and_holds_until_a_valid_frame(stamp, kind, message):
    controller = make()
    feed(controller, 10.0)
    moving(controller, 10.0)
    error = controller.put_frame('wrist', FRAME, stamp, 10.05, 'cam')
    assert message in error and error.kind == kind and errors(controller) == {kind: 1}
    assert controller.sync.frames['wrist'].stamp == 10.0                    # not stored
    command = controller.tick(10.06)                                        # the very next tick
    assert command.holding and not command.twist.any()
    assert command.hold_reason.startswith('invalid input') and message in command.hold_reason
    feed(controller, 10.1)                                                  # valid frames again
    assert not controller.faults
    moving(controller, 10.1)                                                # the robot resumes


def test_a_slightly_out_of_order_camera_frame_is_dropped_quietly():
    controller = make()
    feed(controller, 10.0)
    moving(controller, 10.0)
    assert controller.put_frame('wrist', FRAME, 9.95, 10.05, 'cam') == ''   # within max_camera_skew_s
    assert controller.sync.frames['wrist'].stamp == 10.0 and not errors(controller)
    assert not controller.tick(10.06).holding


@pytest.mark.parametrize('unstamped, source', [
    (lambda c, t: c.put_pose((0.1, 0.0, 0.2), UPRIGHT, 0.0, t, 'base_link'), 'ee_pose'),
    (lambda c, t: c.put_gripper(0.04, 0.0, t), 'gripper_state'),
], ids=['pose', 'gripper_joint_state'])
def test_an_unstamped_robot_state_is_rejected_like_an_unstamped_joint_state(unstamped, source):
    controller = make()
    feed(controller, 10.0)
    moving(controller, 10.0)
    error = unstamped(controller, 10.03)
    assert error.startswith(f'{source}: header.stamp is zero') and error.kind == 'state_invalid'
    assert errors(controller) == {'state_invalid': 1}
    command = controller.tick(10.04)
    assert command.holding and command.hold_reason == f'invalid input: {error}' and not command.twist.any()
    feed(controller, 10.05)
    assert not controller.faults and controller.next_request(10.05) is not None
    # a gap stamped with a node clock that still reads zero (use_sim_time before /clock) is not "unstamped"
    assert make().put_gripper(0.04, 0.0, 0.0) == ''


def test_a_rejected_instruction_holds_until_a_valid_instruction_arrives():
    controller = make()
    feed(controller, 10.0)
    moving(controller, 10.0)
    rejection = controller.reject('instruction', 'instruction_empty', 'instruction is empty or whitespace only')
    assert rejection.kind == 'instruction_empty' and errors(controller) == {'instruction_empty': 1}
    command = controller.tick(10.04)
    assert command.holding and not command.twist.any()
    assert command.hold_reason == 'invalid input: instruction is empty or whitespace only'
    feed(controller, 10.05)                                      # fresh frames and state do not lift it
    assert controller.next_request(10.05) is None and controller.tick(10.06).holding
    assert not controller.put_instruction('pick up the red cube')     # the same task again: no reset, no hold
    assert not controller.faults and controller.next_request(10.07) is not None


def test_rejections_carry_their_counter():
    controller = make(camera_frames=['cam', 'cam'])
    assert controller.put_frame('wrist', FRAME, 10.0, 10.0, 'other').kind == 'frame_id_mismatch'
    assert controller.put_pose((np.nan, 0, 0.2), UPRIGHT, 10.0, 10.0, 'base_link').kind == 'state_invalid'
    assert controller.put_gripper(0.04, 30.0, 10.0).kind == 'state_future_stamp'


@pytest.mark.parametrize('poison', [
    lambda c, t: c.put_pose((np.nan, 0.0, 0.2), UPRIGHT, t, t, 'base_link'),
    lambda c, t: c.put_pose((0.1, np.inf, 0.2), UPRIGHT, t, t, 'base_link'),
    lambda c, t: c.put_pose((0.1, 0.0, 0.2), (0.0, 0.0, 0.0, 0.0), t, t, 'base_link'),
    lambda c, t: c.put_gripper(float('nan'), t, t),
    lambda c, t: c.reject('gripper_state', 'state_invalid', "JointState lacks finger joints ['finger_joint1']"),
    lambda c, t: c.reject('wrist', 'image_decode', "camera 'wrist': undecodable compressed image"),
    lambda c, t: c.put_pose((0.1, 0.0, 0.2), UPRIGHT, t, t, 'camera_link'),
    lambda c, t: c.put_frame('wrist', FRAME, t, t, 'agentview_optical'),
], ids=['nan_pose', 'inf_pose', 'zero_quaternion', 'nan_gap', 'missing_fingers', 'garbage_frame',
        'pose_frame', 'camera_frame'])
def test_invalid_input_holds_from_the_next_tick_until_that_source_is_valid_again(poison):
    controller = make(camera_frames=['cam', 'cam'])
    feed(controller, 10.0)
    moving(controller, 10.0)
    poison(controller, 10.03)
    assert sum(errors(controller).values()) == 1
    command = controller.tick(10.04)                             # the very next tick
    assert command.holding and command.hold_reason.startswith('invalid input') and not command.twist.any()
    assert 'stale' not in command.hold_reason                    # the reason names the cause
    feed(controller, 10.05, cameras=())                          # valid state only
    feed(controller, 10.05)
    assert not controller.faults
    assert controller.next_request(10.05) is not None            # inference resumes on valid input


def test_frame_id_mismatches_are_counted_with_the_expected_frame():
    controller = make(camera_frames=['front_optical', 'wrist_optical'], ee_pose_frame='base_link')
    error = controller.put_frame('agentview', FRAME, 10.0, 10.0, 'wrist_optical')    # swapped remaps
    assert "header.frame_id is 'wrist_optical', expected 'front_optical'" in error
    assert 'expected' in controller.put_pose((0, 0, 0.2), UPRIGHT, 10.0, 10.0, 'camera_link')
    assert errors(controller) == {'frame_id_mismatch': 2}
    unchecked = make(ee_pose_frame='')                          # '' = not checked; camera_frames default too
    assert unchecked.put_frame('agentview', FRAME, 10.0, 10.0, 'anything') == ''
    assert unchecked.put_pose((0, 0, 0.2), UPRIGHT, 10.0, 10.0, 'anything') == ''


def test_reset_and_reactivation_forget_every_stored_input_but_the_instruction():
    controller = make()
    feed(controller, 10.0)
    controller.reject('wrist', 'image_decode', 'garbage')
    controller.request_reset('~/reset service')
    assert not controller.sync.frames and controller.sync.proprio is None and not controller.faults
    assert controller.sync.instruction == 'pick up the red cube'
    feed(controller, 10.1)
    controller.set_active(False)
    controller.set_active(True)
    assert not controller.sync.frames and controller.sync.proprio is None
    assert "no frame yet" in controller.tick(10.2).hold_reason


def test_image_size_and_aspect_checks():
    check_image_size((16, 16, 3), 16)
    for shape in ((1, 1, 3), (1000, 2, 3), (2, 1000, 3)):
        with pytest.raises(ImageError) as error:
            check_image_size(shape, 16)
        assert error.value.kind == 'image_size' and 'min_image_side = 16' in str(error.value)
    assert aspect_distortion((224, 224), (224, 224)) == 1.0
    assert aspect_distortion((480, 640), (224, 224)) == pytest.approx(4 / 3)
    assert aspect_distortion((640, 480), (224, 224)) == pytest.approx(4 / 3)


def test_duplicate_filter_drops_the_second_copy_only():
    seen = DuplicateFilter(size=2)
    assert not seen.seen(('gid', 1)) and seen.seen(('gid', 1)) and not seen.seen(('gid', 2))
