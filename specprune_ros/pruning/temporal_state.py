"""Per-episode, per-camera temporal token state shared by the pruning methods.

What it holds (all bounded by ``deque(maxlen=...)`` whatever the episode length):

* ``frames``: a ring of the most recent camera frames (one tuple of per-camera arrays per entry), for change
  detection against a speed-dependent reference frame (SpecPrune) or the previous frame (VLA-Cache);
* ``task_attention``: the previous step's task attention over the visual tokens, one dense vector per
  camera (SpecPrune's global set, VLA-Cache's task-relevance exclusion; SpecPrune stores the rows its ``task_rows``
  names here);
* ``action_attention``: a window (w = 3) of earlier steps' action-row attention over the visual tokens, one dense
  vector per camera per step, oldest first (VLA-Pruner's temporal action score);
* ``actions``: the most recently executed actions (controller input, speed estimate).

Resets (everything above is cleared) happen on :meth:`reset`, when the instruction changes
(:meth:`observe_instruction`), when the step index goes back (:meth:`observe_step_index`: a new episode) and after
a long input gap (:meth:`observe_gap` / :meth:`observe_time` with ``max_gap_s``). ``resets`` counts them and
``last_reset_reason`` says why the latest one happened.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch


@dataclass
class TemporalStateConfig:
    frame_history: int = 8          # frames held per camera (SpecPrune's reference is at most 6 back)
    attention_window: int = 3       # VLA-Pruner window w
    action_history: int = 64        # executed actions held
    max_gap_s: float = 2.0          # a longer gap between observations resets the state (<= 0: never)
    copy_frames: bool = True        # copy frames on push (callers may reuse their buffers)


class TemporalTokenState:
    """Bounded temporal memory of one episode; see the module docstring."""

    def __init__(self, config: Optional[TemporalStateConfig] = None) -> None:
        self.config = config or TemporalStateConfig()
        if self.config.frame_history < 1 or self.config.attention_window < 0 or self.config.action_history < 0:
            raise ValueError('frame_history must be >= 1, attention_window and action_history >= 0')
        self.frames: deque[tuple[np.ndarray, ...]] = deque(maxlen=self.config.frame_history)
        self.action_attention: deque[tuple[torch.Tensor, ...]] = deque(maxlen=max(self.config.attention_window, 1))
        self.actions: deque[np.ndarray] = deque(maxlen=max(self.config.action_history, 1))
        self.task_attention: Optional[tuple[torch.Tensor, ...]] = None
        self.instruction: Optional[str] = None
        self.last_time: Optional[float] = None
        self.last_step_index: Optional[int] = None
        self.steps = 0                      # completed steps since the last reset
        self.resets = 0
        self.last_reset_reason = ''

    # ----------------------------------------------------------------------------------------- resets

    def reset(self, reason: str = 'explicit') -> None:
        """Forget the episode (frames, attention history, actions, step count). Keeps the instruction/time marks."""
        self.frames.clear()
        self.action_attention.clear()
        self.actions.clear()
        self.task_attention = None
        self.steps = 0
        self.last_step_index = None
        self.resets += 1
        self.last_reset_reason = reason

    def observe_instruction(self, instruction: Optional[str]) -> bool:
        """Reset if the instruction differs from the previous one (not on the first one). True if reset."""
        if instruction is None:
            return False
        changed = self.instruction is not None and instruction != self.instruction
        self.instruction = instruction
        if changed:
            self.reset('instruction')
        return changed

    def observe_gap(self, seconds: float) -> bool:
        """Reset if ``seconds`` since the previous observation exceed ``max_gap_s``. True if reset."""
        if self.config.max_gap_s > 0 and seconds > self.config.max_gap_s:
            self.reset('gap')
            return True
        return False

    def observe_time(self, t: Optional[float]) -> bool:
        """Record an observation time (seconds, monotonic) and reset after a long gap or a clock jump back."""
        if t is None:
            return False
        prev, self.last_time = self.last_time, float(t)
        if prev is None:
            return False
        if t < prev:
            self.reset('time went back')
            return True
        return self.observe_gap(float(t) - prev)

    def observe_step_index(self, step_index: Optional[int]) -> bool:
        """A step index that does not move forward (0 again, or smaller) means a new episode. True if reset."""
        if step_index is None:
            return False
        prev, self.last_step_index = self.last_step_index, int(step_index)
        if (prev is not None and step_index <= prev) or (prev is None and step_index == 0 and self.steps > 0):
            self.reset('step index restarted')
            self.last_step_index = int(step_index)
            return True
        return False

    # ----------------------------------------------------------------------------------------- frames

    def push_frames(self, images: Optional[Sequence[np.ndarray]]) -> None:
        """Append one frame per camera (camera order)."""
        if images is None:
            return
        frames = tuple(np.array(img, copy=True) if self.config.copy_frames else np.asarray(img) for img in images)
        if self.frames and len(self.frames[-1]) != len(frames):
            self.frames.clear()                       # camera set changed: old frames are not comparable
        self.frames.append(frames)

    def frame(self, camera: int, back: int = 0) -> Optional[np.ndarray]:
        """The frame ``back`` entries before the newest (0 = newest); the oldest held if fewer are held."""
        if not self.frames:
            return None
        back = min(max(int(back), 0), len(self.frames) - 1)
        entry = self.frames[-1 - back]
        return entry[camera] if camera < len(entry) else None

    def frame_entry(self, back: int = 0) -> Optional[tuple[np.ndarray, ...]]:
        """Every camera's frame ``back`` entries before the newest (clamped as :meth:`frame`); None if none."""
        if not self.frames:
            return None
        return self.frames[-1 - min(max(int(back), 0), len(self.frames) - 1)]

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    # -------------------------------------------------------------------------------------- attention

    def set_task_attention(self, per_camera: Optional[Sequence[torch.Tensor]]) -> None:
        self.task_attention = None if per_camera is None else tuple(t.detach().clone() for t in per_camera)

    def push_action_attention(self, per_camera: Sequence[torch.Tensor]) -> None:
        if self.config.attention_window > 0:
            self.action_attention.append(tuple(t.detach().clone() for t in per_camera))

    def action_attention_window(self, camera: int) -> list[torch.Tensor]:
        """Earlier steps' action attention of one camera, oldest first (at most ``attention_window``)."""
        if self.config.attention_window <= 0:
            return []
        return [entry[camera] for entry in self.action_attention]

    @property
    def window_full(self) -> bool:
        return self.config.attention_window > 0 and len(self.action_attention) >= self.config.attention_window

    # ---------------------------------------------------------------------------------------- actions

    def push_actions(self, actions: Optional[np.ndarray]) -> None:
        if actions is None or self.config.action_history <= 0:
            return
        arr = np.asarray(actions, dtype=np.float64)
        if arr.ndim == 1:
            arr = arr[None, :]
        for row in arr:
            self.actions.append(row.copy())

    def recent_actions(self, n: Optional[int] = None) -> np.ndarray:
        rows = list(self.actions)
        if n is not None:
            rows = rows[-n:] if n > 0 else []
        return np.stack(rows) if rows else np.zeros((0, 7))

    # ------------------------------------------------------------------------------------------- steps

    def finish_step(self) -> None:
        self.steps += 1
