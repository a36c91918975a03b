"""Shared test set-up: a repeatable, small thread budget (the CI machine has 2 cores), tiny checkpoints."""
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault('MUJOCO_GL', 'egl')


@pytest.fixture(autouse=True, scope='session')
def _torch_threads():
    import torch
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope='module')
def prismatic_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny random OpenVLA and OpenVLA-OFT checkpoints in their published layout."""
    from specprune_ros.adapters.tiny import write_tiny_checkpoint   # torch + transformers: only when asked for
    root = tmp_path_factory.mktemp('ckpt')
    return {'openvla': write_tiny_checkpoint(root / 'openvla', 'openvla'),
            'openvla-oft': write_tiny_checkpoint(root / 'oft', 'openvla-oft')}


def copy(directory: Path, tmp_path: Path, name: str = 'copy') -> Path:
    """A copy of a checkpoint directory to change."""
    target = tmp_path / name
    shutil.copytree(directory, target)
    return target
