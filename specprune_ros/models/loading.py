"""Build a ready-to-run policy by name.

The trained reference VLA, a tiny random one, or a checkpoint directory (the reference VLA's, a published OpenVLA /
OpenVLA-OFT one, or a LeRobot pi0 / pi0.5 one).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from specprune_ros.adapters.base import resolve_device
from specprune_ros.adapters.factory import load_adapter_policy
from specprune_ros.adapters.pi0.backend import load_pi0_policy
from specprune_ros.adapters.pi0.checkpoint import is_pi0_directory
from specprune_ros.adapters.published_checkpoint import check_checkpoint_directory, detect_kind
from specprune_ros.policy.interface import Policy
from specprune_ros.policy.reference_backend import reference_policy
from specprune_ros.policy.reference_checkpoint import load_checkpoint, read_config
from specprune_ros.policy.reference_vla import ReferenceVLA, ReferenceVLAConfig
from specprune_ros.pruning import build_method

REFERENCE_CHECKPOINT = Path(__file__).resolve().parent.parent / 'assets' / 'reference_vla'
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def tiny_random_config(vocabulary: tuple[str, ...] = ()) -> ReferenceVLAConfig:
    """A small random-initialised reference VLA with the real interface (plumbing tests, shape tests)."""
    if not vocabulary:
        # imported here: the simulator package loads MuJoCo, which a robot running a checkpoint does not need
        from specprune_ros.sim.vocab import VOCABULARY
        vocabulary = VOCABULARY
    return ReferenceVLAConfig(vocabulary=vocabulary, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                              mlp_size=128, head_hidden=64)


def load_model(model: str, device: str = 'cpu', dtype: str = 'float32', seed: int = 0) -> ReferenceVLA:
    """'reference' (the committed trained checkpoint), 'tiny-random', or a checkpoint directory."""
    if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {dtype!r}')
    device = str(resolve_device(device))       # 'cuda' without CUDA: a clear error, not torch's assertion
    directory = None
    if model != 'tiny-random':      # a wrong path is the error to report first, whatever the dtype
        directory = check_checkpoint_directory(REFERENCE_CHECKPOINT if model == 'reference' else model)
        read_config(directory)
    if dtype != 'float32':      # its heads, normalisers and patch statistics are float32 arithmetic
        raise ValueError(f"the reference VLA ({model!r}) runs in float32 only, got dtype {dtype!r}; bfloat16 and "
                         'float16 are for published checkpoints (OpenVLA, OpenVLA-OFT, pi0)')
    if directory is None:
        torch.manual_seed(seed)
        return ReferenceVLA(tiny_random_config()).to(device=device, dtype=DTYPES[dtype]).eval()
    return load_checkpoint(directory, device=device, dtype=DTYPES[dtype])


def load_policy(model: str, method: str = 'none', method_config: Optional[dict] = None, device: str = 'cpu',
                dtype: str = 'float32', seed: int = 0) -> Policy:
    """A policy ready for ``predict``: the model plus the named pruning method (see ``specprune_ros.pruning``).

    ``model`` may also be a published OpenVLA / OpenVLA-OFT checkpoint directory (see ``specprune_ros.adapters``) or a
    LeRobot pi0 / pi0.5 one (see ``specprune_ros.adapters.pi0``).
    """
    kind = published_kind(model)
    if kind == 'pi0':
        return load_pi0_policy(Path(model).expanduser(), method=method, method_config=method_config, device=device,
                               dtype=dtype, seed=seed)
    if kind is not None:
        return load_adapter_policy(Path(model).expanduser(), kind=kind, method=method, method_config=method_config,
                                   device=device, dtype=dtype, seed=seed)
    vla = load_model(model, device=device, dtype=dtype, seed=seed)
    return reference_policy(vla, build_method(method, method_config, seed=seed))


def published_kind(model: str) -> Optional[str]:
    """'openvla' / 'openvla-oft' / 'pi0' when ``model`` is a directory holding such a checkpoint, else None.

    'pi0' stands for LeRobot's pi0 or pi0.5; the kind is judged by the directory's ``config.json``. With None the
    reference VLA path handles ``model``, and its errors (e.g. a missing directory). A directory with signs of
    OpenVLA-OFT but no loadable action head raises :class:`CheckpointError` (see ``detect_kind``).
    """
    if model in ('reference', 'tiny-random'):
        return None
    directory = Path(model).expanduser()
    if not (directory / 'config.json').is_file():
        return None
    if is_pi0_directory(directory):
        return 'pi0'
    kind = detect_kind(directory)
    return None if kind == 'reference' else kind
