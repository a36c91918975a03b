r"""Observation and action processing of LeRobot's pi0 / pi0.5: images, prompt, state and action normalisation.

* Images: RGB uint8 (H, W, 3) of any size are resized without distortion (bilinear) to fit the checkpoint's square
  resolution (224) and padded with black, then scaled to [-1, 1] (SigLIP's input range).
* Prompt: pi0: ``task + "\n"``; pi0.5: ``"Task: {task}, State: {s_1 ... s_n};\nAction: "`` with the normalised
  state (its n = ``state_dim`` values, not the zero padding the action expert gets: as LeRobot 0.5+ and openpi)
  discretised into 256 bins of [-1, 1]. Gemma tokenizer with BOS, cut at
  ``tokenizer_max_length`` (LeRobot pads to it and masks the padding out; dropping it is the same computation).
* Normalisation: the statistics and modes of the checkpoint's ``policy_preprocessor.json`` (its
  ``normalizer_processor`` step and that step's ``.safetensors``) and ``policy_postprocessor.json``
  (``unnormalizer_processor``); keys ``observation.state.{mean,std,min,max,q01,q99,q10,q90}`` and ``action.*``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from specprune_ros.adapters.published_checkpoint import _read_json
from specprune_ros.adapters.pi0.configuration import ACTION_KEY, STATE_KEY
from specprune_ros.policy.errors import CheckpointError

PREPROCESSOR_FILE = 'policy_preprocessor.json'
POSTPROCESSOR_FILE = 'policy_postprocessor.json'
NORMALIZER_STEP = 'normalizer_processor'
UNNORMALIZER_STEP = 'unnormalizer_processor'
STATE_BINS = 256
EPS = 1e-8
NORM_STATS = {'MEAN_STD': ('mean', 'std'), 'MIN_MAX': ('min', 'max'), 'QUANTILES': ('q01', 'q99'),
              'QUANTILE10': ('q10', 'q90'), 'IDENTITY': ()}


def resize_with_pad(frame: np.ndarray, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """(H, W, 3) uint8 -> ((3, size, size) float32 in [-1, 1], the (size, size, 3) uint8 frame the model sees)."""
    image = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float() / 255.0
    height, width = image.shape[-2:]
    if (height, width) != (size, size):
        ratio = max(width / size, height / size)
        new_h, new_w = int(height / ratio), int(width / ratio)
        image = F.interpolate(image, size=(new_h, new_w), mode='bilinear', align_corners=False).clamp(0.0, 1.0)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        image = F.pad(image, (left, size - new_w - left, top, size - new_h - top), value=0.0)
    shown = (image[0].permute(1, 2, 0) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    return image[0] * 2.0 - 1.0, shown


def pad_vector(vector: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad the last dimension to ``size``."""
    vector = np.asarray(vector, dtype=np.float32)
    if vector.shape[-1] >= size:
        return vector
    return np.concatenate([vector, np.zeros((*vector.shape[:-1], size - vector.shape[-1]), np.float32)], axis=-1)


def discretise_state(state: np.ndarray, bins: int = STATE_BINS) -> np.ndarray:
    """pi0.5's discrete state tokens: the bin (0 .. bins - 1) of each normalised value in [-1, 1]."""
    edges = np.linspace(-1.0, 1.0, bins + 1)[:-1]
    return np.digitize(np.asarray(state, dtype=np.float64), bins=edges) - 1


def pi05_prompt(task: str, discrete_state: np.ndarray) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """(prompt, character span of the task, character span of the state numbers)."""
    cleaned = task.strip().replace('_', ' ').replace('\n', ' ')
    head = 'Task: '
    state = ' '.join(str(int(v)) for v in discrete_state)
    middle = ', State: '
    prompt = f'{head}{cleaned}{middle}{state};\nAction: '
    task_span = (len(head), len(head) + len(cleaned))
    state_start = task_span[1] + len(middle)
    return prompt, task_span, (state_start, state_start + len(state))


@dataclass
class FeatureStats:
    """Normalisation of one feature: the mode and its statistics (float32 vectors)."""

    mode: str
    stats: dict[str, np.ndarray] = field(default_factory=dict)

    def _pair(self) -> tuple[np.ndarray, np.ndarray]:
        low, high = NORM_STATS[self.mode]
        return self.stats[low], self.stats[high]

    def normalize(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float32)
        if self.mode == 'IDENTITY':
            return values
        a, b = self._pair()
        if self.mode == 'MEAN_STD':
            return (values - a) / (b + EPS)
        span = np.where(b - a == 0, EPS, b - a)
        return (2.0 * (values - a) / span - 1.0).astype(np.float32)

    def unnormalize(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float32)
        if self.mode == 'IDENTITY':
            return values
        a, b = self._pair()
        if self.mode == 'MEAN_STD':
            return (values * b + a).astype(np.float32)
        span = np.where(b - a == 0, EPS, b - a)
        return ((values + 1.0) * span / 2.0 + a).astype(np.float32)


def _step(directory: Path, pipeline_file: str, registry_name: str) -> tuple[dict, dict[str, np.ndarray], str]:
    """(config, statistics, statistics file name) of the named step of a LeRobot processor pipeline file."""
    pipeline = _read_json(directory, pipeline_file)
    steps = pipeline.get('steps') if isinstance(pipeline, dict) else None
    if not isinstance(steps, list):
        raise CheckpointError(f'checkpoint {directory}: malformed {pipeline_file}: no "steps" list')
    for step in steps:
        if isinstance(step, dict) and step.get('registry_name') == registry_name:
            break
    else:
        raise CheckpointError(f'checkpoint {directory}: {pipeline_file} has no {registry_name!r} step')
    config = step.get('config') or {}
    state_file = step.get('state_file')
    if not isinstance(state_file, str):
        raise CheckpointError(f'checkpoint {directory}: {pipeline_file}: the {registry_name} step names no state_file')
    path = directory / state_file
    if not path.is_file():
        raise CheckpointError(f'checkpoint {directory}: {state_file} (named by {pipeline_file}) is missing')
    try:
        from safetensors.numpy import load_file
        stats = {k: np.asarray(v, dtype=np.float32) for k, v in load_file(str(path)).items()}
    except Exception as error:
        raise CheckpointError(f'checkpoint {directory}: malformed {state_file}: {error}') from error
    return config, stats, state_file


