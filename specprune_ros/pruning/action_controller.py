"""SpecPrune-VLA's action-aware controller: coarse vs fine-grained mode from the executed actions.

Actions are rows ``(dx, dy, dz, droll, dpitch, dyaw, gripper)`` normalised to [-1, 1] per control step (LIBERO /
OpenVLA-OFT convention, see ``specprune_ros.policy.interface``), so the public code's thresholds carry over.
Per action: ``v = |(dx, dy, dz)|``, ``v_xy = |(dx, dy)|``, ``v_rot = |(droll, dpitch, dyaw)|``, ``dz`` signed.

``variant='code'`` (default; the public code, with hysteresis), applied to each executed action in order:

* coarse -> fine if ``v < 0.4`` or (``v_xy < 0.1`` and ``dz < 0.1`` and ``v_rot < 0.2``);
* fine -> coarse if ``dz > 0.2`` or (``v_rot > 0.3`` and the action queue is empty, i.e. the last action of the
  executed batch, after which the policy re-plans).

  Entering fine mode with actions still queued makes the code drop the queue and re-plan; we only report that as
  ``replan_requested`` (the policy decides).

``variant='paper'`` (stateless, from the last executed action): fine iff ``v < v_t_th`` and ``v_rot < v_r_th`` and
``dz <= 0`` (approaching / placing). The paper gives no numbers for ``v_t_th``/``v_r_th``; we reuse 0.4 / 0.2.

Token budget: fine mode keeps more attention top-k tokens, ``K_base = alpha * 40`` (fine) vs ``alpha * 24``
(coarse) per 256-patch camera in the paper. Our cameras have a different patch count (144 = 12 x 12), so we scale
by the patch count: ``K_base = round(alpha * k / 256 * patches)`` - i.e. the same *fraction* of each camera's
patches (40/256 = 15.6 %, 24/256 = 9.4 %); with alpha = 1 and 144 patches: 23 (fine) and 14 (coarse).
``camera_scale`` optionally weights cameras (the public code gives the wrist camera 0.75 of the primary's K).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np

from specprune_ros.pruning.scoring import budget_count

Mode = Literal['coarse', 'fine']


@dataclass
class ControllerConfig:
    """Thresholds in normalised action units per control step."""

    variant: Literal['code', 'paper'] = 'code'
    enter_speed: float = 0.4       # code: fine if |dxyz| < enter_speed ...
    enter_xy: float = 0.1          # ... or (|dxy| < enter_xy
    enter_z: float = 0.1           # ... and dz < enter_z (signed)
    enter_rot: float = 0.2         # ... and |drot| < enter_rot)
    leave_z: float = 0.2           # code: coarse if dz > leave_z (signed) ...
    leave_rot: float = 0.3         # ... or (|drot| > leave_rot and queue empty)
    paper_speed: float = 0.4       # paper: fine iff |dxyz| < paper_speed and |drot| < paper_rot and dz <= 0
    paper_rot: float = 0.2
    initial_mode: Mode = 'coarse'  # mode before any action was executed
    warmup_actions: int = 0        # ignore the first N executed actions of an episode (the code waits ~10 steps)
    alpha: float = 1.0             # pruning scale of K_base (the public code uses 0.8, squared in fine mode)
    k_fine: float = 40.0           # K_base per `reference_patches` patches in fine mode
    k_coarse: float = 24.0         # ... in coarse mode
    reference_patches: int = 256   # the patch count k_fine / k_coarse refer to (OpenVLA-OFT: 16 x 16)
    camera_scale: tuple[float, ...] = field(default_factory=tuple)  # per-camera K multipliers (empty = all 1)

    def k_fraction(self, mode: Mode) -> float:
        """K_base as a fraction of a camera's patches."""
        k = self.k_fine if mode == 'fine' else self.k_coarse
        return self.alpha * k / self.reference_patches


