"""What a LeRobot pi0 / pi0.5 checkpoint's ``config.json`` says, and the model shapes it implies.

LeRobot saves a policy's configuration as a flat JSON object: ``type`` ('pi0' or 'pi05'), the Gemma variants of the
PaliGemma language model and of the action expert ('gemma_2b' = 2048 wide, 18 layers, MLP 16384; 'gemma_300m' =
1024 wide, 18 layers, MLP 4096; both 8 query heads, 1 K/V head of 256), ``input_features`` (cameras
``observation.images.*`` of type VISUAL, ``observation.state`` of type STATE), ``output_features`` (``action``),
``chunk_size`` (50), ``n_action_steps``, ``max_state_dim`` / ``max_action_dim`` (32: shorter vectors are zero-padded),
``num_inference_steps`` (10 Euler steps of the flow), ``image_resolution`` (224), ``tokenizer_max_length`` (48 for
pi0, 200 for pi0.5), ``normalization_mapping`` (VISUAL / STATE / ACTION -> IDENTITY, MEAN_STD, MIN_MAX,
QUANTILES, QUANTILE10) and, in newer LeRobot, ``action_feature_names`` (the dataset's action names). The vision
tower is always PaliGemma's SigLIP So400m/14 (1152 wide, 27 layers, 16 heads, MLP 4304).

Checkpoints written by this package for tests carry an extra ``specprune_architecture`` object that replaces the
variant table with explicit (small) sizes; LeRobot itself does not know that key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from specprune_ros.policy.errors import CheckpointError

POLICY_TYPES = ('pi0', 'pi05')
NORM_MODES = ('IDENTITY', 'MEAN_STD', 'MIN_MAX', 'QUANTILES', 'QUANTILE10')
VOCAB_SIZE = 257152                      # PaliGemma's Gemma vocabulary (256000 + 1024 location + 128 segmentation)
IMAGE_PREFIX = 'observation.images.'
EMPTY_CAMERA = 'empty_camera_'
STATE_KEY = 'observation.state'
ACTION_KEY = 'action'


@dataclass(frozen=True)
class GemmaShape:
    """One Gemma decoder (the PaliGemma language model or the action expert)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256


@dataclass(frozen=True)
class VisionShape:
    """PaliGemma's SigLIP vision tower."""

    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    patch_size: int = 14


GEMMA_VARIANTS = {
    'gemma_2b': GemmaShape(width=2048, depth=18, mlp_dim=16384),
    'gemma_300m': GemmaShape(width=1024, depth=18, mlp_dim=4096),
}


@dataclass(frozen=True)
class Pi0Config:
    """The fields of a LeRobot pi0 / pi0.5 ``config.json`` this package uses."""

    policy_type: str = 'pi0'
    vlm: GemmaShape = GEMMA_VARIANTS['gemma_2b']
    expert: GemmaShape = GEMMA_VARIANTS['gemma_300m']
    vision: VisionShape = VisionShape()
    vocab_size: int = VOCAB_SIZE
    image_features: tuple[str, ...] = ('observation.images.base_0_rgb',)
    state_dim: int = 32
    action_dim: int = 32
    chunk_size: int = 50
    n_action_steps: int = 50
    max_state_dim: int = 32
    max_action_dim: int = 32
    num_inference_steps: int = 10
    min_period: float = 4e-3
    max_period: float = 4.0
    image_resolution: int = 224
    empty_cameras: int = 0
    tokenizer_max_length: int = 48
    action_names: tuple[str, ...] = ()      # per action dimension (LeRobot's ``action_feature_names``), if saved
    normalization: dict[str, str] = field(default_factory=lambda: {'VISUAL': 'IDENTITY', 'STATE': 'MEAN_STD',
                                                                   'ACTION': 'MEAN_STD'})

    @property
    def is_pi05(self) -> bool:
        return self.policy_type == 'pi05'

    @property
    def camera_names(self) -> tuple[str, ...]:
        """Camera names without the ``observation.images.`` prefix, in the checkpoint's order."""
        return tuple(name[len(IMAGE_PREFIX):] if name.startswith(IMAGE_PREFIX) else name
                     for name in self.image_features)

    @property
    def patches_per_side(self) -> int:
        return self.image_resolution // self.vision.patch_size

    @property
    def tokens_per_image(self) -> int:
        return self.patches_per_side ** 2


def _shape(value: Any, key: str) -> Optional[list[int]]:
    if not isinstance(value, dict):
        return None
    shape = value.get('shape')
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) for s in shape):
        raise CheckpointError(f'{key}: feature without an integer shape list')
    return list(shape)


def _features(config: dict, name: str) -> dict:
    value = config.get(name, {}) or {}
    if not isinstance(value, dict):
        raise CheckpointError(f'{name} must be an object of features')
    return value


def _gemma(value: Any, name: str) -> GemmaShape:
    if isinstance(value, str):
        if value not in GEMMA_VARIANTS:
            raise CheckpointError(f'{name}: unknown Gemma variant {value!r}; known: {sorted(GEMMA_VARIANTS)}')
        return GEMMA_VARIANTS[value]
    if isinstance(value, dict):
        try:
            return GemmaShape(**value)
        except TypeError as error:
            raise CheckpointError(f'{name}: {error}') from error
    raise CheckpointError(f'{name}: expected a variant name or an object of sizes, got {value!r}')


