"""Camera frames from raw message fields to RGB uint8, or a typed error saying what is wrong.

Works on the fields of ``sensor_msgs/Image`` (encoding, height, width, step, data) and
``sensor_msgs/CompressedImage`` (format, data) without importing any ROS package.
"""
from __future__ import annotations

import io
import warnings
from typing import NamedTuple, Optional

import cv2
import numpy as np

# encoding -> (channels, conversion to RGB, or None when the layout already is RGB)
RAW_ENCODINGS: dict[str, tuple[int, Optional[int]]] = {
    'rgb8': (3, None),
    'bgr8': (3, cv2.COLOR_BGR2RGB),
    'rgba8': (4, cv2.COLOR_RGBA2RGB),
    'bgra8': (4, cv2.COLOR_BGRA2RGB),
    'mono8': (1, cv2.COLOR_GRAY2RGB),
    '8UC3': (3, cv2.COLOR_BGR2RGB),     # OpenCV's default channel order
    '8UC1': (1, cv2.COLOR_GRAY2RGB),
}
MAX_SIDE = 8192                           # larger frames are rejected before their pixels are decoded
# ... and compressed frames with more pixels: a one-colour 8192 x 8192 PNG is 200 kB on the wire but takes
# seconds and 400 MB to decode; 8192 x 4096 (twice an 8K UHD frame) is still taken
MAX_PIXELS = 8192 * 4096
_REDUCED_COLOR = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                  8: cv2.IMREAD_REDUCED_COLOR_8}


class ImageError(ValueError):
    """A frame that cannot be used; ``kind`` names the counter it goes to in diagnostics."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def decode_raw_image(encoding: str, height: int, width: int, step: int, data: bytes | bytearray | memoryview,
                     ) -> np.ndarray:
    """(height, width, 3) uint8 RGB from ``sensor_msgs/Image`` fields; honours ``step`` row padding."""
    if encoding not in RAW_ENCODINGS:
        raise ImageError('image_encoding', f'unsupported encoding {encoding!r}; '
                         f'expected one of {", ".join(RAW_ENCODINGS)}')
    if height <= 0 or width <= 0:
        raise ImageError('image_size', f'empty image ({width}x{height})')
    if height > MAX_SIDE or width > MAX_SIDE:
        raise ImageError('image_size', f'image {width}x{height} exceeds {MAX_SIDE} pixels per side')
    channels, conversion = RAW_ENCODINGS[encoding]
    row_bytes = width * channels
    if step < row_bytes:
        raise ImageError('image_size', f'step {step} is smaller than width*channels = {row_bytes} ({encoding})')
    expected = step * height
    if len(data) != expected:
        kind = 'image_truncated' if len(data) < expected else 'image_size'
        raise ImageError(kind, f'data holds {len(data)} bytes, expected step*height = {step}*{height} = {expected}')
    buffer = np.frombuffer(data, dtype=np.uint8).reshape(height, step)
    pixels = buffer[:, :row_bytes].reshape(height, width, channels)
    if conversion is None:
        return np.ascontiguousarray(pixels)
    return cv2.cvtColor(np.ascontiguousarray(pixels), conversion)


class CompressedHeader(NamedTuple):
    """What a compressed frame's header says, read without decoding its pixels."""

    width: int
    height: int
    format: str          # Pillow's name: 'JPEG', 'PNG', 'WEBP', ...


class DecodedFrame(NamedTuple):
    """RGB uint8 pixels of a frame, possibly decoded at a reduced scale, and the frame's full size."""

    pixels: np.ndarray
    full_size: tuple[int, int]       # (height, width) at full scale, EXIF orientation applied like the pixels


def read_compressed_header(data: bytes | bytearray | memoryview) -> CompressedHeader:
    """Size and format from a compressed frame's header (Pillow); no pixel is decoded.

    ``ImageError('image_decode')`` when no known image format starts the data.
    """
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return CompressedHeader(*image.size, image.format or '')
    except Image.DecompressionBombError as error:       # far beyond MAX_SIDE: its size is in the message
        raise ImageError('image_size', f'image exceeds {MAX_SIDE} pixels per side ({error})') from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ImageError('image_decode', f'not a known compressed image format ({error})') from None