def _feature(directory: Path, source: str, config: dict, stats: dict[str, np.ndarray], key: str, kind: str,
             default_mode: str, dim: int) -> FeatureStats:
    norm_map = config.get('norm_map') or {}
    mode = norm_map.get(kind, default_mode)
    if mode not in NORM_STATS:
        raise CheckpointError(f'checkpoint {directory}: {source}: unknown normalisation mode {mode!r} for {kind}')
    needed = NORM_STATS[mode]
    found = {name: stats[f'{key}.{name}'] for name in needed if f'{key}.{name}' in stats}
    missing = [name for name in needed if name not in found]
    if missing:
        raise CheckpointError(f'checkpoint {directory}: {source} lacks {key}.{missing[0]} needed by {mode}')
    for name, values in found.items():
        if values.shape != (dim,):
            raise CheckpointError(f'checkpoint {directory}: {source}: {key}.{name} has shape {values.shape}, '
                                  f'config.json says ({dim},)')
        if not np.isfinite(values).all():
            raise CheckpointError(f'checkpoint {directory}: {source}: {key}.{name} has non-finite values '
                                  f'{values.tolist()}')
    if mode == 'MEAN_STD':
        bad = np.flatnonzero(found['std'] < 0)
        if bad.size:
            raise CheckpointError(f'checkpoint {directory}: {source}: {key}.std is negative in dimension(s) '
                                  f'{bad.tolist()}')
    elif needed:
        low, high = needed
        bad = np.flatnonzero(found[high] < found[low])
        if bad.size:
            raise CheckpointError(f'checkpoint {directory}: {source}: {key}.{high} < {key}.{low} in dimension(s) '
                                  f'{bad.tolist()} (swapped bounds would mirror the output)')
    return FeatureStats(mode=mode, stats=found)


@dataclass
class Normalization:
    """State normalisation (pre-processor) and action un-normalisation (post-processor) of a checkpoint."""

    state: FeatureStats
    action: FeatureStats

    @classmethod
    def read(cls, directory: Path, state_dim: int, action_dim: int, defaults: dict[str, str]) -> 'Normalization':
        """The processors' own normalisation modes win over ``defaults`` (config.json's mapping), as in LeRobot."""
        config, stats, source = _step(directory, PREPROCESSOR_FILE, NORMALIZER_STEP)
        state = _feature(directory, source, config, stats, STATE_KEY, 'STATE', defaults.get('STATE', 'MEAN_STD'),
                         state_dim)
        config, stats, source = _step(directory, POSTPROCESSOR_FILE, UNNORMALIZER_STEP)
        action = _feature(directory, source, config, stats, ACTION_KEY, 'ACTION', defaults.get('ACTION', 'MEAN_STD'),
                          action_dim)
        return cls(state=state, action=action)


def load_tokenizer(directory: Path, tokenizer: Optional[str | Path] = None):
    """The Gemma (PaliGemma) tokenizer: from ``tokenizer`` (a directory) if given, else the checkpoint directory.

    LeRobot's checkpoints do not ship it (LeRobot downloads google/paligemma-3b-pt-224's); copy its
    ``tokenizer.json`` / ``tokenizer.model`` + ``tokenizer_config.json`` next to the checkpoint or pass the path.
    """
    from transformers import AutoTokenizer
    where = Path(tokenizer).expanduser() if tokenizer else directory
    if not any((where / name).is_file() for name in ('tokenizer.json', 'tokenizer.model')):
        raise CheckpointError(f'checkpoint {directory}: no tokenizer.json / tokenizer.model in {where}; LeRobot '
                              'checkpoints use the PaliGemma tokenizer (google/paligemma-3b-pt-224): copy its files '
                              'there or set the tokenizer option to their directory')
    try:
        return AutoTokenizer.from_pretrained(str(where), local_files_only=True)
    except Exception as error:
        raise CheckpointError(f'checkpoint {directory}: cannot load the tokenizer in {where}: {error}') from error


@dataclass
class EncodedPrompt:
    ids: list[int]                     # BOS first
    text: tuple[int, int]              # token span of the task
    state: tuple[int, int] = (0, 0)    # pi0.5: token span of the discrete state numbers
    truncated: bool = False


def encode_prompt(tokenizer: Any, prompt: str, max_length: int, text_chars: tuple[int, int],
                  state_chars: tuple[int, int] = (0, 0)) -> EncodedPrompt:
    """Tokenise with BOS, cut at ``max_length``; token spans of the given character spans."""
    encoded = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True)
    ids, offsets = list(encoded['input_ids']), list(encoded['offset_mapping'])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids, offsets = [bos] + ids, [(0, 0)] + offsets
    truncated = len(ids) > max_length
    ids, offsets = ids[:max_length], offsets[:max_length]

    def span(chars: tuple[int, int]) -> tuple[int, int]:
        start, end = chars
        inside = [i for i, (a, b) in enumerate(offsets) if i > 0 and b > a and b > start and a < end]
        return (inside[0], inside[-1] + 1) if inside and end > start else (0, 0)
    return EncodedPrompt(ids=ids, text=span(text_chars), state=span(state_chars), truncated=truncated)