@dataclass
class ControllerOutput:
    mode: Mode
    k_fraction: float
    speed: float                    # |sum of executed dxyz| since the last update (drives the reference frame)
    replan_requested: bool          # entered fine mode with actions still queued (code behaviour)
    switched: bool                  # the mode changed during this update

    def k_base(self, patches: int, num_cameras: int, camera_scale: tuple[float, ...] = ()) -> list[int]:
        """K_base per camera for cameras of ``patches`` patches."""
        scales = list(camera_scale) + [1.0] * max(0, num_cameras - len(camera_scale))
        return [budget_count(self.k_fraction * scales[c], patches) for c in range(num_cameras)]


def action_magnitudes(action: np.ndarray) -> tuple[float, float, float, float]:
    """(|dxyz|, |dxy|, dz, |drot|) of one action row."""
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    if a.size < 6:
        a = np.pad(a, (0, 6 - a.size))
    return (float(np.linalg.norm(a[0:3])), float(np.linalg.norm(a[0:2])), float(a[2]),
            float(np.linalg.norm(a[3:6])))


class ActionController:
    """Stateful coarse/fine mode switch; feed it the actions executed since the last inference step."""

    def __init__(self, config: Optional[ControllerConfig] = None) -> None:
        self.config = config or ControllerConfig()
        self.reset()

    def reset(self) -> None:
        self.mode: Mode = self.config.initial_mode
        self.actions_seen = 0

    def fine_entry(self, action: np.ndarray) -> bool:
        """Code rule: whether this action switches coarse -> fine."""
        c = self.config
        v, vxy, dz, vrot = action_magnitudes(action)
        return v < c.enter_speed or (vxy < c.enter_xy and dz < c.enter_z and vrot < c.enter_rot)

    def fine_exit(self, action: np.ndarray, queue_empty: bool) -> bool:
        """Code rule: whether this action switches fine -> coarse."""
        c = self.config
        _, _, dz, vrot = action_magnitudes(action)
        return dz > c.leave_z or (vrot > c.leave_rot and queue_empty)

    def paper_fine(self, action: np.ndarray) -> bool:
        c = self.config
        v, _, dz, vrot = action_magnitudes(action)
        return v < c.paper_speed and vrot < c.paper_rot and dz <= 0.0

    def update(self, actions: Optional[np.ndarray], queue_empty_at_end: bool = True) -> ControllerOutput:
        """Advance the mode over ``actions`` (k, action_dim), oldest first, and return the resulting mode.

        The queue counts as empty at the last action when ``queue_empty_at_end`` (the policy re-plans after the
        executed batch); earlier actions had others queued behind them.
        """
        start = self.mode
        replan = False
        arr = np.zeros((0, 7)) if actions is None else np.asarray(actions, dtype=np.float64)
        if arr.ndim == 1:
            arr = arr[None, :]
        speed = float(np.linalg.norm(arr[:, :3].sum(0))) if arr.shape[0] and arr.shape[1] >= 3 else 0.0
        if self.config.variant == 'paper':     # stateless: the newest action past the warm-up decides
            self.actions_seen += arr.shape[0]
            if arr.shape[0] and self.actions_seen > self.config.warmup_actions:
                self.mode = 'fine' if self.paper_fine(arr[-1]) else 'coarse'
            return ControllerOutput(mode=self.mode, k_fraction=self.config.k_fraction(self.mode), speed=speed,
                                    replan_requested=False, switched=self.mode != start)
        for i, action in enumerate(arr):
            self.actions_seen += 1
            if self.actions_seen <= self.config.warmup_actions:
                continue
            last = i == arr.shape[0] - 1
            if self.config.variant == 'code':
                if self.mode == 'fine':
                    if self.fine_exit(action, queue_empty=last and queue_empty_at_end):
                        self.mode = 'coarse'
                elif self.fine_entry(action):
                    self.mode = 'fine'
                    replan = replan or not last
            else:
                raise ValueError(f"unknown controller variant {self.config.variant!r} (use 'code' or 'paper')")
        return ControllerOutput(mode=self.mode, k_fraction=self.config.k_fraction(self.mode), speed=speed,
                                replan_requested=replan, switched=self.mode != start)
