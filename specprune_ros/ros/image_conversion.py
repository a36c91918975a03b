"""``sensor_msgs/Image`` -> RGB uint8 for the policy.

The common encodings (rgb8, bgr8, rgba8, bgra8, mono8, 8UC1, 8UC3) go through the validated numpy decoder
(``specprune_ros.codecs.image_decoding``), which checks step, size and truncation itself. When cv_bridge
imports (a robot with ROS 2 installed), it converts every other encoding it knows (Bayer, YUV, 16-bit, ...)
to rgb8; without it (or when it fails to import, e.g. a system cv_bridge built against NumPy 1 beside the venv's
NumPy 2) those encodings are rejected as unsupported.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from specprune_ros.codecs.image_decoding import RAW_ENCODINGS, ImageError, decode_raw_image

try:
    from cv_bridge import CvBridge
except Exception:  # absent (the PyPI ROS wheels have none), or built against a NumPy other than the venv's
    CvBridge = None


class RawImageConverter:
    """Callable: image message -> (H, W, 3) uint8 RGB, or ``ImageError``."""

    def __init__(self, use_cv_bridge: bool = True) -> None:
        self.bridge = CvBridge() if (use_cv_bridge and CvBridge is not None) else None

    def __call__(self, msg: Any) -> np.ndarray:
        if msg.encoding in RAW_ENCODINGS or self.bridge is None:
            return decode_raw_image(msg.encoding, msg.height, msg.width, msg.step, msg.data)
        try:
            rgb = self.bridge.imgmsg_to_cv2(msg, desired_encoding='rgb8')
        except Exception as error:  # cv_bridge raises CvBridgeError, TypeError or ValueError
            raise ImageError('image_encoding', f'cv_bridge cannot convert {msg.encoding!r} to rgb8: {error}') from None
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or rgb.size == 0:
            raise ImageError('image_encoding', f'cv_bridge turned {msg.encoding!r} into {rgb.shape} {rgb.dtype}')
        return np.ascontiguousarray(rgb)
