"""Latest frame per camera plus instruction and robot state, and the rules that call them fresh or stale.

Ages and skew are judged by the frames' own ``header.stamp`` against the node clock, so a slow or delayed
transport cannot pass old pictures off as new ones. Stamps further ahead of the node clock than
``max_future_stamp_s`` are refused at the door (``RejectedInput``), so are camera frames already stale on arrival
or stamped well before the stored one, and every input is also aged by its arrival time on a steady clock, so no
stamp, however far ahead, can keep old data fresh. Every stale verdict comes with a reason that goes to diagnostics
verbatim.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np


class StaleInput(RuntimeError):
    """No observation can be formed now; the message is the reason shown in diagnostics."""


class RejectedInput(ValueError):
    """An input that must not be stored; ``kind`` names its diagnostics counter."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Frame:
    """One stored camera frame, already decoded and resized for the policy."""

    image: np.ndarray          # (H, W, 3) uint8 RGB
    stamp: float               # header.stamp, seconds
    received: float            # node clock when stored, seconds
    arrived: float             # steady clock when stored, seconds (bounds the age whatever the stamp says)
    sequence: int              # global arrival number (all cameras)
    used: bool = False         # went into an observation


@dataclass
class Snapshot:
    """Inputs of one inference."""

    images: dict[str, np.ndarray]
    instruction: str
    proprio: Optional[np.ndarray]
    newest_stamp: float        # the newest camera stamp (put into the chunk message header)
    oldest_stamp: float


@dataclass
class SyncLimits:
    """Freshness rules (seconds)."""

    max_image_age_s: float = 0.5
    max_camera_skew_s: float = 0.1
    max_future_stamp_s: float = 0.1
    max_state_age_s: float = 0.5


