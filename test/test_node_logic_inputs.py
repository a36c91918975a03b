"""Pure-function tests of the node's input handling: image decoding, instruction validation, proprio."""
import io
import os
from pathlib import Path
import struct
import zlib

import cv2
import numpy as np
import pytest

from specprune_ros.codecs.image_decoding import (ImageError, decode_compressed_frame, decode_compressed_image,
                                                 decode_raw_image, encode_raw_image, jpeg_scale, resize_to)
from specprune_ros.ros.tools.synthetic_camera import synthetic_frame
from specprune_ros.codecs.instruction import InstructionError, string_bytes_from_cdr, validate_instruction
from specprune_ros.codecs.proprio import (ProprioAssembler, StateError, finger_gap_from_joints, proprio_vector,
                                          yaw_from_quaternion)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8', '8UC3'])
def test_colour_encodings_round_trip(rgb, encoding):
    height, width, step, data = encode_raw_image(rgb, encoding)
    np.testing.assert_array_equal(decode_raw_image(encoding, height, width, step, data), rgb)


@pytest.mark.parametrize('encoding', ['mono8', '8UC1'])
def test_mono_becomes_grey_rgb(rgb, encoding):
    height, width, step, data = encode_raw_image(rgb, encoding)
    out = decode_raw_image(encoding, height, width, step, data)
    assert out.shape == (6, 5, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_step_padding_is_skipped(rgb):
    height, width, step, data = encode_raw_image(rgb, 'bgr8', row_padding=7)
    assert step == width * 3 + 7
    np.testing.assert_array_equal(decode_raw_image('bgr8', height, width, step, data), rgb)


def test_accepts_array_buffers(rgb):
    import array
    height, width, step, data = encode_raw_image(rgb, 'rgb8')
    np.testing.assert_array_equal(decode_raw_image('rgb8', height, width, step, array.array('B', data)), rgb)


@pytest.mark.parametrize('encoding, height, width, step, size, kind', [
    ('yuv422', 2, 2, 4, 8, 'image_encoding'),
    ('32FC1', 2, 2, 8, 16, 'image_encoding'),
    ('rgb8', 0, 2, 6, 0, 'image_size'),
    ('rgb8', 2, 2, 5, 10, 'image_size'),          # step < width * channels
    ('rgb8', 2, 2, 6, 11, 'image_truncated'),     # fewer bytes than step * height
    ('rgb8', 2, 2, 6, 0, 'image_truncated'),      # empty data
    ('rgb8', 2, 2, 6, 13, 'image_size'),          # more bytes than step * height
    ('rgb8', 9000, 2, 6, 6, 'image_size'),        # absurd size, rejected before allocating
])
def test_bad_raw_images_are_typed_errors(encoding, height, width, step, size, kind):
    with pytest.raises(ImageError) as error:
        decode_raw_image(encoding, height, width, step, bytes(size))
    assert error.value.kind == kind
    assert str(error.value)


def test_compressed_round_trip(rgb):
    big = cv2.resize(rgb, (40, 48), interpolation=cv2.INTER_NEAREST)
    ok, png = cv2.imencode('.png', cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
    assert ok
    np.testing.assert_array_equal(decode_compressed_image(png.tobytes(), 'png'), big)


@pytest.mark.parametrize('data', [b'', b'not a jpeg at all', b'\xff\xd8\xff\xe0' + bytes(50)])
def test_undecodable_compressed_is_an_error(data):
    with pytest.raises(ImageError) as error:
        decode_compressed_image(data, 'jpeg')
    assert error.value.kind == 'image_decode'


def png_claiming(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header claims ``width`` x ``height`` RGB pixels (its pixel data is cut short)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(bytes(1000)))
            + chunk(b'IEND', b''))


@pytest.mark.parametrize('side', [8193, 12000, 40000])
def test_a_compressed_frame_claiming_a_huge_size_is_refused_from_its_header(side):
    """Refused as too large (not as undecodable): the header is read, no pixel is decoded."""
    with pytest.raises(ImageError) as error:
        decode_compressed_image(png_claiming(side, side), 'png')
    assert error.value.kind == 'image_size' and '8192' in str(error.value)


def test_truncated_jpeg_is_rejected(rgb):
    big = cv2.resize(rgb, (64, 64))
    ok, jpeg = cv2.imencode('.jpg', big)
    with pytest.raises(ImageError):
        decode_compressed_image(jpeg.tobytes()[:20], 'jpeg')


@pytest.mark.parametrize('width, height, scale', [
    (640, 480, 2), (1280, 720, 2), (1920, 1080, 4), (3840, 2160, 8),
    (448, 448, 2), (447, 900, 2), (445, 900, 1),         # the short side decides: ceil(445 / 2) = 223
    (1785, 1785, 8), (1784, 1784, 4),                    # libjpeg rounds up: ceil(1785 / 8) = 224
    (224, 224, 1), (100, 80, 1)])
def test_jpeg_scale_keeps_each_side_at_least_the_policy_input(width, height, scale):
    assert jpeg_scale(width, height, (224, 224)) == scale


def _jpeg(rgb: np.ndarray, exif_orientation: int = 0) -> bytes:
    from PIL import Image
    image, encoded = Image.fromarray(rgb), io.BytesIO()
    exif = image.getexif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    image.save(encoded, 'JPEG', quality=90, exif=exif.tobytes())
    return encoded.getvalue()


def test_a_large_jpeg_decodes_at_reduced_scale_close_to_a_full_decode():
    """1280 x 720 for a 96 x 96 input: 1/4 scale (320 x 180), the policy input within ~1 grey level of full."""
    frame = cv2.resize(synthetic_frame(7, 720), (1280, 720), interpolation=cv2.INTER_LINEAR)
    data = _jpeg(frame)
    full, scaled = decode_compressed_frame(data, 'jpeg'), decode_compressed_frame(data, 'jpeg', (96, 96))
    assert full.pixels.shape == (720, 1280, 3) and full.full_size == (720, 1280)
    assert scaled.pixels.shape == (180, 320, 3) and scaled.full_size == (720, 1280)
    difference = np.abs(resize_to(full.pixels, (96, 96)).astype(int) - resize_to(scaled.pixels, (96, 96)))
    assert difference.mean() < 1.5 and np.percentile(difference, 99) <= 8
    np.testing.assert_array_equal(decode_compressed_image(data, 'jpeg'), full.pixels)


def test_only_jpeg_decodes_at_reduced_scale():
    frame = synthetic_frame(3, 400)
    ok, png = cv2.imencode('.png', cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    decoded = decode_compressed_frame(png.tobytes(), 'png', (96, 96))
    np.testing.assert_array_equal(decoded.pixels, frame)
    assert decoded.full_size == (400, 400)


def test_an_exif_rotated_jpeg_reports_its_full_size_as_decoded():
    """Orientation 6 (rotate 90 degrees): a 640 x 480 header decodes upright as 480 wide x 640 high."""
    data = _jpeg(cv2.resize(synthetic_frame(1, 480), (640, 480)), exif_orientation=6)
    for at_least, shape in ((None, (640, 480)), ((96, 96), (160, 120))):
        decoded = decode_compressed_frame(data, 'jpeg', at_least)
        assert decoded.pixels.shape[:2] == shape and decoded.full_size == (640, 480)


def test_resize_uses_the_policy_size(rgb):
    assert resize_to(rgb, (6, 5)) is rgb
    assert resize_to(np.zeros((224, 224, 3), np.uint8), (96, 96)).shape == (96, 96, 3)
    assert resize_to(np.zeros((48, 64, 3), np.uint8), (96, 96)).shape == (96, 96, 3)


def cdr_string(payload: bytes, little: bool = True) -> bytes:
    """A serialized std_msgs/String as rmw_fastrtps writes it."""
    order = '<' if little else '>'
    header = b'\x00\x01\x00\x00' if little else b'\x00\x00\x00\x00'
    return header + struct.pack(order + 'I', len(payload) + 1) + payload + b'\x00'


@pytest.mark.parametrize('little', [True, False])
def test_cdr_string_extraction(little):
    assert string_bytes_from_cdr(cdr_string('grasp the cube ü'.encode(), little)) == 'grasp the cube ü'.encode()


def test_cdr_matches_rclpy_serialization():
    serialization = pytest.importorskip(
        'rclpy.serialization', reason='rclpy is not installed (scripts/setup_env.sh installs the wheels); the CDR '
                                      'parsing itself is covered by test_cdr_string_extraction and test_malformed_cdr')
    from std_msgs.msg import String
    raw = serialization.serialize_message(String(data='pick up the red cube'))
    assert string_bytes_from_cdr(raw) == b'pick up the red cube'


@pytest.mark.parametrize('raw', [b'\x00\x01', b'\x12\x34\x00\x00\x05\x00\x00\x00abcd\x00',
                                 b'\x00\x01\x00\x00\xff\x00\x00\x00abc'])
def test_malformed_cdr(raw):
    with pytest.raises(InstructionError) as error:
        string_bytes_from_cdr(raw)
    assert error.value.kind == 'instruction_malformed'


@pytest.mark.parametrize('raw, kind', [
    (b'', 'instruction_empty'),
    (b'   \t\n', 'instruction_empty'),
    (b'x' * 1025, 'instruction_too_long'),
    (b'pick up the \xff\xfe cube', 'instruction_not_utf8'),
    (b'\xc3', 'instruction_not_utf8'),
    ('nul\x00inside', 'instruction_not_utf8'),
    ('\u200b \ufeff\u200d', 'instruction_empty'),                 # invisible format characters only
    ('\U0001f916 \U0001f916', 'instruction_empty'),                # no letter or digit
    ('!!! ???', 'instruction_empty'),
])
def test_bad_instructions(raw, kind):
    with pytest.raises(InstructionError) as error:
        validate_instruction(raw, max_bytes=1024)
    assert error.value.kind == kind


def test_good_instruction_is_normalised():
    assert validate_instruction(b'  pick up\tthe  red cube \n', 1024) == 'pick up the red cube'
    assert validate_instruction('déplace le cube', 1024) == 'déplace le cube'
    assert validate_instruction(b'x' * 1024, 1024) == 'x' * 1024
    assert validate_instruction('pick\u200b up the red cube!', 1024) == 'pick up the red cube!'
    red_cube = '\u8d64\u3044 \u30ad\u30e5\u30fc\u30d6'             # letters of another script: words
    assert validate_instruction(red_cube, 1024) == red_cube


def test_yaw_and_proprio_layout():
    yaw = 0.7
    quaternion = (0.0, 0.0, np.sin(yaw / 2), np.cos(yaw / 2))
    assert yaw_from_quaternion(*quaternion) == pytest.approx(yaw)
    vector = proprio_vector((0.1, -0.2, 0.3), quaternion, 0.04)
    np.testing.assert_allclose(vector, [0.1, -0.2, 0.3, np.sin(yaw), np.cos(yaw), 0.04], rtol=1e-6)
    assert vector.dtype == np.float32
    # a gripper pointing down (x axis rotated 180 deg about x) keeps the heading of its x axis
    down = (1.0, 0.0, 0.0, 0.0)
    assert yaw_from_quaternion(*down) == pytest.approx(0.0)


@pytest.mark.parametrize('position, quaternion, gap', [
    ((np.nan, 0, 0), (0, 0, 0, 1), 0.0), ((0, 0, 0), (0, 0, 0, 0), 0.0), ((0, 0, 0), (0, 0, 0, 1), np.inf)])
def test_bad_state_is_rejected(position, quaternion, gap):
    with pytest.raises(StateError):
        proprio_vector(position, quaternion, gap)


def test_finger_gap_and_assembler():
    assert finger_gap_from_joints(['a', 'f1', 'f2'], [3.0, 0.01, 0.02], ['f1', 'f2']) == pytest.approx(0.03)
    with pytest.raises(StateError):
        finger_gap_from_joints(['a'], [1.0], ['f1'])
    with pytest.raises(StateError):
        finger_gap_from_joints(['f1', 'f2'], [1.0], ['f1'])
    assembler = ProprioAssembler()
    assembler.put_pose((0, 0, 0.1), (0, 0, 0, 1), stamp=5.0)
    assert assembler.latest() is None
    assembler.put_gripper(0.05, stamp=4.5)
    vector, stamp = assembler.latest()
    assert stamp == 4.5 and vector[-1] == pytest.approx(0.05)


class FakeImage:
    def __init__(self, encoding, height=2, width=2, step=6, data=bytes(12)):
        self.encoding, self.height, self.width, self.step, self.data = encoding, height, width, step, data


def test_raw_converter_uses_cv_bridge_only_for_other_encodings(monkeypatch):
    import importlib
    import sys
    import types

    calls = []

    class FakeBridge:
        def imgmsg_to_cv2(self, msg, desired_encoding):
            calls.append((msg.encoding, desired_encoding))
            if msg.encoding == 'yuv422':
                return np.zeros((msg.height, msg.width, 3), np.uint8)
            raise TypeError(f'[{msg.encoding}] is not a color format')

    monkeypatch.setitem(sys.modules, 'cv_bridge', types.SimpleNamespace(CvBridge=FakeBridge))
    module = importlib.reload(importlib.import_module('specprune_ros.ros.image_conversion'))
    try:
        convert = module.RawImageConverter()
        assert convert(FakeImage('rgb8')).shape == (2, 2, 3) and calls == []      # numpy path, validated
        with pytest.raises(ImageError) as error:
            convert(FakeImage('rgb8', data=bytes(5)))
        assert error.value.kind == 'image_truncated'
        assert convert(FakeImage('yuv422', step=4, data=bytes(8))).shape == (2, 2, 3)
        with pytest.raises(ImageError) as error:
            convert(FakeImage('16UC1', step=4, data=bytes(8)))
        assert error.value.kind == 'image_encoding' and 'cv_bridge' in str(error.value)
    finally:
        monkeypatch.delitem(sys.modules, 'cv_bridge')
        importlib.reload(module)
    with pytest.raises(ImageError) as error:
        module.RawImageConverter()(FakeImage('yuv422', step=4, data=bytes(8)))
    assert error.value.kind == 'image_encoding'


def test_a_cv_bridge_that_fails_to_import_leaves_the_common_encodings_working(tmp_path):
    """A system cv_bridge built against NumPy 1 fails inside NumPy 2 with errors other than ImportError."""
    import subprocess
    import sys

    planted = tmp_path / 'cv_bridge'
    planted.mkdir()
    (planted / '__init__.py').write_text("raise AttributeError('_ARRAY_API not found')\n")
    script = ('import numpy as np\n'
              'from specprune_ros.ros import image_conversion as m\n'
              'from specprune_ros.codecs.image_decoding import ImageError\n'
              'class Msg:\n'
              '    def __init__(self, encoding):\n'
              '        self.encoding, self.height, self.width, self.step, self.data = encoding, 2, 2, 6, bytes(12)\n'
              'convert = m.RawImageConverter()\n'
              'assert m.CvBridge is None and convert.bridge is None\n'
              'assert convert(Msg("bgr8")).shape == (2, 2, 3)\n'
              'try:\n'
              '    convert(Msg("yuv422"))\n'
              'except ImageError as error:\n'
              '    print(error.kind)\n')
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(tmp_path), str(ROOT)])}
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == 'image_encoding'