def jpeg_scale(width: int, height: int, at_least: tuple[int, int]) -> int:
    """The largest of 8, 4, 2 (else 1) that shrinks the frame with each side still at least ``max(at_least)``.

    The longer wanted side bounds both, so a frame that EXIF orientation rotates still qualifies; libjpeg rounds
    reduced sides up, so a side ``s`` decodes to ``ceil(s / scale)``.
    """
    for scale in (8, 4, 2):
        if -(-min(width, height) // scale) >= max(at_least):
            return scale
    return 1


def decode_compressed_frame(data: bytes | bytearray | memoryview, image_format: str = '',
                            at_least: Optional[tuple[int, int]] = None) -> DecodedFrame:
    """RGB uint8 from ``sensor_msgs/CompressedImage`` data (JPEG, PNG, WebP, ...).

    The size in the header is checked first: a small file that claims a huge frame (a side above ``MAX_SIDE``, or
    more than ``MAX_PIXELS``) is rejected before any pixel is decoded (a PNG of one colour at 16000 x 16000 is
    250 kB and would allocate 768 MB). With ``at_least`` (H, W), a JPEG at least twice that size is decoded at 1/2,
    1/4 or 1/8 scale by libjpeg's DCT scaling, each side staying at least ``at_least``: 1.8-3.3x faster than a full
    decode for a frame that is shrunk to the policy input anyway.
    """
    if len(data) == 0:
        raise ImageError('image_decode', 'compressed image holds no data')
    try:
        header = read_compressed_header(data)
    except ImageError as error:
        if error.kind != 'image_decode':
            raise
        raise ImageError(error.kind, f'undecodable compressed image (format {image_format!r}, {len(data)} bytes): '
                                     f'{error}') from None
    width, height = header.width, header.height
    if height > MAX_SIDE or width > MAX_SIDE or height <= 0 or width <= 0:
        raise ImageError('image_size', f'image {width}x{height}: each side must be 1 to {MAX_SIDE} pixels')
    if width * height > MAX_PIXELS:
        raise ImageError('image_size', f'image {width}x{height} has {width * height} pixels, more than '
                                       f'{MAX_PIXELS} are not decoded')
    scale = jpeg_scale(width, height, at_least) if at_least and header.format == 'JPEG' else 1
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _REDUCED_COLOR[scale])
    if bgr is None or bgr.size == 0:
        raise ImageError('image_decode', f'undecodable compressed image (format {image_format!r}, '
                         f'{len(data)} bytes)')
    expected = sorted((-(-height // scale), -(-width // scale)))                  # EXIF orientation may rotate it
    if any(got > want for got, want in zip(sorted(bgr.shape[:2]), expected)):
        raise ImageError('image_size', f'image decodes to {bgr.shape[1]}x{bgr.shape[0]}, larger than the '
                                       f'{width}x{height} its header claims')
    rotated = bgr.shape[0] != bgr.shape[1] and (bgr.shape[0] > bgr.shape[1]) != (height > width)
    return DecodedFrame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (width, height) if rotated else (height, width))


def decode_compressed_image(data: bytes | bytearray | memoryview, image_format: str = '') -> np.ndarray:
    """RGB uint8 at full size from ``sensor_msgs/CompressedImage`` data (see ``decode_compressed_frame``)."""
    return decode_compressed_frame(data, image_format).pixels


def check_image_size(shape: tuple, min_side: int) -> None:
    """Raise ``ImageError('image_size')`` when a side of a decoded frame is shorter than ``min_side`` pixels."""
    height, width = shape[:2]
    if min(height, width) < min_side:
        raise ImageError('image_size', f'image {width}x{height} has a side shorter than min_image_side = {min_side}')


def aspect_distortion(shape: tuple, size: tuple[int, int]) -> float:
    """By what factor (>= 1) resizing a frame of ``shape`` to (H, W) = ``size`` changes its aspect ratio."""
    ratio = (shape[1] / shape[0]) / (size[1] / size[0])
    return max(ratio, 1.0 / ratio)


def resize_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` at (H, W) = ``size``; INTER_AREA (the anti-aliased choice for shrinking) when it differs."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    shrinking = image.shape[0] >= height and image.shape[1] >= width
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


IMAGE_FITS = ('stretch', 'pad')


def fit_to(image: np.ndarray, size: tuple[int, int], fit: str = 'stretch') -> np.ndarray:
    """``image`` made the policy input of (H, W) = ``size`` the way its model was trained.

    ``stretch``: resized to ``size`` (:func:`resize_to`; OpenVLA's and the reference VLA's processors); ``pad``:
    resized without distortion to fit, bilinear, centred on black (LeRobot's / openpi's pi0 ``resize_with_pad``:
    the same sizes and offsets, values within a grey level).
    """
    if fit == 'stretch':
        return resize_to(image, size)
    if fit != 'pad':
        raise ValueError(f'image fit {fit!r} not in {IMAGE_FITS}')
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    ratio = max(image.shape[1] / width, image.shape[0] / height)
    inner_h, inner_w = int(image.shape[0] / ratio), int(image.shape[1] / ratio)
    out = np.zeros((height, width, 3), dtype=np.uint8)
    top, left = (height - inner_h) // 2, (width - inner_w) // 2
    out[top:top + inner_h, left:left + inner_w] = cv2.resize(image, (inner_w, inner_h),
                                                             interpolation=cv2.INTER_LINEAR)
    return out


def encode_raw_image(rgb: np.ndarray, encoding: str = 'rgb8', row_padding: int = 0) -> tuple[int, int, int, bytes]:
    """(height, width, step, data) of an RGB frame in ``encoding`` (test publishers, the debug image)."""
    if encoding not in RAW_ENCODINGS:
        raise ImageError('image_encoding', f'unsupported encoding {encoding!r}')
    channels, _ = RAW_ENCODINGS[encoding]
    inverse = {'rgb8': None, 'bgr8': cv2.COLOR_RGB2BGR, '8UC3': cv2.COLOR_RGB2BGR, 'rgba8': cv2.COLOR_RGB2RGBA,
               'bgra8': cv2.COLOR_RGB2BGRA, 'mono8': cv2.COLOR_RGB2GRAY, '8UC1': cv2.COLOR_RGB2GRAY}[encoding]
    pixels = rgb if inverse is None else cv2.cvtColor(rgb, inverse)
    height, width = rgb.shape[:2]
    rows = pixels.reshape(height, width * channels)
    if row_padding:
        rows = np.concatenate([rows, np.zeros((height, row_padding), dtype=np.uint8)], axis=1)
    return height, width, rows.shape[1], np.ascontiguousarray(rows).tobytes()
