"""The node's controller and inference worker with a fake policy and a hand-driven clock (no ROS)."""
import threading
import time

import numpy as np
import pytest
import torch

from specprune_ros.control.controller import PolicyController
from specprune_ros.control.inference_worker import InferenceWorker
from specprune_ros.codecs.kept_patches import draw_kept_patches, kept_patch_masks
from specprune_ros.control.parameters import NodeParameters
from specprune_ros.core.token_layout import TokenLayout
from specprune_ros.policy.interface import ActionSpec, PolicyOutput

CAMERAS = ('agentview', 'wrist')
FRAME = np.zeros((8, 8, 3), np.uint8)


class FakePolicy:
    camera_names = CAMERAS
    image_size = (8, 8)
    proprio_dim = 6
    action_spec = ActionSpec()

    def __init__(self, value=0.5, error=None):
        self.value, self.error = value, error
        self.resets, self.steps, self.observations = 0, 0, []

    def reset(self):
        self.resets += 1
        self.steps = 0

    def predict(self, observation):
        if self.error:
            raise self.error
        self.observations.append(observation)
        self.steps += 1
        actions = np.full((8, 7), self.value, dtype=np.float32)
        return PolicyOutput(actions=actions, latency_s=0.01, info={'step_index': self.steps - 1, 'mode': 'coarse'})


def make(**overrides):
    params = NodeParameters(**{'replan_every_steps': 2, 'max_chunk_age_s': 0.6, 'inference_deadline_s': 0.5,
                               **overrides})
    controller = PolicyController(params, CAMERAS, ActionSpec(), needs_proprio=True)
    controller.set_active(True)
    return controller


def feed(controller, stamp, instruction='pick up the red cube'):
    for camera in CAMERAS:
        controller.put_frame(camera, FRAME, stamp, stamp)
    controller.put_proprio(np.zeros(6), stamp)
    if instruction:
        controller.put_instruction(instruction)


def infer(controller, policy, now, finish=None):
    request = controller.next_request(now)
    assert request is not None
    if request.reset_reason:
        policy.reset()
    return request, controller.accept(request, policy.predict(request.observation), finish or now + 0.02)


def test_inactive_and_waiting_states_hold():
    controller = make()
    controller.set_active(False)
    assert controller.tick(0.0).hold_reason == 'not active'
    controller.set_active(True)
    assert 'no frame yet' in controller.tick(0.0).hold_reason
    assert controller.next_request(0.0) is None


def test_full_cycle_commands_the_chunk():
    controller, policy = make(), FakePolicy(0.5)
    feed(controller, 10.0)
    request, chunk = infer(controller, policy, 10.0)
    assert request.reset_reason == 'first observation' and policy.resets == 1
    assert chunk.skipped_steps == 0 and chunk.steps_since_reset == 1 and chunk.controller_mode == 'coarse'
    command = controller.tick(10.03)
    assert not command.holding
    np.testing.assert_allclose(command.twist[:3], 0.5 * 0.02 / 0.1)
    level, rows = controller.diagnostics()
    rows = dict(rows)
    assert rows['inferences'] == '1' and rows['temporal resets'] == '1' and rows['controller mode'] == 'coarse'


def test_requests_need_new_frames_and_the_replan_period():
    controller, policy = make(replan_every_steps=2), FakePolicy()
    feed(controller, 10.0)
    infer(controller, policy, 10.0)
    assert controller.next_request(10.05) is None           # no new frame
    feed(controller, 10.05, instruction='')
    assert controller.next_request(10.05) is None           # not due before 2 steps (0.2 s)
    feed(controller, 10.2, instruction='')
    request = controller.next_request(10.2)
    assert request is not None and request.reset_reason == ''
    assert controller.next_request(10.2) is None            # one request in flight at a time


def test_executed_actions_reach_the_next_observation():
    controller, policy = make(), FakePolicy(0.5)
    feed(controller, 10.0)
    infer(controller, policy, 10.0)
    for k in range(3):
        controller.tick(10.0 + 0.1 * k + 0.001)
        controller.tick(10.0 + 0.1 * k + 0.05)             # same step twice: recorded once
    feed(controller, 10.3, instruction='')
    request = controller.next_request(10.3)
    executed = request.observation.executed_actions
    assert executed.shape == (3, 7)
    np.testing.assert_allclose(executed[:, :6], 0.5, rtol=1e-5)


