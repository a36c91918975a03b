"""A model backend plus a pruning method behind the ``Policy`` interface (numpy in, action chunk out)."""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

from specprune_ros.core.step_types import PruningMethod
from specprune_ros.policy.backend import ModelBackend, run_step
from specprune_ros.policy.interface import ActionSpec, Observation, PolicyOutput


class PrunablePolicy:
    """Runs a backend through the prunable executor with a pruning method.

    Owns the step counter, the timing, the output's info and the reset of the method's temporal state (new episode or
    instruction).
    """

    def __init__(self, backend: ModelBackend, method: Optional[PruningMethod] = None) -> None:
        self.backend = backend
        self.method = method
        self.step_index = 0
        self.camera_names: tuple[str, ...] = backend.camera_names
        self.image_size: tuple[int, int] = backend.image_size
        self.image_fit: str = backend.image_fit
        self.proprio_dim: int = backend.proprio_dim
        self.action_spec: ActionSpec = backend.action_spec

    @property
    def method_name(self) -> str:
        return getattr(self.method, 'name', 'none')

    def check_instruction(self, instruction: str) -> None:
        """Raise :class:`~specprune_ros.codecs.instruction.InstructionError` for one the model cannot read."""
        self.backend.check_instruction(instruction)

    def reset(self) -> None:
        """New episode or instruction: forget the temporal token state."""
        self.step_index = 0
        if self.method is not None:
            self.method.reset()
        self.backend.reset()

    def predict(self, observation: Observation) -> PolicyOutput:
        """One chunk of actions (chunk_size, action_dim) in the backend's units for the observation."""
        started, step_index = time.perf_counter(), self.step_index
        self.step_index += 1    # also when the step fails: a repeated index would read as a new episode
        output = run_step(self.backend, observation, self.method, step_index)
        actions = np.asarray(self.backend.actions(output.normalized), dtype=np.float32)
        info = {'method': self.method_name, 'step_index': step_index, 'model': self.backend.name,
                'normalized_actions': output.normalized.astype(np.float32), **output.info}
        return PolicyOutput(actions=actions, latency_s=time.perf_counter() - started, record=output.result.record,
                            info=info)
