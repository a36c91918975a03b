"""``TabletopEnv``: the simulated tabletop with a 7-D end-effector-delta action interface.

Actions (same convention as ``specprune_ros.policy.interface``), one per 0.1 s control step:
    (dx, dy, dz, droll, dpitch, dyaw, gripper) in [-1, 1]
translation 0.02 m and rotation 0.2 rad per step at |a| = 1, base (world) frame; gripper -1 = open,
+1 = close (intermediate values give intermediate finger targets). Roll and pitch are accepted but ignored:
the gripper always points straight down. Inputs are clipped to [-1, 1]; NaN / inf raise ``ValueError``.

Proprio (``PROPRIO_DIM`` = 6, float32): ``PROPRIO_LAYOUT`` =
    (tcp_x, tcp_y, tcp_z [m, base frame], sin(yaw), cos(yaw), finger_gap [m, 0..0.08]).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import cv2
import numpy as np

# MuJoCo picks its rendering backend when it is first imported: headless EGL unless the user chose one.
os.environ.setdefault('MUJOCO_GL', 'egl')
import mujoco  # noqa: E402 (needs MUJOCO_GL set above)

from specprune_ros.sim import scene  # noqa: E402 (after mujoco, see above)
from specprune_ros.sim.tasks import (TASK_FAMILIES, Layout, ObjectState, PlateState, SimState, TaskSpec,  # noqa: E402
                                     ZoneState, check_success, sample_task)
from specprune_ros.sim.vocab import COLOURS, SHAPES, ZONE_SIDES, object_name  # noqa: E402

CAMERA_NAMES: tuple[str, ...] = ('agentview', 'wrist')
ACTION_DIM = 7
TRANSLATION_SCALE_M = 0.02
ROTATION_SCALE_RAD = 0.2
CONTROL_PERIOD_S = 0.1
PROPRIO_LAYOUT: tuple[str, ...] = ('tcp_x', 'tcp_y', 'tcp_z', 'sin_yaw', 'cos_yaw', 'finger_gap')
PROPRIO_DIM = len(PROPRIO_LAYOUT)

# Limits of the commanded tcp (metres, base frame) and yaw (radians; the gripper is symmetric under pi).
WORKSPACE_LOW = np.array([-0.25, -0.28, 0.02])
WORKSPACE_HIGH = np.array([0.25, 0.28, 0.30])
YAW_LIMIT = np.pi / 2
MAX_LEAD_M = 0.03            # the commanded tcp never runs further than this ahead of the real one
SETTLE_SUBSTEPS = 50         # physics steps after reset so objects come to rest


@dataclass
class SimObservation:
    """What the policy sees; ``images`` is empty when the step was not rendered."""

    images: dict[str, np.ndarray]      # camera -> (H, W, 3) uint8 RGB
    proprio: np.ndarray                # (PROPRIO_DIM,) float32
    instruction: str
    step: int = 0
    info: dict = field(default_factory=dict)


def _yaw_quat(yaw: float) -> np.ndarray:
    return np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)])


def quat_yaw(q: np.ndarray) -> float:
    """Heading of a body's x axis projected on the table plane (wxyz quaternion)."""
    w, x, y, z = q
    return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))