def test_a_hold_superseded_at_its_tick_is_not_an_executed_action():
    """At a replan the old chunk runs out and the new one's first command goes out at the same tick.

    A step-synchronous simulator applies only that command: the hold before it was never executed. A hold that
    lasts is one executed (zero) action per period.
    """
    controller, policy = make(replan_every_steps=8, max_chunk_age_s=2.0), FakePolicy(0.5)
    feed(controller, 10.0)
    infer(controller, policy, 10.0, finish=10.0)
    for k in range(8):
        feed(controller, 10.0 + 0.1 * k, instruction='')
        assert not controller.tick(10.0 + 0.1 * k).holding
    feed(controller, 10.8, instruction='')
    assert controller.tick(10.8).holding                        # the chunk ran out: the timer holds
    request, _ = infer(controller, policy, 10.8, finish=10.8)
    assert len(request.observation.executed_actions) == 8       # the previous chunk, not the hold
    assert not controller.tick(10.8).holding                     # the new chunk's first command, same tick
    for k in range(9, 19):
        feed(controller, 10.0 + 0.1 * k, instruction='')
        controller.tick(10.0 + 0.1 * k)
    feed(controller, 11.95, instruction='')
    executed = controller.next_request(11.95).observation.executed_actions
    assert len(executed) == 11 and not executed[-3:, :6].any() and executed[:8, 0].min() > 0   # 8 steps, 3 holds


def test_instruction_change_resets_and_voids_the_running_inference():
    controller, policy = make(), FakePolicy()
    feed(controller, 10.0)
    infer(controller, policy, 10.0)
    feed(controller, 10.2, instruction='')
    running = controller.next_request(10.2)
    controller.put_instruction('push the blue cube to the left zone')
    assert controller.accept(running, policy.predict(running.observation), 10.22) is None   # old instruction
    assert 'waiting' in controller.tick(10.23).hold_reason
    feed(controller, 10.25, instruction='')
    request = controller.next_request(10.25)
    assert 'instruction changed' in request.reset_reason
    assert request.observation.instruction == 'push the blue cube to the left zone'
    assert dict(controller.diagnostics()[1])['temporal resets'] == '2'


def test_reset_request_and_input_gap_reset_the_temporal_state():
    controller, policy = make(reset_after_gap_s=2.0, max_image_age_s=10.0, max_state_age_s=10.0), FakePolicy()
    feed(controller, 10.0)
    infer(controller, policy, 10.0)
    controller.request_reset('~/reset service')
    feed(controller, 10.3, instruction='')
    request, chunk = infer(controller, policy, 10.3)
    assert request.reset_reason == '~/reset service' and chunk.steps_since_reset == 1
    feed(controller, 13.0, instruction='')                  # 2.7 s after the last observation
    request, chunk = infer(controller, policy, 13.0)
    assert request.reset_reason.startswith('input gap of 2.70 s')
    assert policy.resets == 3 and chunk.policy_info['step_index'] == 0


def test_stale_input_holds_and_drops_the_plan():
    controller, policy = make(max_image_age_s=0.5), FakePolicy()
    feed(controller, 10.0)
    infer(controller, policy, 10.0)
    assert not controller.tick(10.1).holding
    command = controller.tick(10.51)
    assert command.holding and 'stale' in command.hold_reason and not command.twist.any()
    assert controller.scheduler.current is None


def test_deadline_miss_failure_and_nan_hold_until_a_good_chunk():
    controller, policy = make(inference_deadline_s=0.1), FakePolicy()
    feed(controller, 10.0)
    request, chunk = infer(controller, policy, 10.0, finish=10.15)
    assert chunk is None and 'deadline' in controller.tick(10.16).hold_reason
    feed(controller, 10.2, instruction='')
    request = controller.next_request(10.2)
    controller.inference_failed(request, 'RuntimeError: out of memory')
    assert 'inference failed: RuntimeError' in controller.tick(10.21).hold_reason
    assert controller.diagnostics()[0] == 2                 # ERROR level while failing
    feed(controller, 10.3, instruction='')
    bad = FakePolicy(np.nan)
    request, chunk = infer(controller, bad, 10.3)
    assert chunk is None and 'NaN' in controller.tick(10.31).hold_reason
    feed(controller, 10.4, instruction='')
    infer(controller, policy, 10.4)
    assert not controller.tick(10.41).holding
    events = dict(controller.diagnostics()[1])
    assert events['inference deadline misses'] == '1' and events['inference failures'] == '1'
    assert events['non finite chunks'] == '1'


