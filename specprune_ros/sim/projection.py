"""Where a world point appears in a simulated camera's image (pinhole model of a MuJoCo camera)."""
from __future__ import annotations

import math

import mujoco
import numpy as np


def project_to_image(model: mujoco.MjModel, data: mujoco.MjData, camera: str, points: np.ndarray,
                     image_size: int) -> np.ndarray:
    """(n, 2) pixel coordinates (column, row) of world ``points`` (n, 3) in a square ``image_size`` image.

    MuJoCo cameras look along their local -z with y up; ``data`` must hold the current camera pose (after
    ``mj_forward``). Points behind the camera come back as NaN.
    """
    cam = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
    if cam < 0:
        raise ValueError(f'unknown camera {camera!r}')
    rotation = data.cam_xmat[cam].reshape(3, 3)                  # camera axes (columns) in world coordinates
    local = (np.atleast_2d(points) - data.cam_xpos[cam]) @ rotation
    depth = -local[:, 2]
    focal = 0.5 * image_size / math.tan(math.radians(model.cam_fovy[cam]) / 2)
    with np.errstate(divide='ignore', invalid='ignore'):
        column = 0.5 * image_size + focal * local[:, 0] / depth
        row = 0.5 * image_size - focal * local[:, 1] / depth
    pixels = np.stack([column, row], axis=1)
    pixels[depth <= 0] = np.nan
    return pixels
