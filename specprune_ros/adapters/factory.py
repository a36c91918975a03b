"""Build OpenVLA / OpenVLA-OFT adapters from a checkpoint directory and put them behind the ``Policy`` interface.

``load_adapter_policy(directory, ...)`` reads a checkpoint in its published layout, picks the adapter (by the files:
an ``action_head--*checkpoint.pt`` makes it OpenVLA-OFT) and pairs it with a pruning method from the registry.

Robot-side options the checkpoint cannot know (which dataset statistics to un-normalise with, camera names, centre
crop, gripper convention, control period) come from keyword arguments or, when the caller (the ROS node's
``load_policy``) cannot pass them, from ``specprune_adapter.json`` in the checkpoint directory; arguments win.

Actions: ``PolicyOutput.actions`` are the **un-normalised** actions in the dataset's units (LIBERO: the controller's
normalised delta commands in [-1, 1]); ``info['normalized_actions']`` holds the model's [-1, 1] output.
``gripper='libero'`` applies the LIBERO evaluation's gripper convention (binarise, -1 = open, +1 = close).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

from specprune_ros.adapters.openvla import OpenVLAAdapter
from specprune_ros.adapters.openvla_oft import OpenVLAOFTAdapter
from specprune_ros.adapters.actions import resolve_unnorm_key
from specprune_ros.adapters.published_checkpoint import (OPTIONS_FILE, _read_json, check_checkpoint_directory,
                                                         detect_kind, read_checkpoint)
from specprune_ros.core.dataclass_mapping import UnknownFieldsError, check_number, check_types, dataclass_from_mapping
from specprune_ros.policy.errors import CheckpointError
from specprune_ros.policy.interface import ActionSpec, check_action_units
from specprune_ros.policy.prunable_policy import PrunablePolicy
from specprune_ros.pruning import build_method

Adapter = Union[OpenVLAAdapter, OpenVLAOFTAdapter]


@dataclass
class AdapterOptions:
    """Robot-side settings of an adapter (fields of ``specprune_adapter.json``), types and ranges checked."""

    strict_types: ClassVar[bool] = True       # "false" is no bool here: a truthy string would switch a crop on

    unnorm_key: Optional[str] = None          # dataset statistics key (None: the only one in the checkpoint)
    camera_names: Optional[list[str]] = None  # default: ['agentview'] (OpenVLA), ['agentview', 'wrist'] (OFT)
    num_images: Optional[int] = None          # OFT: cameras in the input (default: len(camera_names) or 2)
    chunk_size: Optional[int] = None          # OFT: NUM_ACTIONS_CHUNK the head was trained with (default LIBERO's 8)
    proprio: Optional[bool] = None            # OFT: false = trained without proprio (no proprio_projector file)
    center_crop: Optional[bool] = None        # default: True for OFT (LIBERO fine-tunes), False for OpenVLA
    normalization: Optional[Literal['bounds_q99', 'bounds']] = None   # default 'bounds_q99'; ALOHA: 'bounds'
    gripper: Literal['none', 'libero'] = 'none'
    lowercase_instruction: bool = True
    prompt_template: Optional[str] = None
    attn_implementation: Literal['sdpa', 'eager'] = 'sdpa'   # transformers' reference path only (the executor: SDPA)
    control_period_s: float = 0.1
    translation_scale_m: float = 0.02
    rotation_scale_rad: float = 0.2
    cuda_graphs: bool = False                 # on CUDA: vision and decoder layers replayed as CUDA graphs

    def __post_init__(self) -> None:
        check_types(self)
        names = self.camera_names
        if names is not None and (not names or not all(names) or len(set(names)) != len(names)):
            raise ValueError(f'camera_names: one non-empty name per camera, no duplicates, got {names}')
        if self.num_images is not None:
            check_number('num_images', self.num_images, 1, integer=True, note='cameras in the input')
        if self.chunk_size is not None:
            check_number('chunk_size', self.chunk_size, 1, integer=True, note='action steps per chunk')
        check_action_units(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = 'options') -> 'AdapterOptions':
        try:
            return dataclass_from_mapping(cls, values, what='adapter option(s)')
        except UnknownFieldsError as error:
            raise ValueError(f'{source}: {error}') from None


def read_options(directory: str | Path, overrides: Optional[dict[str, Any]] = None) -> AdapterOptions:
    """``specprune_adapter.json`` of the checkpoint (if any) updated with ``overrides`` (None values ignored)."""
    directory = check_checkpoint_directory(directory)
    values = _read_json(directory, OPTIONS_FILE, required=False) or {}
    if not isinstance(values, dict):
        raise CheckpointError(f'checkpoint {directory}: malformed {OPTIONS_FILE}: not a JSON object')
    try:
        options = AdapterOptions.from_dict(values, source=str(directory / OPTIONS_FILE))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f'checkpoint {directory}: malformed {OPTIONS_FILE}: {error}') from error
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    return dataclasses.replace(options, **changes) if changes else options


# OpenVLA-OFT's per-platform constants other than LIBERO's defaults (its prismatic/vla/constants.py), by the words
# its dataset statistics keys carry: a checkpoint of these platforms run with LIBERO's chunk length or
# normalisation gives actions from a sequence it was never trained on
OFT_PLATFORM_OPTIONS = {'aloha': {'chunk_size': 25, 'normalization': 'bounds'}, 'bridge': {'chunk_size': 5}}
OFT_DEFAULTS = {'chunk_size': 8, 'normalization': 'bounds_q99'}


def check_platform_options(directory: str | Path, options: AdapterOptions) -> None:
    """Refuse (CheckpointError) an ALOHA / Bridge OFT checkpoint whose chunk length or normalisation is defaulted."""
    unset = [name for name in OFT_DEFAULTS if getattr(options, name) is None]
    if not unset:
        return
    key = resolve_unnorm_key(read_checkpoint(directory, kind='openvla-oft').norm_stats, options.unnorm_key)
    for platform, settings in OFT_PLATFORM_OPTIONS.items():
        needed = {name: value for name, value in settings.items() if name in unset}
        if platform in key.lower() and needed:
            raise CheckpointError(
                f'checkpoint {directory}: dataset statistics {key!r} are of an {platform} fine-tune; set '
                + ', '.join(f'"{name}" ({platform} fine-tunes use {value!r})' for name, value in needed.items())
                + f' in {OPTIONS_FILE}: the defaults are LIBERO\'s ({OFT_DEFAULTS})')


def load_adapter(directory: str | Path, kind: Optional[str] = None, device: str = 'auto',
                 dtype: str = 'auto', options: Optional[AdapterOptions] = None) -> Adapter:
    """The adapter of a checkpoint directory (``kind`` None = detect from the files)."""
    kind = kind or detect_kind(directory)
    options = options or read_options(directory)
    if kind == 'openvla-oft':
        check_platform_options(directory, options)
    units = ActionSpec(translation_scale_m=options.translation_scale_m, rotation_scale_rad=options.rotation_scale_rad,
                       control_period_s=options.control_period_s)
    common = dict(device=device, dtype=dtype, unnorm_key=options.unnorm_key, center_crop=options.center_crop,
                  attn_implementation=options.attn_implementation,
                  normalization=options.normalization or OFT_DEFAULTS['normalization'],
                  lowercase_instruction=options.lowercase_instruction, camera_names=options.camera_names,
                  gripper=options.gripper, action_units=units)
    if options.prompt_template:
        common['prompt_template'] = options.prompt_template
    if kind == 'openvla':
        adapter = OpenVLAAdapter.load(directory, **common)
    elif kind == 'openvla-oft':
        num_images = options.num_images or (len(options.camera_names) if options.camera_names else 2)
        adapter = OpenVLAOFTAdapter.load(directory, num_images=num_images,
                                         chunk_size=options.chunk_size or OFT_DEFAULTS['chunk_size'],
                                         proprio=options.proprio, **common)
    else:
        raise ValueError(f"kind must be 'openvla' or 'openvla-oft', got {kind!r}")
    adapter.use_cuda_graphs(options.cuda_graphs)
    return adapter


def load_adapter_policy(directory: str | Path, kind: Optional[str] = None, method: str = 'none',
                        method_config: Optional[dict] = None, device: str = 'auto', dtype: str = 'auto',
                        unnorm_key: Optional[str] = None, seed: int = 0, **options: Any) -> PrunablePolicy:
    """A ready ``Policy`` for an OpenVLA / OpenVLA-OFT checkpoint directory.

    ``kind``: 'openvla', 'openvla-oft' or None (detect). ``method`` / ``method_config``: a pruning method of
    ``specprune_ros.pruning`` (``build_method``). ``device``: 'auto', 'cpu', 'cuda', 'cuda:N'; ``dtype``: 'auto'
    (bf16 on CUDA, fp32 on CPU), 'float32', 'bfloat16', 'float16'. Further keyword arguments are
    :class:`AdapterOptions` fields; they override ``specprune_adapter.json``.
    """
    opts = read_options(directory, {**options, 'unnorm_key': unnorm_key})
    adapter = load_adapter(directory, kind=kind, device=device, dtype=dtype, options=opts)
    return PrunablePolicy(adapter, build_method(method, method_config, seed=seed))