def test_disable_holds_and_stops_inference():
    controller, policy = make(), FakePolicy()
    feed(controller, 10.0)
    infer(controller, policy, 10.0)
    controller.set_enabled(False)
    assert 'disabled' in controller.tick(10.05).hold_reason
    feed(controller, 10.3, instruction='')
    assert controller.next_request(10.3) is None
    controller.set_enabled(True)
    assert 'waiting' in controller.tick(10.31).hold_reason   # old plan dropped on re-enable
    assert controller.next_request(10.31) is not None


@pytest.mark.parametrize('stop, start', [(lambda c: c.set_active(False), lambda c: c.set_active(True)),
                                         (lambda c: c.set_enabled(False), lambda c: c.set_enabled(True))])
def test_a_chunk_computed_before_a_stop_is_never_commanded_after_the_restart(stop, start):
    """Deactivate / disable while the model runs, restart before it returns: its chunk is void, the state resets."""
    controller, policy = make(), FakePolicy(0.5)
    feed(controller, 10.0)
    request = controller.next_request(10.0)
    stop(controller)
    start(controller)
    assert controller.accept(request, policy.predict(request.observation), 10.1) is None
    feed(controller, 10.2, instruction='')
    assert 'waiting' in controller.tick(10.2).hold_reason
    assert controller.next_request(10.2).reset_reason in ('deactivated', 'disabled')


def test_a_chunk_ages_from_its_oldest_frame_not_from_the_request():
    """Frames 0.45 s old at the request (fresh by max_image_age_s 0.5): the chunk holds 0.6 s after the frames."""
    controller, policy = make(max_image_age_s=0.5, max_chunk_age_s=0.6), FakePolicy(0.5)
    feed(controller, 9.55)
    request, chunk = infer(controller, policy, 10.0, finish=10.05)
    assert chunk.observed == pytest.approx(9.55) and chunk.started == pytest.approx(10.0)
    assert chunk.skipped_steps == 5                       # 0.5 s of the chunk elapsed since its frames
    for now in (10.1, 10.14):
        feed(controller, now, instruction='')
        assert not controller.tick(now).holding
    feed(controller, 10.2, instruction='')
    assert 'newest action chunk is 0.650 s old' in controller.tick(10.2).hold_reason


def test_a_lowered_speed_limit_holds_from_the_next_tick():
    """Slowing down to a new limit is not rate-limited: the arm never runs above the limit it was given."""
    controller, policy = make(max_linear_accel=0.5), FakePolicy(1.0)
    feed(controller, 10.0)
    infer(controller, policy, 10.0)
    for k in range(6):
        feed(controller, 10.0 + 0.1 * k, instruction='')
        fast = controller.tick(10.0 + 0.1 * k)
    assert np.abs(fast.twist[:3]).max() == pytest.approx(0.2)
    controller.update_parameters(NodeParameters(max_linear_speed=0.02, max_linear_accel=0.5, replan_every_steps=2,
                                                max_chunk_age_s=0.6, inference_deadline_s=0.5))
    for now in (10.55, 10.58):
        feed(controller, now, instruction='')
        assert np.abs(controller.tick(now).twist[:3]).max() == pytest.approx(0.02)


def test_the_node_resumes_after_the_clock_jumps_back():
    """A simulator reset under use_sim_time (100 s -> 1 s): fresh inputs are taken again at once."""
    controller, policy = make(), FakePolicy(0.5)
    feed(controller, 100.0)
    infer(controller, policy, 100.0)
    assert not controller.tick(100.05).holding
    commanded, resets = [], []
    for k in range(10):
        now = 1.0 + 0.1 * k
        feed(controller, now, instruction='')
        commanded.append(not controller.tick(now).holding)
        request = controller.next_request(now)
        if request is not None:
            controller.accept(request, policy.predict(request.observation), now + 0.02)
            resets.append(request.reset_reason)
    assert commanded[0] is False and all(commanded[2:])
    assert resets[0] == 'the clock jumped back by 99.050 s' and not any(resets[1:])
    assert dict(controller.diagnostics()[1])['clock jumps back'] == '1'


