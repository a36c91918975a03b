"""Task families: per-seed randomised layouts, instructions and success detectors.

A task is a ``TaskSpec`` (what to do, in words and in sim names) plus a ``Layout`` (where everything starts).
Success detectors are pure functions of a ``SimState`` snapshot, so tests can build states by hand.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from specprune_ros.sim import scene
from specprune_ros.sim.vocab import (COLOURS, SHAPES, ZONE_SIDES, object_name, pick_instruction,
                                     place_instruction, push_instruction)

TASK_FAMILIES: tuple[str, ...] = ('pick', 'place', 'push')
MAX_STEPS: dict[str, int] = {'pick': 120, 'place': 200, 'push': 160}

# Training and evaluation episodes draw their seeds from disjoint ranges.
TRAIN_SEED_START = 0
EVAL_SEED_START = 1_000_000

# Success thresholds (metres, m/s).
LIFT_HEIGHT = 0.05          # pick: object bottom at least this far above the table ...
HOLD_XY_TOL = 0.03          # ... while its centre stays between the fingers
HOLD_Z_TOL = 0.04
REST_SPEED = 0.05           # place: the object must be (nearly) at rest on the plate ...
PLATE_Z_TOL = 0.01          # ... with its bottom on the plate top
RELEASE_MARGIN = 0.008      # ... and released (finger gap wider than the object + this)
ON_TABLE_TOL = 0.01         # push: object bottom at most this far above the table

_FAMILY_INDEX = {f: i for i, f in enumerate(TASK_FAMILIES)}


@dataclass(frozen=True)
class TaskSpec:
    """What an episode asks for."""

    family: str
    seed: int
    instruction: str
    target: str                         # object body name, e.g. 'red_cube'
    plate: Optional[str] = None         # place: plate colour
    zone: Optional[str] = None          # push: 'left' | 'right'
    max_steps: int = 120


@dataclass(frozen=True)
class Layout:
    """Initial placement.

    Object name -> (x, y, yaw); plate colour -> (x, y); zone side -> (x, y); the hand's starting (x, y, z, yaw) (its
    origin, above the tcp).
    """

    objects: dict[str, tuple[float, float, float]]
    plates: dict[str, tuple[float, float]] = field(default_factory=dict)
    zones: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(scene.ZONE_CENTRES))
    hand: tuple[float, float, float, float] = (*scene.HAND_START, 0.0)


def sample_hand_start(family: str, seed: int) -> tuple[float, float, float, float]:
    """A varied starting pose around ``scene.HAND_START`` (own random stream: object layouts do not change).

    Demonstrations that all start from one pose let a policy read the target off its own position along the
    way there instead of looking; varied starts (as a robot gets them) remove that shortcut.
    """
    rng = task_rng(family, seed, HAND_STREAM)
    x, y, z = scene.HAND_START
    return (float(x + rng.uniform(-0.10, 0.06)), float(y + rng.uniform(-0.12, 0.12)),
            float(z + rng.uniform(-0.07, 0.0)), float(rng.uniform(-0.6, 0.6)))


@dataclass
class ObjectState:
    pos: np.ndarray                     # (3,) centre, world frame
    linvel: np.ndarray = field(default_factory=lambda: np.zeros(3))
    half_height: float = scene.OBJECT_HALF
    half_width: float = scene.OBJECT_HALF


@dataclass
class PlateState:
    pos: np.ndarray                     # (3,) centre of the plate
    radius: float = scene.PLATE_RADIUS
    top: float = scene.PLATE_TOP        # z of the plate's top surface


@dataclass
class ZoneState:
    centre: np.ndarray                  # (2,) x, y
    half_size: np.ndarray = field(default_factory=lambda: np.asarray(scene.ZONE_HALF, dtype=float))


@dataclass
class SimState:
    """The privileged state the success detectors (and the scripted expert) look at."""

    objects: dict[str, ObjectState]
    tcp_pos: np.ndarray                 # (3,)
    finger_gap: float                   # distance between the finger inner faces, metres
    plates: dict[str, PlateState] = field(default_factory=dict)
    zones: dict[str, ZoneState] = field(default_factory=dict)


# --- success detectors ------------------------------------------------------------------------------
def is_held(state: SimState, name: str) -> bool:
    """The object sits between closed fingers (centre near the tcp, fingers closed on it)."""
    obj = state.objects[name]
    d = obj.pos - state.tcp_pos
    return bool(np.hypot(d[0], d[1]) <= HOLD_XY_TOL and abs(d[2]) <= HOLD_Z_TOL
                and state.finger_gap <= 2 * obj.half_width + RELEASE_MARGIN)


def pick_success(state: SimState, task: TaskSpec) -> bool:
    obj = state.objects[task.target]
    return bool(obj.pos[2] - obj.half_height >= LIFT_HEIGHT and is_held(state, task.target))


def place_success(state: SimState, task: TaskSpec) -> bool:
    obj = state.objects[task.target]
    plate = state.plates[task.plate]
    dxy = np.hypot(*(obj.pos[:2] - plate.pos[:2]))
    bottom = obj.pos[2] - obj.half_height
    released = state.finger_gap > 2 * obj.half_width + RELEASE_MARGIN or not is_held(state, task.target)
    return bool(dxy <= plate.radius and abs(bottom - plate.top) <= PLATE_Z_TOL
                and np.linalg.norm(obj.linvel) <= REST_SPEED and released)


def push_success(state: SimState, task: TaskSpec) -> bool:
    obj = state.objects[task.target]
    zone = state.zones[task.zone]
    inside = np.all(np.abs(obj.pos[:2] - zone.centre) <= zone.half_size)
    return bool(inside and obj.pos[2] - obj.half_height <= ON_TABLE_TOL)


SUCCESS_FNS: dict[str, Callable[[SimState, TaskSpec], bool]] = {
    'pick': pick_success, 'place': place_success, 'push': push_success}


def check_success(state: SimState, task: TaskSpec) -> bool:
    return SUCCESS_FNS[task.family](state, task)


# --- sampling ---------------------------------------------------------------------------------------
LAYOUT_STREAM, HAND_STREAM = 0x5EED, 0x4A4D


def task_rng(family: str, seed: int, stream: int = LAYOUT_STREAM) -> np.random.Generator:
    """Independent random stream per (family, seed) and purpose (``stream``)."""
    return np.random.default_rng([int(seed), _FAMILY_INDEX[family], stream])


def _sample_points(rng: np.random.Generator, n: int, lo: tuple[float, float], hi: tuple[float, float],
                   avoid: list[tuple[np.ndarray, float]], min_sep: float,
                   ok: Optional[Callable[[np.ndarray], bool]] = None) -> list[np.ndarray]:
    """Rejection-sample n points in a box, min_sep apart and clear of `avoid` (point, radius) discs."""
    pts: list[np.ndarray] = []
    for _ in range(5000):
        if len(pts) == n:
            return pts
        p = rng.uniform(lo, hi)
        if any(np.linalg.norm(p - q) < r for q, r in avoid):
            continue
        if any(np.linalg.norm(p - q) < min_sep for q in pts):
            continue
        if ok is not None and not ok(p):
            continue
        pts.append(p)
    raise RuntimeError('could not sample a layout')


def _choose_objects(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    idx = rng.choice(len(combos), size=n, replace=False)
    return [combos[i] for i in idx]


def _seg_dist(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = float(np.clip(np.dot(p - a, ab) / max(np.dot(ab, ab), 1e-12), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def sample_task(family: str, seed: int) -> tuple[TaskSpec, Layout]:
    """Deterministic task and initial layout for (family, seed)."""
    if family not in _FAMILY_INDEX:
        raise ValueError(f'unknown task family {family!r}; expected one of {TASK_FAMILIES}')
    rng = task_rng(family, seed)
    lo, hi = (-0.12, -0.16), (0.16, 0.16)
    if family == 'pick':
        chosen = _choose_objects(rng, 4)
        pts = _sample_points(rng, 4, lo, hi, [], 0.10)
        target = chosen[0]
        spec = TaskSpec('pick', seed, pick_instruction(*target), object_name(*target),
                        max_steps=MAX_STEPS['pick'])
        plates: dict[str, tuple[float, float]] = {}
    elif family == 'place':
        chosen = _choose_objects(rng, 3)
        plate_colours = [COLOURS[i] for i in rng.choice(len(COLOURS), size=2, replace=False)]
        plate_pts = _sample_points(rng, 2, lo, hi, [], 0.16)
        avoid = [(q, 0.105) for q in plate_pts]
        pts = _sample_points(rng, 3, lo, hi, avoid, 0.10)
        target = chosen[0]
        spec = TaskSpec('place', seed, place_instruction(*target, plate_colours[0]), object_name(*target),
                        plate=plate_colours[0], max_steps=MAX_STEPS['place'])
        plates = {c: (float(p[0]), float(p[1])) for c, p in zip(plate_colours, plate_pts)}
    else:
        chosen = _choose_objects(rng, 3)
        side = ZONE_SIDES[int(rng.integers(len(ZONE_SIDES)))]
        goal = np.asarray(scene.ZONE_CENTRES[side])
        p0 = _sample_points(rng, 1, (-0.04, -0.08), (0.12, 0.08), [], 0.0)[0]
        d = (goal - p0) / np.linalg.norm(goal - p0)
        start = p0 - 0.09 * d                      # where the gripper comes down behind the object

        def clear_of_path(p: np.ndarray) -> bool:
            return _seg_dist(p, start, goal) >= 0.085

        others = _sample_points(rng, 2, (-0.12, -0.17), (0.16, 0.17), [(p0, 0.10)], 0.10, clear_of_path)
        pts = [p0] + others
        target = chosen[0]
        spec = TaskSpec('push', seed, push_instruction(*target, side), object_name(*target), zone=side,
                        max_steps=MAX_STEPS['push'])
        plates = {}
    yaws = rng.uniform(-np.pi, np.pi, size=len(chosen))
    objects = {object_name(*cs): (float(p[0]), float(p[1]), float(y)) for cs, p, y in zip(chosen, pts, yaws)}
    return spec, Layout(objects=objects, plates=plates, hand=sample_hand_start(family, seed))
