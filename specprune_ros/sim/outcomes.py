"""How an episode ended: success, or which kind of failure, from the privileged state along the way.

A success rate says how often a policy fails, not why; pruning that drops the instruction's object from the
tokens shows up as ``wrong_object``, a shaky grasp as ``missed_grasp``. :class:`OutcomeTracker` follows the
state each control step (no rendering) and :meth:`OutcomeTracker.outcome` names the ending, first match wins:

* ``success``;
* ``wrong_object``: another object was held off the table, or moved more than ``MOVED_M`` while the target was
  never engaged (never held; for push: not moved);
* ``not_reached``: the target was never engaged and the tool centre never came within ``REACH_M`` of it (xy;
  ``PUSH_REACH_M`` for push, whose contact is from behind);
* ``missed_grasp`` (pick, place) / ``not_pushed`` (push): reached, but never held / never moved;
* ``dropped`` (pick): held, not held at the end; ``not_lifted`` (pick): held at the end, not high enough;
* ``not_released`` (place): still held at the end; ``misplaced``: place released off the plate, push moved the
  object but not into the zone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from specprune_ros.sim.expert import PUSH_CONTACT
from specprune_ros.sim.tasks import ON_TABLE_TOL, SimState, TaskSpec, is_held

MOVED_M = 0.03        # an object counts as moved when its centre left its start by more than this (xy)
REACH_M = 0.03        # the tool centre reached an object when it came this close to it (xy)
# a push touches the object from behind: the tool centre stops at the fingers' contact distance, so reaching it
# there counts with a margin over that
PUSH_REACH_M = PUSH_CONTACT + 0.01

OUTCOMES: tuple[str, ...] = ('success', 'wrong_object', 'not_reached', 'missed_grasp', 'not_pushed', 'dropped',
                             'not_lifted', 'not_released', 'misplaced')


def _xy_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(math.hypot(float(a[0] - b[0]), float(a[1] - b[1])))


@dataclass
class OutcomeTracker:
    """Accumulates what happened in one episode; create it on the state right after ``reset``."""

    task: TaskSpec
    start: dict[str, np.ndarray]                       # object name -> start centre
    closest_reach_m: float = math.inf                  # tool centre to target, xy
    target_held: bool = False
    other_held: set[str] = field(default_factory=set)

    @classmethod
    def begin(cls, task: TaskSpec, state: SimState) -> 'OutcomeTracker':
        tracker = cls(task=task, start={name: obj.pos.copy() for name, obj in state.objects.items()})
        tracker.update(state)
        return tracker

    def update(self, state: SimState) -> None:
        """Call after every control step."""
        target = self.task.target
        self.closest_reach_m = min(self.closest_reach_m, _xy_distance(state.tcp_pos, state.objects[target].pos))
        for name, obj in state.objects.items():
            if not is_held(state, name):
                continue
            if name == target:
                self.target_held = True
            elif obj.pos[2] - obj.half_height > ON_TABLE_TOL:   # lifted: closed fingers merely above it do not count
                self.other_held.add(name)

    def moved(self, state: SimState, name: str) -> bool:
        return _xy_distance(state.objects[name].pos, self.start[name]) > MOVED_M

    def outcome(self, final: SimState, success: bool) -> str:
        """The ending's name (one of ``OUTCOMES``)."""
        if success:
            return 'success'
        task, target = self.task, self.task.target
        engaged = self.target_held if task.family != 'push' else self.moved(final, target)
        others_moved = any(self.moved(final, name) for name in final.objects if name != target)
        if self.other_held or (others_moved and not engaged):
            return 'wrong_object'
        if not engaged:
            if self.closest_reach_m > (PUSH_REACH_M if task.family == 'push' else REACH_M):
                return 'not_reached'
            return 'not_pushed' if task.family == 'push' else 'missed_grasp'
        held_now = is_held(final, target)
        if task.family == 'pick':
            return 'not_lifted' if held_now else 'dropped'
        if task.family == 'place' and held_now:
            return 'not_released'
        return 'misplaced'


def count_outcomes(outcomes: list[str]) -> dict[str, int]:
    """Counts per outcome name, in ``OUTCOMES`` order, without the zeros."""
    return {name: outcomes.count(name) for name in OUTCOMES if name in outcomes}