def parse_config(config: Any) -> Pi0Config:
    """A :class:`Pi0Config` from the parsed ``config.json``; raises :class:`CheckpointError` naming the field."""
    if not isinstance(config, dict):
        raise CheckpointError('not a JSON object')
    policy_type = config.get('type')
    if policy_type not in POLICY_TYPES:
        raise CheckpointError(f'type {policy_type!r} is not one of {POLICY_TYPES}')
    defaults = Pi0Config(policy_type=policy_type,
                         tokenizer_max_length=200 if policy_type == 'pi05' else 48,
                         normalization=({'VISUAL': 'IDENTITY', 'STATE': 'QUANTILES', 'ACTION': 'QUANTILES'}
                                        if policy_type == 'pi05' else Pi0Config().normalization))
    if config.get('use_relative_actions'):
        raise CheckpointError('use_relative_actions is true: actions relative to the state are not supported')
    custom = config.get('specprune_architecture') or {}
    if not isinstance(custom, dict):
        raise CheckpointError('specprune_architecture must be an object')
    vlm = _gemma(custom.get('vlm', config.get('paligemma_variant', 'gemma_2b')), 'paligemma_variant')
    expert = _gemma(custom.get('expert', config.get('action_expert_variant', 'gemma_300m')), 'action_expert_variant')
    if vlm.head_dim != expert.head_dim or vlm.num_heads != expert.num_heads or vlm.depth != expert.depth:
        raise CheckpointError('the action expert must match the language model in depth, heads and head size '
                              '(they share attention per layer)')
    try:
        vision = VisionShape(**custom['vision']) if 'vision' in custom else VisionShape()
    except TypeError as error:
        raise CheckpointError(f'specprune_architecture.vision: {error}') from error

    inputs, outputs = _features(config, 'input_features'), _features(config, 'output_features')
    images = tuple(k for k, v in inputs.items() if isinstance(v, dict) and v.get('type') == 'VISUAL'
                   and not k.startswith(IMAGE_PREFIX + EMPTY_CAMERA))     # LeRobot's always-masked placeholders
    max_state = int(config.get('max_state_dim', defaults.max_state_dim))
    max_action = int(config.get('max_action_dim', defaults.max_action_dim))
    state = _shape(inputs.get(STATE_KEY), STATE_KEY)
    action = _shape(outputs.get(ACTION_KEY), ACTION_KEY)
    resolution = config.get('image_resolution', [defaults.image_resolution] * 2)
    if (not isinstance(resolution, (list, tuple)) or len(resolution) != 2 or resolution[0] != resolution[1]
            or not isinstance(resolution[0], int)):
        raise CheckpointError(f'image_resolution must be a square [size, size], got {resolution!r}')
    normalization = dict(defaults.normalization)
    mapping = config.get('normalization_mapping') or {}
    if not isinstance(mapping, dict):
        raise CheckpointError('normalization_mapping must be an object')
    for kind, mode in mapping.items():
        if mode not in NORM_MODES:
            raise CheckpointError(f'normalization_mapping.{kind}: {mode!r} is not one of {NORM_MODES}')
        normalization[kind] = mode
    names = config.get('action_feature_names') or ()
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise CheckpointError('action_feature_names must be a list of names')
    empty = int(config.get('empty_cameras', 0))
    if not images:
        raise CheckpointError('input_features name no camera (observation.images.*)')
    parsed = dataclasses.replace(
        defaults, vlm=vlm, expert=expert, vision=vision,
        vocab_size=int(custom.get('vocab_size', VOCAB_SIZE)), image_features=images,
        state_dim=state[0] if state else max_state, action_dim=action[0] if action else max_action,
        chunk_size=int(config.get('chunk_size', defaults.chunk_size)),
        n_action_steps=int(config.get('n_action_steps', defaults.n_action_steps)),
        max_state_dim=max_state, max_action_dim=max_action,
        num_inference_steps=int(config.get('num_inference_steps', defaults.num_inference_steps)),
        min_period=float(config.get('min_period', defaults.min_period)),
        max_period=float(config.get('max_period', defaults.max_period)),
        image_resolution=int(resolution[0]), empty_cameras=empty,
        tokenizer_max_length=int(config.get('tokenizer_max_length', defaults.tokenizer_max_length)),
        action_names=tuple(names), normalization=normalization)
    if parsed.state_dim > max_state or parsed.action_dim > max_action:
        raise CheckpointError(f'state ({parsed.state_dim}) / action ({parsed.action_dim}) wider than max_state_dim '
                              f'({max_state}) / max_action_dim ({max_action})')
    if parsed.action_names and len(parsed.action_names) != parsed.action_dim:
        raise CheckpointError(f'action_feature_names has {len(parsed.action_names)} names for {parsed.action_dim} '
                              'action dimensions')
    if not 1 <= parsed.n_action_steps <= parsed.chunk_size or parsed.num_inference_steps < 1:
        raise CheckpointError('need 1 <= n_action_steps <= chunk_size and num_inference_steps >= 1')
    if parsed.image_resolution % vision.patch_size:
        raise CheckpointError(f'image_resolution {parsed.image_resolution} is not a multiple of the patch size '
                              f'{vision.patch_size}')
    return parsed
