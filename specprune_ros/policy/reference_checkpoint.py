"""Save and load reference-VLA checkpoints: a directory with ``config.json`` and ``model.safetensors``."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from specprune_ros.policy.errors import CheckpointError
from specprune_ros.policy.reference_vla import ReferenceVLA, ReferenceVLAConfig

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'


def save_checkpoint(model: ReferenceVLA, directory: str | Path, extra: dict | None = None) -> Path:
    """Write config.json (+ ``extra`` metadata such as training facts) and model.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {'architecture': 'specprune_ros.ReferenceVLA', 'config': model.config.to_dict(), **(extra or {})}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    return directory


# Config options added after checkpoints existed: a config.json without them was saved by a model without them.
OPTIONS_ABSENT_FROM_OLDER_CHECKPOINTS = {'pointing_marker': False, 'blind_proprio': ()}


def read_config(directory: str | Path) -> tuple[ReferenceVLAConfig, dict]:
    """The model config and the whole metadata dict of a checkpoint directory."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f'checkpoint {directory}: missing {CONFIG_FILE}')
    try:
        meta = json.loads(path.read_text())
        return ReferenceVLAConfig(**{**OPTIONS_ABSENT_FROM_OLDER_CHECKPOINTS, **meta['config']}), meta
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f'checkpoint {directory}: malformed {CONFIG_FILE}: {error}') from error


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory's model.safetensors."""
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f'checkpoint {directory}: missing {WEIGHTS_FILE}')
    try:
        return load_file(str(weights))
    except Exception as error:  # safetensors raises its own error types (truncated file, LFS pointer, ...)
        raise CheckpointError(f'checkpoint {directory}: malformed {WEIGHTS_FILE} ({weights}): {error}') from error


def load_checkpoint(directory: str | Path, device: str = 'cpu', dtype: torch.dtype = torch.float32) -> ReferenceVLA:
    """Build the model from config.json and load model.safetensors (strict: every weight must match)."""
    config, _ = read_config(directory)
    try:
        model = ReferenceVLA(config)
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as error:   # e.g. a string or zero size
        raise CheckpointError(f'checkpoint {directory}: malformed {CONFIG_FILE}: {error}') from error
    weights = read_weights(directory)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f'checkpoint {directory}: {WEIGHTS_FILE} does not fit config.json: {error}') from error
    return model.to(device=device, dtype=dtype).eval()


def warm_start(model: ReferenceVLA, directory: str | Path) -> list[str]:
    """Load a checkpoint's weights into a model that may have more modules (e.g. FiLM added since).

    Weights the checkpoint lacks keep their initialisation and are returned by name; a weight the model
    lacks, or one of another shape, is an error, since then the checkpoint is not an ancestor of the model.
    """
    state = read_weights(directory)
    own = model.state_dict()
    wrong = [name for name, tensor in state.items() if name not in own or own[name].shape != tensor.shape]
    if wrong:
        raise CheckpointError(f'checkpoint {directory}: weights that do not fit the model: {wrong[:5]}')
    missing = model.load_state_dict(state, strict=False).missing_keys
    return list(missing)
