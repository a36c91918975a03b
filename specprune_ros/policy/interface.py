"""What every policy looks like from the outside (the ROS node, the simulator harness, bag replay).

Action convention of ``action_space`` 'ee_delta' (LIBERO / OpenVLA-OFT style), one row per control step:
    (dx, dy, dz, droll, dpitch, dyaw, gripper), each in [-1, 1].
Translation and rotation are *normalised* end-effector deltas per control step in the base frame; multiply
by ``ActionSpec.translation_scale_m`` / ``rotation_scale_rad`` for metres / radians per step. Gripper:
-1 = open, +1 = close.

``action_space`` 'joint': one row per control step of joint targets in the units the checkpoint was trained on
(e.g. radians, gripper opening), named by ``ActionSpec.action_names`` in that order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Protocol

import numpy as np

from specprune_ros.core.dataclass_mapping import check_number
from specprune_ros.core.step_types import StepRecord

ACTION_LABELS = ('dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper')
ActionSpace = Literal['ee_delta', 'joint']
ACTION_SPACES = ('ee_delta', 'joint')


@dataclass(frozen=True)
class ActionSpec:
    """Units of a policy's actions."""

    chunk_size: int = 8
    action_dim: int = 7
    translation_scale_m: float = 0.02      # metres per step at |action| = 1
    rotation_scale_rad: float = 0.2        # radians per step at |action| = 1
    control_period_s: float = 0.1          # the control rate the policy was trained at (10 Hz)
    action_space: ActionSpace = 'ee_delta'  # 'ee_delta': normalised end-effector deltas; 'joint': joint targets
    action_names: tuple[str, ...] = ()     # one name per action dimension, in order ((): the defaults below)

    def __post_init__(self) -> None:
        if self.action_space not in ACTION_SPACES:
            raise ValueError(f'action_space must be one of {ACTION_SPACES}, got {self.action_space!r}')
        if not self.action_names:
            object.__setattr__(self, 'action_names', default_action_names(self.action_dim, self.action_space))
        object.__setattr__(self, 'action_names', tuple(self.action_names))
        if len(self.action_names) != self.action_dim:
            raise ValueError(f'{len(self.action_names)} action_names for action_dim {self.action_dim}')
        check_number('chunk_size', self.chunk_size, integer=True)
        check_number('action_dim', self.action_dim, integer=True)
        if self.chunk_size < 1 or self.action_dim < 1:
            raise ValueError(f'a chunk needs at least one step of one action, got chunk_size {self.chunk_size}, '
                             f'action_dim {self.action_dim}')
        check_action_units(self)
        if self.action_space == 'ee_delta' and self.action_dim != len(ACTION_LABELS):
            raise ValueError(f"'ee_delta' actions are {len(ACTION_LABELS)}-D ({', '.join(ACTION_LABELS)}), got "
                             f"action_dim {self.action_dim}: a policy with other actions needs action_space 'joint' "
                             '(specprune_adapter.json)')


def check_action_units(settings: object) -> None:
    """Raise unless ``settings``' ``translation_scale_m``, ``rotation_scale_rad`` and ``control_period_s`` are positive.

    The node's velocities are action * scale / period: a zero, negative or NaN unit would stop, reverse or poison
    every command.
    """
    for name in ('translation_scale_m', 'rotation_scale_rad', 'control_period_s'):
        check_number(name, getattr(settings, name), 0.0, open_low=True, note='action units are positive')


def default_action_names(action_dim: int, action_space: str = 'ee_delta') -> tuple[str, ...]:
    """The end-effector labels for 7-D 'ee_delta' actions, else ``joint_0``, ``joint_1``, ... (``action_i``)."""
    if action_space == 'ee_delta' and action_dim == len(ACTION_LABELS):
        return ACTION_LABELS
    prefix = 'joint' if action_space == 'joint' else 'action'
    return tuple(f'{prefix}_{i}' for i in range(action_dim))


@dataclass
class Observation:
    """One synchronized observation."""

    images: dict[str, np.ndarray]                 # camera name -> (H, W, 3) uint8 RGB
    instruction: str
    proprio: Optional[np.ndarray] = None          # robot state vector (see the policy's proprio_dim)
    executed_actions: Optional[np.ndarray] = None  # (k, action_dim) recently executed actions, oldest first
    timestamp: Optional[float] = None             # seconds (any clock): a method resets its temporal state after
    # a gap longer than its max_gap_s (the ROS node resets on its own reset_after_gap_s and leaves this None)


@dataclass
class PolicyOutput:
    """One inference: a chunk of actions and what pruning did to get it."""

    actions: np.ndarray                            # (chunk_size, action_dim) float32, normalised units
    latency_s: float                               # wall time of predict()
    record: Optional[StepRecord] = None
    info: dict = field(default_factory=dict)


class Policy(Protocol):
    """A VLA policy with temporal token state (reset it on a new episode or instruction)."""

    camera_names: tuple[str, ...]
    image_size: tuple[int, int]                    # (H, W) the model expects; callers fit frames to it ...
    image_fit: str                                 # ... 'stretch' or 'pad' (codecs.image_decoding.fit_to)
    proprio_dim: int
    action_spec: ActionSpec

    def reset(self) -> None:
        ...

    def check_instruction(self, instruction: str) -> None:
        """Raise ``InstructionError`` (``specprune_ros.codecs.instruction``) for an instruction it cannot read."""
        ...

    def predict(self, observation: Observation) -> PolicyOutput:
        ...
