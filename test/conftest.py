"""Shared test set-up: a repeatable, small thread budget (the CI machine has 2 cores)."""
import os

import pytest

os.environ.setdefault('MUJOCO_GL', 'egl')


@pytest.fixture(autouse=True, scope='session')
def _torch_threads():
    import torch
    torch.set_num_threads(1)
    yield
