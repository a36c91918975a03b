"""A step hands the device its host data before the vision work, and nothing between that work and the decoder pass.

On a GPU a copy from the host (a tensor built from host data on the device) or a read back synchronises the stream:
queued after the vision backbones, it stops the host until they have run, and the device then idles while the host
prepares the decoder pass. Every backend (OpenVLA-OFT, OpenVLA, pi0, the reference VLA) is stepped with a guard
armed from the moment its vision work is queued until the decoder pass starts: building a tensor from host data,
reading one back or building the layout's indices on the host there fails the test. On CUDA the twin counts the
synchronising calls in that window under torch's sync debug mode (none allowed).
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import numpy as np
import pytest
import torch

from cuda_testkit import cuda_or_skip
from specprune_ros.adapters.pi0.tiny import write_tiny_checkpoint as write_tiny_pi0
from specprune_ros.adapters.tiny import write_tiny_checkpoint
from specprune_ros.core.executor import PrunableDecoderRunner
from specprune_ros.core.token_layout import TokenLayout
from specprune_ros.models.loading import load_policy
from specprune_ros.policy.interface import Observation

INSTRUCTION = 'put the red cube on the left plate'         # words every model here reads, the reference VLA too
HOST_BUILDERS = ('tensor', 'as_tensor', 'from_numpy')
HOST_READS = ('item', 'cpu', 'tolist', 'numpy', '__bool__', '__int__', '__float__', 'nonzero')


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp('host_copies')
    return {'openvla-oft': str(write_tiny_checkpoint(root / 'oft', 'openvla-oft', seed=1)),
            'openvla': str(write_tiny_checkpoint(root / 'openvla', 'openvla', seed=2)),
            'pi0': str(write_tiny_pi0(root / 'pi0', 'pi0', seed=3)),
            'reference': 'reference'}


def vision_owner(policy) -> tuple[object, str]:
    """Where the backend queues its vision work: (object, method name)."""
    backend = policy.backend
    if hasattr(backend, 'visual_tokens'):                 # OpenVLA / OpenVLA-OFT adapters
        return backend, 'visual_tokens'
    if hasattr(backend, 'inference'):                     # pi0
        return backend.inference.model, 'embed_images'
    return backend.model, 'embed'                         # the reference VLA: images, words and state together


def observation(policy, step: int) -> Observation:
    backend = policy.backend
    rng = np.random.default_rng(step)
    size = getattr(backend, 'image_size', (96, 112))
    images = {name: rng.integers(0, 255, size=(*size, 3), dtype=np.uint8) for name in backend.camera_names}
    dim = getattr(backend, 'proprio_dim', None)
    dim = 8 if dim is None and hasattr(backend, 'inference') else dim
    proprio = rng.normal(scale=0.3, size=dim).astype(np.float32) if dim else None
    return Observation(images=images, instruction=INSTRUCTION, proprio=proprio,
                       executed_actions=np.zeros((4, 7), dtype=np.float32))


@contextlib.contextmanager
def window_between_vision_and_decoder(policy, monkeypatch, on_enter, on_leave):
    """Call ``on_enter`` when the vision work has been queued and ``on_leave`` when the decoder pass starts."""
    owner, name = vision_owner(policy)
    vision = getattr(owner, name)

    def queued(*args, **kwargs):
        out = vision(*args, **kwargs)
        on_enter()
        return out
    monkeypatch.setattr(owner, name, queued)
    forward = PrunableDecoderRunner.forward

    def pass_starts(self, *args, **kwargs):
        on_leave()
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(PrunableDecoderRunner, 'forward', pass_starts)
    yield


@pytest.mark.parametrize('model', ['openvla-oft', 'openvla', 'pi0', 'reference'])
def test_nothing_is_built_from_host_data_or_read_back_between_the_vision_and_the_decoder(model, checkpoints,
                                                                                         monkeypatch):
    policy = load_policy(checkpoints[model], method='random', method_config={'keep_ratio': 0.5})
    armed, refused = [False], []

    def guard(original, name):
        def call(*args, **kwargs):
            if armed[0]:
                refused.append(name)
                raise AssertionError(f'{name} between the vision work and the decoder pass')
            return original(*args, **kwargs)
        return call
    for name in HOST_BUILDERS:
        monkeypatch.setattr(torch, name, guard(getattr(torch, name), f'torch.{name}'))
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, guard(getattr(torch.Tensor, name), f'Tensor.{name}'))
    monkeypatch.setattr(TokenLayout, 'visual_indices', guard(TokenLayout.visual_indices, 'TokenLayout.visual_indices'))
    entered = []

    def enter():
        armed[0] = True
        entered.append(True)

    def leave():
        armed[0] = False
    with window_between_vision_and_decoder(policy, monkeypatch, enter, leave):
        for step in range(3):
            out = policy.predict(observation(policy, step))
            assert np.isfinite(out.actions).all()
    assert len(entered) == 3 and not refused


_cuda_or_skip = functools.partial(cuda_or_skip, 'the host-data guard above covers the same window')


@pytest.mark.parametrize('model', ['openvla-oft', 'openvla', 'pi0', 'reference'])
def test_cuda_steps_do_not_synchronise_between_the_vision_and_the_decoder(model, checkpoints, monkeypatch):
    device = _cuda_or_skip()
    policy = load_policy(checkpoints[model], method='random', method_config={'keep_ratio': 0.5}, device=str(device))
    caught: list = []
    recorder = warnings.catch_warnings(record=True)

    def enter():
        torch.cuda.set_sync_debug_mode('warn')

    def leave():
        torch.cuda.set_sync_debug_mode(0)
    policy.predict(observation(policy, 0))                        # warm: tables and caches built
    with window_between_vision_and_decoder(policy, monkeypatch, enter, leave):
        with recorder as log:
            warnings.simplefilter('always')
            for step in range(1, 4):
                policy.predict(observation(policy, step))
            caught = [w for w in log if 'called a synchronizing CUDA operation' in str(w.message)]
    torch.cuda.set_sync_debug_mode(0)
    where = '; '.join(f'{w.filename}:{w.lineno}' for w in caught)
    assert not caught, f'{len(caught)} synchronising calls between the vision and the decoder: {where}'


def test_the_shared_device_tensors_serve_passes_with_autograd_on_after_an_inference_mode_step():
    # built once and shared: the first call may come from a step in inference mode, a later one from a pass that
    # records autograd (an inference tensor there would raise)
    from specprune_ros.adapters.preprocessing import ImageTransform
    from specprune_ros.core.token_layout import visual_indices_on
    layout = TokenLayout(num_tokens=12, camera_spans=((1, 5), (5, 9)), grid_shape=(2, 2))
    transform = ImageTransform(size=8, means=((0.4, 0.5, 0.6),), stds=((0.2, 0.3, 0.4),))
    frames = [np.full((8, 8, 3), 100, dtype=np.uint8)]
    with torch.inference_mode():
        visual_indices_on(layout, torch.device('cpu'))
        transform.pixels(frames)
    weights = torch.randn(12, 3, requires_grad=True)
    weights[visual_indices_on(layout, torch.device('cpu'))].sum().backward()
    assert weights.grad[1:9].eq(1).all() and weights.grad[0].eq(0).all() and weights.grad[9:].eq(0).all()
    scale = torch.ones(1, requires_grad=True)
    (transform.pixels(frames) * scale).sum().backward()
    expected = sum((100 / 255 - m) / s for m, s in zip((0.4, 0.5, 0.6), (0.2, 0.3, 0.4))) * 64
    assert scale.grad.item() == pytest.approx(expected, rel=1e-5)
