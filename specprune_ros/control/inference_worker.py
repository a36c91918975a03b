"""The thread that runs the policy: waits for a due, fresh observation, predicts, hands the chunk over."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from specprune_ros.control.controller import AcceptedChunk, InferenceRequest, PolicyController
from specprune_ros.policy.interface import Observation, Policy

PREDICT = 'policy.predict'
LOG = logging.getLogger(__name__)


class InferenceWorker:
    """Owns the policy while running: ``reset`` and ``predict`` are only ever called from this thread.

    A failing step (the model, a malformed chunk, the chunk callback) is counted by the controller, reported through
    ``on_failure`` and makes the robot hold; the thread carries on and the next good step recovers.
    """

    def __init__(self, controller: PolicyController, policy: Policy, clock: Callable[[], float],
                 on_chunk: Callable[[AcceptedChunk], None],
                 on_failure: Callable[[InferenceRequest, BaseException], None], poll_s: float = 0.05) -> None:
        self.controller = controller
        self.policy = policy
        self.clock = clock
        self.on_chunk = on_chunk
        self.on_failure = on_failure
        self.poll_s = poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._step: Optional[tuple[str, float]] = None    # (what the thread is inside, since when: monotonic)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name='specprune-inference', daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A new frame (or a reset) arrived: look for work now; inference starts on fresh frames only."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the thread; False when it is still inside a step after ``timeout`` s (it then stays ``running``)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is None:
            return True
        if thread is not threading.current_thread():
            thread.join(timeout)
        if thread.is_alive():
            return False
        self._thread = None
        return True

    @property
    def running(self) -> bool:
        """The thread is alive (after a timed-out ``stop`` too, until its step ends)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def busy_with(self) -> str:
        """What the thread is inside now and for how long, e.g. 'policy.predict (for 12.3 s)'; '' between steps."""
        step = self._step
        return f'{step[0]} (for {time.monotonic() - step[1]:.1f} s)' if step else ''

    def _enter(self, step: str) -> None:
        self._step = (step, time.monotonic())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._enter('controller.next_request')
                request = self.controller.next_request(self.clock())
                self._step = None
            except Exception as error:
                self._failed(self._request_that_failed(), error)
                continue
            if request is not None:
                self.run_once(request)

    def _request_that_failed(self) -> InferenceRequest:
        """A stand-in for a request whose making failed: the failure path frees the in-flight slot of its epoch."""
        return InferenceRequest(Observation(images={}, instruction=''), 0.0, 0.0, 0.0, self.controller.epoch)

    def run_once(self, request: InferenceRequest) -> Optional[AcceptedChunk]:
        """Predict for one request and pass the outcome on (public for tests); None when it failed or is void."""
        try:
            budget = self.controller.budget
            if request.reset_reason:
                self._enter('policy.reset')
                self.policy.reset()
                if budget is not None:
                    budget.reset_methods(self.policy)
            self._enter(PREDICT)
            if budget is not None:
                budget.apply(self.policy, request.budget)
            output = self.policy.predict(request.observation)
            self._enter('controller.accept')
            accepted = self.controller.accept(request, output, self.clock())
            if accepted is not None:
                self._enter('on_chunk')
                self.on_chunk(accepted)
        except Exception as error:  # the node must survive any failure of a step; the reason goes to diagnostics
            self._failed(request, error)
            return None
        self._step = None
        return accepted

    def _failed(self, request: InferenceRequest, error: Exception) -> None:
        """Count the failure and hold (controller), report it (``on_failure``); never raises."""
        step = self._step[0] if self._step else ''
        self._step = None
        where = '' if step in ('', PREDICT) else f' (in {step})'
        try:
            if self.controller.inference_failed(request, f'{type(error).__name__}: {error}{where}'):
                self.on_failure(request, error)         # a voided step's failure is not this episode's
        except Exception:  # noqa: BLE001 - the thread must go on; nothing else can report this
            LOG.exception('inference worker: reporting a failed step failed')