def test_frames_of_the_new_timeline_before_the_tick_after_a_clock_jump_are_not_bad_input():
    """Frames stamped after a simulator reset reach the controller before the tick that notices the jump."""
    controller, policy = make(), FakePolicy(0.5)
    feed(controller, 100.0)
    infer(controller, policy, 100.0)
    assert not controller.tick(100.05).holding
    for camera in CAMERAS:
        assert controller.put_frame(camera, FRAME, 1.0, 1.0) == ''      # older than the stored frames: no fault
    assert controller.tick(1.0).holding and not controller.stats.input_errors and not controller.faults
    feed(controller, 1.1, instruction='')
    request, chunk = infer(controller, policy, 1.1)
    assert chunk is not None and request.reset_reason == 'the clock jumped back by 99.050 s'
    assert not controller.tick(1.13).holding and not controller.stats.input_errors


RESETS = [lambda c: c.put_instruction('push the blue cube to the left zone'),
          lambda c: (c.set_active(False), c.set_active(True)),
          lambda c: (c.set_enabled(False), c.set_enabled(True)),
          lambda c: c.request_reset('~/reset service')]
RESET_IDS = ['instruction', 'reactivation', 'reenable', 'reset_service']


@pytest.mark.parametrize('reset', RESETS, ids=RESET_IDS)
def test_a_failure_of_a_step_voided_by_a_reset_is_not_blamed_on_the_new_episode(reset):
    controller, policy = make(), FakePolicy(0.5)
    feed(controller, 10.0)
    infer(controller, policy, 10.0)
    feed(controller, 10.2, instruction='')
    running = controller.next_request(10.2)
    reset(controller)
    assert not controller.inference_failed(running, 'RuntimeError: boom in the old episode')   # not reported
    level, rows = controller.diagnostics()
    rows = dict(rows)
    assert 'inference failures' not in rows and rows['failures discarded after reset'] == '1'
    assert rows['last inference error'] == 'none' and level != 2
    feed(controller, 10.25, instruction='')
    command = controller.tick(10.25)
    assert command.holding and command.hold_reason == 'waiting for the first action chunk'   # no plan yet
    infer(controller, policy, 10.25)
    assert not controller.tick(10.27).holding


@pytest.mark.parametrize('reset', RESETS, ids=RESET_IDS)
def test_a_reset_clears_a_stored_inference_failure(reset):
    controller = make()
    feed(controller, 10.0)
    assert controller.inference_failed(controller.next_request(10.0), 'RuntimeError: out of memory')
    assert 'inference failed' in controller.tick(10.01).hold_reason and controller.diagnostics()[0] == 2
    reset(controller)
    feed(controller, 10.1, instruction='')
    command = controller.tick(10.1)
    assert command.holding and command.hold_reason == 'waiting for the first action chunk'
    level, rows = controller.diagnostics()
    assert level != 2 and dict(rows)['inference failures'] == '1'


def test_a_small_clock_step_back_keeps_the_plan():
    controller, policy = make(max_future_stamp_s=0.1), FakePolicy(0.5)
    feed(controller, 10.0)
    infer(controller, policy, 10.0)
    assert not controller.tick(10.1).holding
    assert not controller.tick(10.05).holding              # 50 ms back: a clock adjustment, not a reset


def test_runtime_parameter_update():
    controller, policy = make(), FakePolicy(1.0)
    feed(controller, 10.0)
    infer(controller, policy, 10.0)
    controller.update_parameters(NodeParameters(max_linear_speed=0.05, replan_every_steps=2))
    assert np.abs(controller.tick(10.01).twist[:3]).max() == pytest.approx(0.05)


def test_worker_thread_runs_the_policy_and_survives_exceptions():
    controller = make(max_image_age_s=100.0, max_state_age_s=100.0)
    policy = FakePolicy(error=RuntimeError('model exploded'))
    chunks, failures = [], []
    clock = time.monotonic
    worker = InferenceWorker(controller, policy, clock, chunks.append, lambda r, e: failures.append(e), poll_s=0.01)
    worker.start()
    try:
        feed(controller, clock())
        worker.wake()
        deadline = time.monotonic() + 5
        while not failures and time.monotonic() < deadline:
            time.sleep(0.01)
        assert failures and worker.running
        policy.error = None
        feed(controller, clock(), instruction='')
        worker.wake()
        while not chunks and time.monotonic() < deadline:
            time.sleep(0.01)
        assert chunks and chunks[0].actions.shape == (8, 7)
    finally:
        worker.stop()
    assert not worker.running


