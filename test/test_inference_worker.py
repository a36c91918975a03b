"""The inference worker thread with a real controller and a fake policy (no ROS).

Covers: a failure anywhere in a step (the policy, the controller, the chunk callback) is counted, reported and makes
the robot hold while the thread keeps running, and the next good step recovers; a stop that times out inside a step
says so and the worker stays ``running`` until the step ends.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

import numpy as np
import pytest

from specprune_ros.control.controller import AcceptedChunk, InferenceRequest, PolicyController
from specprune_ros.control.inference_worker import InferenceWorker
from specprune_ros.control.parameters import NodeParameters
from specprune_ros.policy.interface import ActionSpec, Observation, PolicyOutput

CAMERAS = ('agentview', 'wrist')
FRAME = np.zeros((8, 8, 3), np.uint8)
WAIT_S = 10.0          # generous: 2 shared cores


class FakePolicy:
    camera_names = CAMERAS
    image_size = (8, 8)
    proprio_dim = 6
    action_spec = ActionSpec()

    def __init__(self) -> None:
        self.gate: Optional[threading.Event] = None     # set: predict waits until the gate opens
        self.entered = threading.Event()

    def reset(self) -> None:
        pass

    def predict(self, observation: Observation) -> PolicyOutput:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(WAIT_S)
        return PolicyOutput(actions=np.full((8, 7), 0.5, np.float32), latency_s=0.01, info={})


class Harness:
    """A controller, a worker on a fake policy, and what the worker reported."""

    def __init__(self, on_chunk: Optional[Callable[[AcceptedChunk], None]] = None) -> None:
        params = NodeParameters(max_image_age_s=100.0, max_state_age_s=100.0, max_chunk_age_s=100.0,
                                inference_deadline_s=100.0)
        self.controller = PolicyController(params, CAMERAS, ActionSpec(), needs_proprio=True)
        self.controller.set_active(True)
        self.policy = FakePolicy()
        self.chunks: list[AcceptedChunk] = []
        self.failures: list[BaseException] = []
        self.worker = InferenceWorker(self.controller, self.policy, time.monotonic, on_chunk or self.chunks.append,
                                      self._failed, poll_s=0.01)
        self.worker.start()

    def _failed(self, request: InferenceRequest, error: BaseException) -> None:
        self.failures.append(error)

    def feed(self, instruction: str = 'pick up the red cube') -> None:
        """Fresh frames and state, then wake the worker."""
        now = time.monotonic()
        for camera in CAMERAS:
            self.controller.put_frame(camera, FRAME, now, now)
        self.controller.put_proprio(np.zeros(6), now)
        self.controller.put_instruction(instruction)
        self.worker.wake()

    def failures_counted(self) -> int:
        return self.controller.stats.events['inference_failures']

    def close(self) -> None:
        if self.policy.gate is not None:
            self.policy.gate.set()
        assert self.worker.stop(WAIT_S)


def wait_for(condition: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return condition()
        time.sleep(0.01)
    return condition()


@pytest.fixture
def harness():
    made: list[Harness] = []

    def make(**kwargs: Any) -> Harness:
        made.append(Harness(**kwargs))
        return made[-1]
    yield make
    for each in made:
        each.close()


def failing_first_call(call: Callable[..., Any], error: Exception,
                       counts: Optional[Callable[[Any], bool]] = None) -> Callable[..., Any]:
    """``call`` that raises ``error`` instead of running the first time, then works.

    With ``counts``: it runs every time, and raises after the first run whose result counts.
    """
    counted: list[Any] = []

    def wrapped(*args: Any) -> Any:
        if counts is None and not counted:
            counted.append(args)
            raise error
        result = call(*args)
        if counts is not None and counts(result):
            counted.append(result)
            if len(counted) == 1:
                raise error
        return result
    return wrapped


def assert_held_then_recovered(h: Harness, reason: str) -> None:
    """The failure was counted and reported, the robot holds with ``reason``, the next good step commands."""
    assert wait_for(lambda: h.failures and h.failures_counted() == 1), (h.failures, h.failures_counted())
    assert h.worker.running
    command = h.controller.tick(time.monotonic())
    assert command.holding and reason in command.hold_reason, command.hold_reason
    chunks = len(h.chunks)
    h.feed()
    assert wait_for(lambda: len(h.chunks) > chunks), 'the worker did not infer again after the failure'
    assert not h.controller.tick(time.monotonic()).holding
    assert h.failures_counted() == 1 and h.worker.running


def test_an_exception_in_accept_is_counted_and_the_next_step_recovers(harness):
    h = harness()
    h.controller.accept = failing_first_call(h.controller.accept,
                                             ValueError('setting an array element with a sequence'))
    h.feed()
    assert_held_then_recovered(h, 'inference failed: ValueError: setting an array element with a sequence '
                                  '(in controller.accept)')


def test_an_exception_in_the_chunk_callback_holds_and_the_next_step_recovers(harness):
    delivered: list[AcceptedChunk] = []
    h = harness(on_chunk=failing_first_call(delivered.append, RuntimeError('publisher destroyed')))
    h.chunks = delivered
    h.feed()
    assert_held_then_recovered(h, 'inference failed: RuntimeError: publisher destroyed (in on_chunk)')


def test_a_failure_making_the_request_frees_the_next_step(harness):
    h = harness()
    # the first request is made (the step is in flight now) and then fails: the failure must free the step
    h.controller.next_request = failing_first_call(h.controller.next_request, KeyError('budget'),
                                                   counts=lambda request: request is not None)
    h.feed()
    assert_held_then_recovered(h, "inference failed: KeyError: 'budget' (in controller.next_request)")


def test_a_model_exception_keeps_its_reason(harness):
    h = harness()
    h.policy.predict = failing_first_call(h.policy.predict, RuntimeError('CUDA error'))
    h.feed()
    assert_held_then_recovered(h, 'inference failed: RuntimeError: CUDA error')
    assert '(in ' not in h.controller.stats.last_inference_error


def test_a_stop_that_times_out_inside_a_step_says_so_and_the_worker_stays_running(harness):
    h = harness()
    h.policy.gate = threading.Event()
    h.feed()
    assert h.policy.entered.wait(WAIT_S)
    assert not h.worker.stop(timeout=0.05)
    assert h.worker.running and h.worker.busy_with.startswith('policy.predict (for ')
    h.policy.gate.set()
    assert h.worker.stop(timeout=WAIT_S)
    assert not h.worker.running and h.worker.busy_with == ''


def test_a_stop_between_steps_ends_the_thread(harness):
    h = harness()
    h.feed()
    assert wait_for(lambda: h.chunks)
    assert h.worker.stop(timeout=WAIT_S) and not h.worker.running
    assert h.worker.stop()                # again: nothing left to stop
