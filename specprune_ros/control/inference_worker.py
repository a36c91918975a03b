"""The thread that runs the policy: waits for a due, fresh observation, predicts, hands the chunk over."""
from __future__ import annotations

import threading
from typing import Callable, Optional

from specprune_ros.control.controller import AcceptedChunk, InferenceRequest, PolicyController
from specprune_ros.policy.interface import Policy


class InferenceWorker:
    """Owns the policy while running: ``reset`` and ``predict`` are only ever called from this thread."""

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

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name='specprune-inference', daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A new frame (or a reset) arrived: look for work now; inference starts on fresh frames only."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            request = self.controller.next_request(self.clock())
            if request is not None:
                self.run_once(request)

    def run_once(self, request: InferenceRequest) -> Optional[AcceptedChunk]:
        """Predict for one request and pass the outcome on (public for tests)."""
        try:
            budget = self.controller.budget
            if request.reset_reason:
                self.policy.reset()
                if budget is not None:
                    budget.reset_methods(self.policy)
            if budget is not None:
                budget.apply(self.policy, request.budget)
            output = self.policy.predict(request.observation)
        except Exception as error:  # the node must survive any model failure; the reason goes to diagnostics
            self.controller.inference_failed(request, f'{type(error).__name__}: {error}')
            self.on_failure(request, error)
            return None
        accepted = self.controller.accept(request, output, self.clock())
        if accepted is not None:
            self.on_chunk(accepted)
        return accepted