class InputSynchronizer:
    """Keeps the newest input of each kind; not thread-safe on its own (the controller holds the lock)."""

    def __init__(self, camera_names: tuple[str, ...], limits: SyncLimits, needs_proprio: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.camera_names = tuple(camera_names)
        self.limits = limits
        self.needs_proprio = needs_proprio
        self.clock = clock               # steady clock for arrival ages (monotonic; sim time under use_sim_time)
        self.frames: dict[str, Frame] = {}
        self.instruction: str = ''
        self.proprio: Optional[np.ndarray] = None
        self.proprio_stamp: float = 0.0
        self.proprio_arrived: float = 0.0
        self.frames_received = 0
        self.frames_dropped = 0          # overwritten before any inference used them
        self._sequence = 0

    def check_stamp(self, what: str, stamp: float, now: float, kind: str) -> None:
        """Raise ``RejectedInput`` when ``stamp`` lies further ahead of ``now`` than ``max_future_stamp_s``."""
        ahead = stamp - now
        if ahead > self.limits.max_future_stamp_s:
            raise RejectedInput(kind, f'{what} stamp is {ahead:.3f} s ahead of the node clock (clock mismatch? '
                                      f'max_future_stamp_s {self.limits.max_future_stamp_s})')

    def in_order(self, what: str, stamp: float, received: float, previous: Optional[tuple[float, float]],
                 max_age: tuple[str, float], tolerance: tuple[str, float], kind: str) -> bool:
        """Whether a message stamped ``stamp``, received at ``received`` (node clock), follows the stored one.

        ``previous``: the stored message's (stamp, received), or None. Raises ``RejectedInput`` (``<kind>_stale_stamp``)
        when it is already older than ``max_age`` (name, seconds) on arrival, or (``<kind>_stamp_backwards``) when its
        stamp goes back from the stored one by more than ``tolerance`` (name, seconds). False (ignore it, nothing to
        count) when it goes back less, or right after the node clock itself went back (the controller starts over
        at its next tick); True when it is the newer one.
        """
        age = received - stamp
        if age > max_age[1]:
            raise RejectedInput(f'{kind}_stale_stamp', f'{what} stamp is {age:.3f} s old on arrival (late delivery '
                                f'or its clock behind? {max_age[0]} {max_age[1]})')
        if previous is None or stamp >= previous[0]:
            return True
        back = previous[0] - stamp
        clock_went_back = received < previous[1] - self.limits.max_future_stamp_s
        if back > tolerance[1] and not clock_went_back:
            raise RejectedInput(f'{kind}_stamp_backwards', f'{what} stamp went back by {back:.3f} s (from '
                                f'{previous[0]:.3f} to {stamp:.3f}; {tolerance[0]} {tolerance[1]})')
        return False

    def put_frame(self, camera: str, image: np.ndarray, stamp: float, received: float) -> None:
        """Store the newest frame of ``camera``.

        A stamp too far in the future, one already older than ``max_image_age_s`` on arrival, or one going back
        from the stored frame's by more than ``max_camera_skew_s`` raises ``RejectedInput`` and stores nothing.
        A frame only slightly older than the stored one is ignored, and so is any older frame right after the node
        clock went back (the controller starts over at its next tick).
        """
        limits = self.limits
        what = f'camera {camera!r} frame'
        self.check_stamp(what, stamp, received, 'image_future_stamp')
        previous = self.frames.get(camera)
        # out-of-order delivery within the skew the cameras may have among each other is transport jitter
        if not self.in_order(what, stamp, received, None if previous is None else (previous.stamp, previous.received),
                             ('max_image_age_s', limits.max_image_age_s),
                             ('max_camera_skew_s', limits.max_camera_skew_s), 'image'):
            self.frames_dropped += 1
            return
        if previous is not None and not previous.used:
            self.frames_dropped += 1
        self._sequence += 1
        self.frames_received += 1
        self.frames[camera] = Frame(image=image, stamp=stamp, received=received, arrived=self.clock(),
                                    sequence=self._sequence)

    def put_instruction(self, text: str) -> bool:
        """Store the instruction; True when it differs from the previous one."""
        changed = bool(self.instruction) and text != self.instruction
        self.instruction = text
        return changed

    def put_proprio(self, vector: np.ndarray, stamp: float, arrived: Optional[float] = None) -> None:
        """Store the robot state; ``arrived`` (steady clock) is when its oldest part came (default: now)."""
        self.proprio = np.asarray(vector, dtype=np.float32)
        self.proprio_stamp = stamp
        self.proprio_arrived = self.clock() if arrived is None else arrived

    def has_new_frames(self) -> bool:
        """True when every camera delivered a frame since the last observation (a complete new set)."""
        frames = [self.frames.get(name) for name in self.camera_names]
        return all(f is not None and not f.used for f in frames)

    def staleness(self, now: float) -> str:
        """Why no observation can be formed now ('' when inputs are fresh)."""
        limits = self.limits
        steady = self.clock()
        stamps = []
        for name in self.camera_names:
            frame = self.frames.get(name)
            if frame is None:
                return f'no frame yet from camera {name!r}'
            silent = steady - frame.arrived
            if silent > limits.max_image_age_s:
                return (f'camera {name!r} stale: no new frame for {silent:.3f} s '
                        f'(max_image_age_s {limits.max_image_age_s})')
            age = now - frame.stamp
            if age > limits.max_image_age_s:
                return (f'camera {name!r} stale: newest frame is {age:.3f} s old '
                        f'(max_image_age_s {limits.max_image_age_s})')
            if -age > limits.max_future_stamp_s:
                return (f'camera {name!r} stamp is {-age:.3f} s in the future (clock mismatch? '
                        f'max_future_stamp_s {limits.max_future_stamp_s})')
            stamps.append(frame.stamp)
        skew = max(stamps) - min(stamps) if stamps else 0.0
        if skew > limits.max_camera_skew_s:
            return f'cameras out of sync: stamps {skew:.3f} s apart (max_camera_skew_s {limits.max_camera_skew_s})'
        if not self.instruction:
            return 'no instruction yet'
        if self.needs_proprio:
            if self.proprio is None:
                return 'no robot state yet (the policy needs its proprio input: see proprio_source)'
            age = max(now - self.proprio_stamp, steady - self.proprio_arrived)
            if age > limits.max_state_age_s:
                return f'robot state stale: {age:.3f} s old (max_state_age_s {limits.max_state_age_s})'
        return ''

    def snapshot(self, now: float) -> Snapshot:
        """The current observation (marks the frames used); raises ``StaleInput`` with the reason."""
        reason = self.staleness(now)
        if reason:
            raise StaleInput(reason)
        frames = [self.frames[name] for name in self.camera_names]
        for frame in frames:
            frame.used = True
        stamps = [f.stamp for f in frames]
        return Snapshot(images={name: f.image for name, f in zip(self.camera_names, frames)},
                        instruction=self.instruction,
                        proprio=None if self.proprio is None else self.proprio.copy(),
                        newest_stamp=max(stamps), oldest_stamp=min(stamps))

    def clear(self, keep_instruction: bool = False) -> None:
        """Forget every stored input (the latched instruction too unless ``keep_instruction``)."""
        self.frames.clear()
        if not keep_instruction:
            self.instruction = ''
        self.proprio = None
        self.proprio_stamp = 0.0
        self.proprio_arrived = 0.0
