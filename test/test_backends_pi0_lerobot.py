"""Opt-in: pi0 / pi0.5 against LeRobot's own implementation on the same tiny checkpoint and the same noise.

LeRobot (0.5+ for transformers 5; Python >= 3.12, torch < 2.12) cannot share this package's environment, so it
runs in its own: set ``SPECPRUNE_LEROBOT_PYTHON`` to that environment's python, e.g.::

    python3.12 -m venv /opt/lerobot-venv && /opt/lerobot-venv/bin/pip install 'lerobot[pi]==0.6.1'
    SPECPRUNE_LEROBOT_PYTHON=/opt/lerobot-venv/bin/python python -m pytest test/test_backends_pi0_lerobot.py -s

The helper ``lerobot_pi0_parity.py`` builds LeRobot's model at the tiny sizes, loads the checkpoint strictly
(checking every tensor), pre-processes the same camera frames (96 x 128: resized with padding) and samples a chunk
from the prompt ids, normalised state and noise this package prepared; the chunks must agree to float32 precision.
"""
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from specprune_ros.adapters.pi0.checkpoint import load_checkpoint
from specprune_ros.adapters.pi0.inference import Pi0Inference
from specprune_ros.adapters.pi0.tiny import write_tiny_checkpoint

PYTHON = os.environ.get('SPECPRUNE_LEROBOT_PYTHON', '')
pytestmark = pytest.mark.skipif(not PYTHON or not Path(PYTHON).is_file(),
                                reason='opt-in: set SPECPRUNE_LEROBOT_PYTHON to the python of an environment with '
                                       "lerobot[pi] installed (see this module's docstring)")
SCRIPT = Path(__file__).with_name('lerobot_pi0_parity.py')
INSTRUCTION = 'put the cream cheese in the bowl'


@pytest.mark.parametrize('kind, cameras', [('pi0', 2), ('pi05', 2), ('pi0', 1)])
def test_same_chunk_as_lerobot(kind, cameras, tmp_path):
    """With one camera the checkpoint's second camera is absent: LeRobot masks it, this package leaves it out."""
    directory = write_tiny_checkpoint(tmp_path / kind, kind, seed=3)
    model = Pi0Inference(load_checkpoint(directory), torch.device('cpu'), torch.float32)
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8) for _ in range(2)]
    robot_state = rng.normal(size=8).astype(np.float32)
    frames = frames[:cameras]
    inp = model.encode(dict(zip(model.config.camera_names, frames)), INSTRUCTION, robot_state)
    noise = model.sample_noise()
    ours, _, _ = model.run(inp, None, None, noise)
    state = model.normalized_state(robot_state)
    ids = model.prompt(INSTRUCTION, state).ids
    length = model.config.tokenizer_max_length
    tokens = np.zeros(length, np.int64)
    tokens[:len(ids)] = ids
    inputs, output = tmp_path / 'inputs.npz', tmp_path / 'lerobot.npz'
    np.savez(inputs, frames=np.stack(frames), tokens=tokens, token_mask=np.arange(length) < len(ids), state=state,
             noise=noise.numpy())
    run = subprocess.run([PYTHON, str(SCRIPT), str(directory), str(inputs), str(output)], capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = np.load(output)
    theirs = result['actions'][:, :ours.shape[1]]
    difference, scale = float(np.abs(theirs - ours).max()), float(np.abs(ours).max())
    print(f'\n{kind}, {cameras} camera(s): lerobot {result["lerobot"]} (transformers {result["transformers"]}, '
          f'torch {result["torch"]}): max |ours - lerobot| = {difference:.2e}, max |action| = {scale:.2f}')
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-4 * max(1.0, scale))