class TabletopEnv:
    """One MuJoCo tabletop; ``reset`` loads a (family, seed) task, ``step`` applies one 7-D action."""

    def __init__(self, family: str = 'pick', seed: int = 0, image_size: int = 96,
                 cameras: tuple[str, ...] = CAMERA_NAMES, substeps: int = 50, supersample: int = 2) -> None:
        if family not in TASK_FAMILIES:
            raise ValueError(f'unknown task family {family!r}; expected one of {TASK_FAMILIES}')
        unknown = set(cameras) - set(CAMERA_NAMES)
        if unknown:
            raise ValueError(f'unknown camera(s) {sorted(unknown)}; expected a subset of {CAMERA_NAMES}')
        self.family = family
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.cameras = tuple(cameras)
        self.substeps = int(substeps)
        self.supersample = max(1, int(supersample))   # render this many times larger, then area-downsample
        self.model = mujoco.MjModel.from_xml_string(scene.build_mjcf(self.image_size * self.supersample))
        self.data = mujoco.MjData(self.model)
        self._renderer: Optional[mujoco.Renderer] = None
        self._ids()
        self.task: TaskSpec
        self.layout: Layout
        self.step_count = 0
        self.episode_index = -1
        self._target_pos = np.zeros(3)
        self._target_yaw = 0.0
        self._success = False
        self.reset(render=False)                       # the renderer is created on the first render

    # --- setup ---------------------------------------------------------------------------------------
    def _ids(self) -> None:
        m = self.model
        body = lambda n: mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, n)  # noqa: E731
        self._mocap_hand = m.body_mocapid[body('hand_mocap')]
        self._hand_qadr = m.jnt_qposadr[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, 'hand_joint')]
        self._tcp_site = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SITE, 'tcp')
        self._finger_qadr = [m.jnt_qposadr[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, n)]
                             for n in ('finger_left', 'finger_right')]
        self._obj: dict[str, dict] = {}
        for c in COLOURS:
            for s in SHAPES:
                name = object_name(c, s)
                j = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, f'{name}_joint')
                g = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, name)
                self._obj[name] = dict(body=body(name), qadr=m.jnt_qposadr[j], vadr=m.jnt_dofadr[j], geom=g)
        self._plate_mocap = {c: m.body_mocapid[body(f'plate_{c}')] for c in COLOURS}
        self._zone_mocap = {s: m.body_mocapid[body(f'zone_{s}')] for s in ZONE_SIDES}
        self._park_pos = {n: m.body_pos[o['body']].copy() for n, o in self._obj.items()}
        self._plate_park = {c: m.body_pos[body(f'plate_{c}')].copy() for c in COLOURS}

    # --- episode -------------------------------------------------------------------------------------
    def reset(self, seed: Optional[int] = None, family: Optional[str] = None,
              render: bool = True) -> SimObservation:
        """Start the (family, seed) episode; with no arguments the current family and seed are reused."""
        if family is not None:
            if family not in TASK_FAMILIES:
                raise ValueError(f'unknown task family {family!r}')
            self.family = family
        if seed is not None:
            self.seed = int(seed)
        self.task, self.layout = sample_task(self.family, self.seed)
        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        for name, o in self._obj.items():
            used = name in self.layout.objects
            m.geom_contype[o['geom']] = 1 if used else 0
            m.geom_conaffinity[o['geom']] = 1 if used else 0
            m.body_gravcomp[o['body']] = 0.0 if used else 1.0
            q = d.qpos[o['qadr']:o['qadr'] + 7]
            if used:
                x, y, yaw = self.layout.objects[name]
                q[:3] = (x, y, scene.OBJECT_HALF)
                q[3:] = _yaw_quat(yaw)
            else:
                q[:3] = self._park_pos[name]
                q[3:] = (1, 0, 0, 0)
        for c in COLOURS:
            pos = self.layout.plates.get(c)
            d.mocap_pos[self._plate_mocap[c]] = ((pos[0], pos[1], scene.PLATE_HALF_HEIGHT)
                                                 if pos is not None else self._plate_park[c])
        for s in ZONE_SIDES:
            cx, cy = self.layout.zones[s]
            d.mocap_pos[self._zone_mocap[s]] = (cx, cy, 0.0)
        *start, yaw = self.layout.hand
        d.qpos[self._hand_qadr:self._hand_qadr + 3] = start
        d.qpos[self._hand_qadr + 3:self._hand_qadr + 7] = _yaw_quat(yaw)
        d.mocap_pos[self._mocap_hand] = start
        d.mocap_quat[self._mocap_hand] = _yaw_quat(yaw)
        for a in self._finger_qadr:
            d.qpos[a] = scene.FINGER_MAX
        d.ctrl[:] = scene.FINGER_MAX
        mujoco.mj_forward(m, d)
        mujoco.mj_step(m, d, nstep=SETTLE_SUBSTEPS)
        self._target_pos = self.tcp_pos()
        self._target_yaw = self.hand_yaw()
        self.step_count = 0
        self.episode_index += 1
        self._success = check_success(self.sim_state(), self.task)
        return self.observe(render)

    def step(self, action, render: bool = True) -> tuple[SimObservation, bool, bool]:
        """Apply one normalised 7-D action for one control period; returns (obs, done, success)."""
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (ACTION_DIM,):
            raise ValueError(f'action must have {ACTION_DIM} elements, got shape {np.shape(action)}')
        if not np.all(np.isfinite(a)):
            raise ValueError(f'action contains NaN or inf: {a}')
        a = np.clip(a, -1.0, 1.0)
        m, d = self.model, self.data
        tcp = self.tcp_pos()
        target = np.clip(self._target_pos + a[:3] * TRANSLATION_SCALE_M, WORKSPACE_LOW, WORKSPACE_HIGH)
        target = tcp + np.clip(target - tcp, -MAX_LEAD_M, MAX_LEAD_M)      # no wind-up when blocked
        yaw = float(np.clip(self._target_yaw + a[5] * ROTATION_SCALE_RAD, -YAW_LIMIT, YAW_LIMIT))
        d.ctrl[:] = scene.FINGER_MAX * (1.0 - a[6]) / 2.0
        p0, y0 = self._target_pos, self._target_yaw
        ramp = max(1, int(0.6 * self.substeps))                             # glide, then let it settle
        offset = np.array([0.0, 0.0, scene.TCP_OFFSET_Z])
        for i in range(self.substeps):
            s = min(1.0, (i + 1) / ramp)
            d.mocap_pos[self._mocap_hand] = p0 + s * (target - p0) - offset
            d.mocap_quat[self._mocap_hand] = _yaw_quat(y0 + s * (yaw - y0))
            mujoco.mj_step(m, d)
        self._target_pos, self._target_yaw = target, yaw
        self.step_count += 1
        self._success = check_success(self.sim_state(), self.task)
        done = self._success or self.step_count >= self.max_steps
        return self.observe(render), done, self._success

    # --- observation ---------------------------------------------------------------------------------
    def observe(self, render: bool = True) -> SimObservation:
        images = self.render() if render else {}
        return SimObservation(images=images, proprio=self.proprio(), instruction=self.instruction,
                              step=self.step_count)

    def render(self) -> dict[str, np.ndarray]:
        """RGB uint8 (H, W, 3) per camera, from one reused renderer (supersampled, no MSAA/shadows)."""
        size = self.image_size * self.supersample
        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.model, size, size)
        out = {}
        for cam in self.cameras:
            self._renderer.update_scene(self.data, camera=cam)
            img = self._renderer.render()
            if self.supersample > 1:
                img = cv2.resize(img, (self.image_size, self.image_size), interpolation=cv2.INTER_AREA)
            out[cam] = np.ascontiguousarray(img)
        return out

    def proprio(self) -> np.ndarray:
        yaw = self.hand_yaw()
        return np.array([*self.tcp_pos(), np.sin(yaw), np.cos(yaw), self.finger_gap()], dtype=np.float32)

    def tcp_pos(self) -> np.ndarray:
        return self.data.site_xpos[self._tcp_site].copy()

    def hand_yaw(self) -> float:
        return quat_yaw(self.data.qpos[self._hand_qadr + 3:self._hand_qadr + 7])

    def finger_gap(self) -> float:
        gap = sum(self.data.qpos[a] for a in self._finger_qadr)     # soft joint limits overshoot by ~1e-5
        return float(np.clip(gap, 0.0, 2 * scene.FINGER_MAX))

    def object_pose(self, name: str) -> tuple[np.ndarray, float]:
        """(centre position, yaw) of an object."""
        q = self.data.qpos[self._obj[name]['qadr']:self._obj[name]['qadr'] + 7]
        return q[:3].copy(), quat_yaw(q[3:])

    def sim_state(self) -> SimState:
        """Privileged snapshot for success detection and the scripted expert."""
        d = self.data
        objects = {}
        for name in self.layout.objects:
            o = self._obj[name]
            objects[name] = ObjectState(pos=d.qpos[o['qadr']:o['qadr'] + 3].copy(),
                                        linvel=d.qvel[o['vadr']:o['vadr'] + 3].copy())
        plates = {c: PlateState(pos=d.mocap_pos[self._plate_mocap[c]].copy()) for c in self.layout.plates}
        zones = {s: ZoneState(centre=np.asarray(self.layout.zones[s], dtype=float)) for s in ZONE_SIDES}
        return SimState(objects=objects, tcp_pos=self.tcp_pos(), finger_gap=self.finger_gap(),
                        plates=plates, zones=zones)

    def state_dict(self) -> dict:
        """Full simulator state and task description (numpy arrays / plain Python values)."""
        d = self.data
        return {
            'family': self.family, 'seed': self.seed, 'instruction': self.instruction,
            'target': self.task.target, 'plate': self.task.plate, 'zone': self.task.zone,
            'step': self.step_count, 'time': float(d.time), 'success': self._success,
            'qpos': d.qpos.copy(), 'qvel': d.qvel.copy(), 'ctrl': d.ctrl.copy(),
            'mocap_pos': d.mocap_pos.copy(), 'mocap_quat': d.mocap_quat.copy(),
            'target_pos': self._target_pos.copy(), 'target_yaw': self._target_yaw,
            'objects': {n: self.object_pose(n)[0] for n in self.layout.objects},
        }

    # --- properties ----------------------------------------------------------------------------------
    def success(self) -> bool:
        return self._success

    @property
    def instruction(self) -> str:
        return self.task.instruction

    @property
    def max_steps(self) -> int:
        return self.task.max_steps

    @property
    def done(self) -> bool:
        return self._success or self.step_count >= self.max_steps

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    def __enter__(self) -> 'TabletopEnv':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_env(family: str = 'pick', seed: int = 0, image_size: int = 96, **kwargs) -> TabletopEnv:
    return TabletopEnv(family=family, seed=seed, image_size=image_size, **kwargs)
