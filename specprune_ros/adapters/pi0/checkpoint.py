"""Load a LeRobot pi0 / pi0.5 checkpoint directory without LeRobot.

Layout of ``lerobot/pi0_base``, ``lerobot/pi05_base`` and ``lerobot/pi05_libero``.

Files: ``config.json`` (see ``configuration``), ``model.safetensors`` (or shards with
``model.safetensors.index.json``), ``policy_preprocessor.json`` / ``policy_postprocessor.json`` with the
normaliser's ``.safetensors`` statistics (see ``processing``), and a Gemma tokenizer (see
``processing.load_tokenizer``). Every error names the file at fault.

Parameter names are LeRobot's (``model.paligemma_with_expert...``); as LeRobot's own loader does, the PaliGemma
``lm_head`` stands in for the tied token embedding when the embedding is absent, ``time_mlp_*`` of openpi-converted
pi0 files is read as ``action_time_mlp_*``, and the unused language-model heads are ignored. SigLIP's parameters
may be stored with transformers 4's ``vision_tower.vision_model.`` prefix or transformers 5's ``vision_tower.``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from specprune_ros.adapters.published_checkpoint import (CONFIG_FILE, _read_json, _weight_map, assert_materialised,
                                                         assign_state, check_checkpoint_directory, read_state)
from specprune_ros.adapters.pi0.configuration import POLICY_TYPES, Pi0Config, parse_config
from specprune_ros.adapters.pi0.modeling import Pi0Model
from specprune_ros.adapters.pi0.processing import Normalization, load_tokenizer
from specprune_ros.policy.errors import CheckpointError

_VISION_OLD = 'paligemma_with_expert.paligemma.model.vision_tower.vision_model.'
_VISION_NEW = 'paligemma_with_expert.paligemma.model.vision_tower.'
_EMBED = 'paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight'
_TIED_HEAD = 'paligemma_with_expert.paligemma.lm_head.weight'


def is_pi0_directory(directory: str | Path) -> bool:
    """True when ``directory/config.json`` is a LeRobot pi0 / pi0.5 config (by its ``type``)."""
    directory = Path(directory).expanduser()
    try:
        config = _read_json(directory, CONFIG_FILE, required=False)
    except CheckpointError:
        return False
    return isinstance(config, dict) and config.get('type') in POLICY_TYPES


def read_config(directory: Path) -> Pi0Config:
    try:
        return parse_config(_read_json(directory, CONFIG_FILE))
    except CheckpointError as error:
        if str(error).startswith('checkpoint '):
            raise
        raise CheckpointError(f'checkpoint {directory}: malformed {CONFIG_FILE}: {error}') from error


def lerobot_name(key: str, config: Pi0Config) -> Optional[str]:
    """This package's parameter name for a key of a LeRobot file (None: not used)."""
    if key.startswith('model.'):
        key = key[len('model.'):]
    if key.endswith('lm_head.weight') and key != _TIED_HEAD:
        return None
    if key.startswith(_VISION_OLD):
        key = _VISION_NEW + key[len(_VISION_OLD):]
    if not config.is_pi05 and key.startswith(('time_mlp_in.', 'time_mlp_out.')):
        key = 'action_' + key
    return key


def map_state(raw: dict[str, torch.Tensor], config: Pi0Config) -> dict[str, torch.Tensor]:
    state = {}
    for key, tensor in raw.items():
        name = lerobot_name(key, config)
        if name is not None:
            state[name] = tensor
    head = state.pop(_TIED_HEAD, None)
    if _EMBED not in state and head is not None:
        state[_EMBED] = head
    return state


@dataclass
class Pi0Checkpoint:
    directory: Path
    config: Pi0Config
    model: Pi0Model
    normalization: Normalization
    tokenizer: Any


def load_checkpoint(directory: str | Path, device: torch.device | str = 'cpu', dtype: torch.dtype = torch.float32,
                    tokenizer: Optional[str | Path] = None) -> Pi0Checkpoint:
    """Read everything of a pi0 / pi0.5 checkpoint directory and build the model on ``device`` in ``dtype``."""
    directory = check_checkpoint_directory(directory)
    config = read_config(directory)
    normalization = Normalization.read(directory, config.state_dim, config.action_dim, config.normalization)
    tok = load_tokenizer(directory, tokenizer)
    files = _weight_map(directory)
    raw = read_state(files, device=device, dtype=dtype, directory=directory)
    state = map_state(raw, config)
    names = sorted({p.name for p in files.values()})
    source = names[0] if len(names) == 1 else f'the weights ({", ".join(names)})'
    with torch.device('meta'):
        model = Pi0Model(config)
    by_name = {lerobot_name(k, config): f for k, f in files.items()}
    assign_state(model, state, source, directory, {k: v for k, v in by_name.items() if k})
    model.restore_buffers(device)
    assert_materialised(model, f'checkpoint {directory}')
    return Pi0Checkpoint(directory=directory, config=config, model=model.eval(), normalization=normalization,
                         tokenizer=tok)