def test_controller_is_safe_under_concurrent_callers():
    controller, policy = make(max_image_age_s=100.0, max_state_age_s=100.0), FakePolicy()
    stop = threading.Event()
    errors = []

    def feeder():
        stamp = 10.0
        while not stop.is_set():
            stamp += 0.001
            feed(controller, stamp, instruction='')

    def ticker():
        try:
            while not stop.is_set():
                assert np.isfinite(controller.tick(time.monotonic()).twist).all()
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    controller.put_instruction('pick')
    threads = [threading.Thread(target=feeder), threading.Thread(target=ticker)]
    for thread in threads:
        thread.start()
    for _ in range(20):
        request = controller.next_request(10.5)
        if request is not None:
            controller.accept(request, policy.predict(request.observation), 10.51)
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors


def test_kept_patch_overlay():
    layout = TokenLayout(num_tokens=10, camera_spans=((0, 4), (4, 8)), grid_shape=(2, 2))

    class Record:
        pass

    record = Record()
    record.layout = layout
    record.kept_per_layer = [torch.arange(10), torch.tensor([0, 3, 6, 8, 9])]
    masks = kept_patch_masks(record)
    assert masks[0].tolist() == [[True, False], [False, True]]
    assert masks[1].tolist() == [[False, False], [True, False]]
    images = [np.full((8, 8, 3), 200, np.uint8)] * 2
    picture = draw_kept_patches(images, masks, scale=2)
    assert picture.shape == (16, 32, 3)
    assert picture[12, 4].max() <= 50                     # pruned patch darkened (camera 0, bottom-left)
    assert picture[5, 5].tolist() == [200, 200, 200]      # kept patch interior untouched


@pytest.mark.parametrize('latency_s', [0.0, 0.03, 0.07])
def test_the_executed_history_has_one_row_per_step_when_a_new_chunk_replaces_a_commanded_step(latency_s):
    """A new chunk's step replaces the row of the step window the old chunk already commanded.

    The node publishes a new chunk at once, inside a window the old chunk's step was commanded in; SpecPrune's
    controller reads the history as one action per policy period.
    """
    controller, policy = make(), FakePolicy()
    handed: list[int] = []
    request, value = None, 0
    for k in range(40):                          # 4 s of 10 Hz ticks on a camera at 10 Hz
        now = 10.0 + 0.1 * k
        feed(controller, now, instruction='' if k else 'pick up the red cube')
        controller.tick(now)
        if request is None:
            request = controller.next_request(now)
            if request is not None:
                if request.observation.executed_actions is not None and k > 2:
                    handed.append(len(request.observation.executed_actions))
                value = value + 1
                policy.value = value / 100.0
                arrival = now + latency_s
                controller.accept(request, policy.predict(request.observation), arrival)
                controller.tick(arrival)          # the node's publish_on_new_chunk
                request = None
    assert handed and set(handed) == {2}, handed   # replan_every_steps rows between two inferences


def test_a_hold_counts_one_executed_action_per_period_whatever_the_tick_jitter():
    """Ticks early or late by 30 % of a period neither lose nor add a held period in the executed history."""
    controller, policy = make(replan_every_steps=8, max_chunk_age_s=2.0), FakePolicy(0.5)
    feed(controller, 10.0)
    infer(controller, policy, 10.0, finish=10.0)
    for k in range(8):                                            # the chunk's 8 steps, on the grid
        feed(controller, 10.0 + 0.1 * k, instruction='')
        controller.tick(10.0 + 0.1 * k)
    for k, jitter in zip(range(8, 16), (-0.03, 0.03, -0.03, 0.02, -0.02, 0.03, -0.03, 0.0)):
        controller.tick(10.0 + 0.1 * k + jitter)                 # it ran out at 10.8: holds from there
    feed(controller, 11.55, instruction='')
    executed = controller.next_request(11.55).observation.executed_actions
    assert len(executed) == 8 + 7 and not executed[8:, :6].any(), len(executed)   # 0.75 s held: 7 periods
