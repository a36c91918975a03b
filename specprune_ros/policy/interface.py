"""What every policy looks like from the outside (the ROS node, the simulator harness, bag replay).

Action convention (LIBERO / OpenVLA-OFT style), one row per control step:
    (dx, dy, dz, droll, dpitch, dyaw, gripper), each in [-1, 1].
Translation and rotation are *normalised* end-effector deltas per control step in the base frame; multiply
by ``ActionSpec.translation_scale_m`` / ``rotation_scale_rad`` for metres / radians per step. Gripper:
-1 = open, +1 = close.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

import numpy as np

from specprune_ros.core.step_types import StepRecord

ACTION_LABELS = ('dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper')


@dataclass(frozen=True)
class ActionSpec:
    """Units of a policy's actions."""

    chunk_size: int = 8
    action_dim: int = 7
    translation_scale_m: float = 0.02      # metres per step at |action| = 1
    rotation_scale_rad: float = 0.2        # radians per step at |action| = 1
    control_period_s: float = 0.1          # the control rate the policy was trained at (10 Hz)


@dataclass
class Observation:
    """One synchronized observation."""

    images: dict[str, np.ndarray]                 # camera name -> (H, W, 3) uint8 RGB
    instruction: str
    proprio: Optional[np.ndarray] = None          # robot state vector (see the policy's proprio_dim)
    executed_actions: Optional[np.ndarray] = None  # (k, 7) recently executed actions, oldest first


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
    image_size: tuple[int, int]                    # (H, W) the model expects; callers resize to it
    proprio_dim: int
    action_spec: ActionSpec

    def reset(self) -> None:
        ...

    def predict(self, observation: Observation) -> PolicyOutput:
        ...
