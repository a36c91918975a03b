"""``ScriptedExpert``: a waypoint state machine on privileged sim state that solves every task family.

With ``noise > 0`` it adds Gaussian noise to its translation / yaw actions and sometimes takes a detour
through a perturbed waypoint before the real one, so demonstrations contain corrections; the gripper
command is never perturbed. Phases re-check the sim state every step, so a dropped or displaced object
sends the expert back to an earlier phase (recovery) instead of failing blindly.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from specprune_ros.sim import scene
from specprune_ros.sim.env import (ACTION_DIM, ROTATION_SCALE_RAD, TRANSLATION_SCALE_M, WORKSPACE_HIGH,
                                   WORKSPACE_LOW, YAW_LIMIT, TabletopEnv)
from specprune_ros.sim.tasks import SimState, is_held

SAFE_Z = 0.12            # tcp height for moving over objects
LIFT_Z = 0.14            # pick: hold the object here
CARRY_Z = 0.14           # place: carry height
GRASP_Z = 0.022          # tcp height when closing on an object resting on the table
PUSH_HIGH_Z = 0.08       # push: move to the start point at this height ...
PUSH_Z = 0.025           # ... then push with the fingertips this low
PUSH_CONTACT = scene.OBJECT_HALF + 2 * scene.FINGER_HALF[1]   # tcp-to-object-centre distance in contact
PUSH_BACKOFF = 0.075     # start this far behind the object
CLOSE_STEPS = 4
RELEASE_STEPS = 3
OPEN, CLOSE = -1.0, 1.0


def wrap_angle(a: float) -> float:
    return float((a + np.pi) % (2 * np.pi) - np.pi)


def _nearest_equivalent(angle: float, period: float, current: float) -> float:
    """The angle + k * period inside the yaw limits that is closest to `current`."""
    best, best_err = angle, np.inf
    for k in range(-4, 5):
        cand = angle + k * period
        if abs(cand) <= YAW_LIMIT + 1e-9 and abs(cand - current) < best_err:
            best, best_err = cand, abs(cand - current)
    return best


class ScriptedExpert:
    """Privileged expert for ``TabletopEnv``; call ``act(obs)`` once per step."""

    def __init__(self, env: TabletopEnv, noise: float = 0.0,
                 rng: Optional[np.random.Generator] = None) -> None:
        self.env = env
        self.noise = float(noise)
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self._episode = None
        self.reset()

    def reset(self) -> None:
        self.phase = 'approach'
        self.counter = 0
        self._detour: Optional[np.ndarray] = None
        self._detour_phase: Optional[str] = None
        self._episode = self.env.episode_index

    def take_over(self) -> None:
        """Start from whatever state the env is in now (e.g. after a learned policy drove it).

        A held target is kept (pick: lift it, place: carry it) instead of being let go by a fresh approach.
        """
        self.reset()
        st = self.env.sim_state()
        target = self.env.task.target
        if self.env.family in ('pick', 'place') and is_held(st, target):
            self._lift_xy = st.tcp_pos[:2].copy()
            self._set_phase('lift' if self.env.family == 'pick' or st.tcp_pos[2] < 0.07 else 'carry')

    # --- helpers -------------------------------------------------------------------------------------
    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        self.counter = 0

    def _grasp_yaw(self, name: str, current: float) -> float:
        _, obj_yaw = self.env.object_pose(name)
        if name.endswith('cube'):
            return _nearest_equivalent(wrap_angle(obj_yaw), np.pi / 2, current)
        return float(np.clip(current, -YAW_LIMIT, YAW_LIMIT))

    def _maybe_detour(self, goal: np.ndarray) -> np.ndarray:
        """Sometimes (noise > 0) go through a perturbed waypoint before `goal` (once per phase)."""
        if self.noise <= 0:
            return goal
        if self._detour_phase != self.phase:
            self._detour_phase = self.phase
            self._detour = None
            if self.rng.random() < min(0.5, 2.0 * self.noise):
                off = np.array([*self.rng.uniform(-0.05, 0.05, size=2), self.rng.uniform(0.0, 0.04)])
                self._detour = np.clip(goal + off, WORKSPACE_LOW + 0.01, WORKSPACE_HIGH - 0.01)
        if self._detour is not None:
            if np.linalg.norm(self._detour - self.env.tcp_pos()) < 0.015:
                self._detour = None
            else:
                return self._detour
        return goal

    def _servo(self, goal: np.ndarray, goal_yaw: float, grip: float, speed: float = 1.0) -> np.ndarray:
        tcp, yaw = self.env.tcp_pos(), self.env.hand_yaw()
        v = (np.asarray(goal) - tcp) / TRANSLATION_SCALE_M
        n = float(np.max(np.abs(v)))
        if n > speed:
            v *= speed / n
        a = np.zeros(ACTION_DIM)
        a[:3] = v
        a[5] = np.clip((goal_yaw - yaw) / ROTATION_SCALE_RAD, -1.0, 1.0)
        a[6] = grip
        return a

    # --- families ------------------------------------------------------------------------------------
    def _pick_phases(self, st: SimState, name: str) -> Optional[np.ndarray]:
        """Approach, descend, close, lift. Returns an action, or None once the object is lifted."""
        tcp, yaw = st.tcp_pos, self.env.hand_yaw()
        obj = st.objects[name].pos
        gyaw = self._grasp_yaw(name, yaw)
        if self.phase == 'approach':
            goal = np.array([obj[0], obj[1], SAFE_Z])
            xy_err = np.hypot(*(tcp[:2] - obj[:2]))
            if xy_err < 0.008 and abs(gyaw - yaw) < 0.06 and self._detour is None and self.counter > 0:
                self._set_phase('descend')
            else:
                self.counter += 1
                return self._servo(self._maybe_detour(goal), gyaw, OPEN)
        if self.phase == 'descend':
            goal = np.array([obj[0], obj[1], max(GRASP_Z, obj[2] + 0.002)])
            if np.hypot(*(tcp[:2] - obj[:2])) > 0.02:
                self._set_phase('approach')
                return self._servo(np.array([obj[0], obj[1], SAFE_Z]), gyaw, OPEN)
            if abs(tcp[2] - goal[2]) < 0.004 and np.hypot(*(tcp[:2] - obj[:2])) < 0.006:
                self._set_phase('close')
            else:
                speed = 1.0 if tcp[2] - goal[2] > 0.04 else 0.5
                return self._servo(goal, gyaw, OPEN, speed)
        if self.phase == 'close':
            self.counter += 1
            if self.counter > CLOSE_STEPS:
                self._set_phase('lift')
                self._lift_xy = tcp[:2].copy()
            else:
                return self._servo(tcp, yaw, CLOSE)
        if self.phase == 'lift':
            if not is_held(st, name) and tcp[2] > obj[2] + 0.03:
                self._set_phase('approach')                         # lost it: start over
                return self._servo(np.array([tcp[0], tcp[1], SAFE_Z]), yaw, OPEN)
            return None
        return None

    def _act_pick(self, st: SimState) -> np.ndarray:
        a = self._pick_phases(st, self.env.task.target)
        if a is None:
            goal = np.array([*self._lift_xy, LIFT_Z])
            a = self._servo(goal, self.env.hand_yaw(), CLOSE)
        return a

    def _act_place(self, st: SimState) -> np.ndarray:
        name = self.env.task.target
        tcp, yaw = st.tcp_pos, self.env.hand_yaw()
        plate = st.plates[self.env.task.plate]
        if self.phase in ('approach', 'descend', 'close', 'lift'):
            a = self._pick_phases(st, name)
            if a is not None:
                return a
            if tcp[2] < 0.07:                                      # lift straight up first
                return self._servo(np.array([*self._lift_xy, CARRY_Z]), yaw, CLOSE)
            self._set_phase('carry')
        obj = st.objects[name].pos
        offset = obj[:2] - tcp[:2]                                 # where the object sits in the hand
        if self.phase in ('carry', 'lower') and not is_held(st, name):
            self._set_phase('approach')                            # dropped: pick it up again
            return self._servo(np.array([tcp[0], tcp[1], SAFE_Z]), yaw, OPEN)
        if self.phase == 'carry':
            goal = np.array([*(plate.pos[:2] - offset), CARRY_Z])
            if np.hypot(*(goal[:2] - tcp[:2])) < 0.006 and self._detour is None and self.counter > 0:
                self._set_phase('lower')
            else:
                self.counter += 1
                return self._servo(self._maybe_detour(goal), yaw, CLOSE)
        if self.phase == 'lower':
            # bring the object's bottom 1 cm above the plate top
            goal = np.array([*(plate.pos[:2] - offset), plate.top + scene.OBJECT_HALF + 0.01 - (obj[2] - tcp[2])])
            if abs(goal[2] - tcp[2]) < 0.004:
                self._set_phase('release')
            else:
                speed = 1.0 if tcp[2] - goal[2] > 0.04 else 0.5
                return self._servo(goal, yaw, CLOSE, speed)
        if self.phase == 'release':
            self.counter += 1
            if self.counter > RELEASE_STEPS:
                self._set_phase('retreat')
            else:
                return self._servo(tcp, yaw, OPEN)
        return self._servo(np.array([tcp[0], tcp[1], CARRY_Z]), yaw, OPEN, 0.5)

    def _act_push(self, st: SimState) -> np.ndarray:
        tcp, yaw = st.tcp_pos, self.env.hand_yaw()
        obj = st.objects[self.env.task.target].pos
        goal = st.zones[self.env.task.zone].centre
        to_goal = goal - obj[:2]
        d = to_goal / max(np.linalg.norm(to_goal), 1e-6)
        # hand y axis (the finger axis) along the push direction: (-sin yaw, cos yaw) = +-d
        pyaw = _nearest_equivalent(wrap_angle(np.arctan2(-d[0], d[1])), np.pi, yaw)
        rel = tcp[:2] - obj[:2]
        behind = -float(np.dot(rel, d))                            # > 0 when the tcp is behind the object
        lateral = float(rel[0] * -d[1] + rel[1] * d[0])
        start = obj[:2] - PUSH_BACKOFF * d
        if self.phase == 'approach':
            g = np.array([*start, PUSH_HIGH_Z])
            if np.hypot(*(tcp[:2] - start)) < 0.01 and abs(pyaw - yaw) < 0.08 and self._detour is None \
                    and self.counter > 0:
                self._set_phase('descend')
            else:
                self.counter += 1
                return self._servo(self._maybe_detour(g), pyaw, CLOSE)
        if self.phase == 'descend':
            if np.hypot(*(tcp[:2] - start)) > 0.03:
                self._set_phase('approach')
                return self._servo(np.array([*start, PUSH_HIGH_Z]), pyaw, CLOSE)
            g = np.array([*start, PUSH_Z])
            if abs(tcp[2] - PUSH_Z) < 0.005:
                self._set_phase('push')
            else:
                return self._servo(g, pyaw, CLOSE)
        if self.phase == 'push':
            if abs(lateral) > 0.02 or behind < PUSH_CONTACT - 0.012:
                self._set_phase('backoff')
            else:
                g = np.array([*(obj[:2] - (PUSH_CONTACT - 0.015) * d), PUSH_Z])
                return self._servo(g, pyaw, CLOSE, 0.5)
        # backoff: retreat behind the object, then approach again
        if tcp[2] < PUSH_HIGH_Z - 0.01:
            away = tcp[:2] - 0.02 * d
            return self._servo(np.array([*away, PUSH_HIGH_Z]), yaw, CLOSE)
        self._set_phase('approach')
        return self._servo(np.array([*start, PUSH_HIGH_Z]), pyaw, CLOSE)

    # --- public --------------------------------------------------------------------------------------
    def act(self, obs=None) -> np.ndarray:
        """Next action (7,) float32 for the env's current state (`obs` is accepted but not needed)."""
        if self._episode != self.env.episode_index:
            self.reset()
        st = self.env.sim_state()
        family = self.env.family
        if family == 'pick':
            a = self._act_pick(st)
        elif family == 'place':
            a = self._act_place(st)
        else:
            a = self._act_push(st)
        if self.noise > 0:
            scale = np.full(4, self.noise)
            if family == 'push' and self.phase == 'push':
                scale[2] *= 0.3                 # a push from too high tips cylinders over
            a[[0, 1, 2, 5]] += self.rng.normal(0.0, 1.0, size=4) * scale
        return np.clip(a, -1.0, 1.0).astype(np.float32)


def run_expert_episode(env: TabletopEnv, expert: ScriptedExpert, render: bool = False,
                       seed: Optional[int] = None, family: Optional[str] = None):
    """Reset `env` and roll the expert out; returns (observations, actions, success).

    ``observations[t]`` is what the expert saw before ``actions[t]``; the final observation is dropped.
    """
    obs = env.reset(seed=seed, family=family, render=render)
    expert.reset()
    return continue_expert_episode(env, expert, obs, render)


def continue_expert_episode(env: TabletopEnv, expert: ScriptedExpert, obs, render: bool = False):
    """Roll the expert out from the env's current state (``obs``: its latest observation) to the episode's end.

    Returns (observations, actions, success) like ``run_expert_episode``.
    """
    observations, actions = [], []
    success = env.success()
    done = success
    while not done:
        a = expert.act(obs)
        observations.append(obs)
        actions.append(a)
        obs, done, success = env.step(a, render=render)
    return observations, np.asarray(actions, dtype=np.float32).reshape(-1, ACTION_DIM), success
