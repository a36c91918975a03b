"""pi0 / pi0.5 behind the model-backend contract (what ``PrunablePolicy``, the ROS node and the tools run).

Robot-side settings the checkpoint cannot know come from keyword arguments or ``specprune_adapter.json`` in the
checkpoint directory (arguments win): which robot camera feeds which checkpoint camera (``camera_map``; checkpoint
cameras left out are masked out, as LeRobot does for absent ones), where the PaliGemma tokenizer is, the flow's noise
seed, how the expert's action rows are summarised for pruning methods, the action space and the action units.

Actions: ``PolicyOutput.actions`` are the first ``n_action_steps`` rows of the chunk, un-normalised with the
post-processor's statistics (the dataset's units: joint positions or end-effector deltas, whatever the checkpoint
was trained on); ``info['normalized_actions']`` holds the model's normalised output. ``action_spec.action_space`` is
``action_space`` ('joint' unless set to 'ee_delta', as for LIBERO fine-tunes of 7-D end-effector deltas) and
``action_spec.action_names`` the checkpoint's ``action_feature_names`` (``action_names`` overrides them; neither:
``joint_0``, ``joint_1``, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np
import torch

from specprune_ros.adapters.pi0.checkpoint import load_checkpoint
from specprune_ros.adapters.pi0.inference import ACTION_ROWS, Pi0Inference, Pi0Input
from specprune_ros.adapters.base import resolve_device, resolve_dtype
from specprune_ros.adapters.published_checkpoint import OPTIONS_FILE, check_checkpoint_directory, _read_json
from specprune_ros.core.dataclass_mapping import UnknownFieldsError, check_types, dataclass_from_mapping
from specprune_ros.core.step_types import PruningMethod, StepContext
from specprune_ros.policy.backend import EncodedStep, ModelBackend, ModelOutput, camera_frames
from specprune_ros.policy.errors import CheckpointError, ObservationError
from specprune_ros.policy.interface import (ACTION_SPACES, ActionSpec, Observation, check_action_units,
                                            default_action_names)
from specprune_ros.policy.prunable_policy import PrunablePolicy
from specprune_ros.pruning import build_method


@dataclass
class Pi0Options:
    """Robot-side settings of a pi0 / pi0.5 backend (fields of ``specprune_adapter.json``), types and ranges checked."""

    strict_types: ClassVar[bool] = True

    camera_map: Optional[dict[str, str]] = None   # checkpoint camera -> observation camera (default: same names, all)
    tokenizer: Optional[str] = None               # directory of the PaliGemma tokenizer if the checkpoint has none
    noise_seed: int = 0                           # seed of the flow's noise (one draw per inference)
    action_rows: str = 'mean'                     # expert action rows for pruning methods: 'mean', 'first', 'last'
    control_period_s: float = 0.1                 # the rate the checkpoint was trained at
    action_space: str = 'joint'                   # 'joint' (joint targets) or 'ee_delta' (7-D end-effector deltas)
    action_names: Optional[list[str]] = None      # per action dimension (default: the checkpoint's names)
    translation_scale_m: float = 0.02             # end-effector delta action spaces only
    rotation_scale_rad: float = 0.2

    def __post_init__(self) -> None:
        check_types(self)
        cameras = self.camera_map
        if cameras is not None and not (isinstance(cameras, dict) and cameras and all(
                isinstance(k, str) and k and isinstance(v, str) and v for k, v in cameras.items())):
            raise ValueError(f'camera_map: checkpoint camera -> observation camera names, got {cameras!r}')
        check_action_units(self)
        if self.action_rows not in ACTION_ROWS:
            raise ValueError(f'action_rows must be one of {ACTION_ROWS}, got {self.action_rows!r}')
        if self.action_space not in ACTION_SPACES:
            raise ValueError(f'action_space must be one of {ACTION_SPACES}, got {self.action_space!r}')


def read_options(directory: Path, overrides: Optional[dict[str, Any]] = None) -> Pi0Options:
    """``specprune_adapter.json`` of the checkpoint (if any) updated with ``overrides`` (None values ignored)."""
    values = _read_json(directory, OPTIONS_FILE, required=False) or {}
    if not isinstance(values, dict):
        raise CheckpointError(f'checkpoint {directory}: malformed {OPTIONS_FILE}: not a JSON object')
    values = {**values, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    try:
        return dataclass_from_mapping(Pi0Options, values, what='pi0 option(s)')
    except (UnknownFieldsError, TypeError, ValueError) as error:
        raise CheckpointError(f'checkpoint {directory}: {OPTIONS_FILE} or arguments: {error}') from error


@dataclass
class Pi0Step(EncodedStep):
    """An encoded observation plus pi0's normalised, padded state (the expert's state token; None for pi0.5)."""

    state: Optional[torch.Tensor] = None


class Pi0Backend(ModelBackend):
    """A pi0 / pi0.5 checkpoint on the prunable executor (see ``inference``)."""

    def __init__(self, inference: Pi0Inference, options: Pi0Options = Pi0Options()) -> None:
        cfg = inference.config
        self.inference = inference
        self.name = cfg.policy_type
        mapping = options.camera_map or {name: name for name in cfg.camera_names}
        unknown = sorted(set(mapping) - set(cfg.camera_names))
        if unknown:
            raise ValueError(f'camera_map names unknown checkpoint camera(s) {unknown}; it has {cfg.camera_names}')
        self.checkpoint_cameras = tuple(name for name in cfg.camera_names if name in mapping)
        if not self.checkpoint_cameras:
            raise ValueError('camera_map maps no camera')
        self.camera_names = tuple(mapping[name] for name in self.checkpoint_cameras)
        self.image_size = (cfg.image_resolution, cfg.image_resolution)
        self.image_fit = 'pad'             # resize_with_pad: a non-square camera is not stretched
        self.proprio_dim = cfg.state_dim
        self.patch_size = cfg.vision.patch_size
        self.runner = inference.runner
        names = tuple(options.action_names or cfg.action_names
                      or default_action_names(cfg.action_dim, options.action_space))
        if len(names) != cfg.action_dim:
            raise ValueError(f'action_names has {len(names)} names for the checkpoint\'s {cfg.action_dim} actions')
        self.action_spec = ActionSpec(chunk_size=cfg.n_action_steps, action_dim=cfg.action_dim,
                                      translation_scale_m=options.translation_scale_m,
                                      rotation_scale_rad=options.rotation_scale_rad,
                                      control_period_s=options.control_period_s,
                                      action_space=options.action_space, action_names=names)

    def reset(self) -> None:
        """A new episode draws the flow's noise from ``noise_seed`` again: episodes are reproducible one by one."""
        self.inference.generator.manual_seed(self.inference.seed)

    def encode(self, observation: Observation) -> Pi0Step:
        frames = camera_frames(observation, self.camera_names)
        try:
            inp = self.inference.encode(dict(zip(self.checkpoint_cameras, frames)), observation.instruction,
                                        observation.proprio)
        except ValueError as error:
            raise ObservationError(str(error)) from error
        return Pi0Step(embeddings=inp.embeddings, layout=inp.layout, frames=inp.frames, info=dict(inp.info),
                       state=inp.state)

    def run(self, step: Pi0Step, method: Optional[PruningMethod], context: StepContext) -> ModelOutput:
        inp = Pi0Input(embeddings=step.embeddings, layout=step.layout, frames=step.frames, state=step.state)
        normalized, result, info = self.inference.run(inp, method, context)
        return ModelOutput(normalized=normalized[:self.action_spec.chunk_size], result=result, info=info)

    def actions(self, normalized: np.ndarray) -> np.ndarray:
        return self.inference.unnormalize(normalized)


def load_pi0_backend(directory: str | Path, device: str = 'auto', dtype: str = 'auto',
                     options: Optional[Pi0Options] = None) -> Pi0Backend:
    """The backend of a LeRobot pi0 / pi0.5 checkpoint directory."""
    directory = check_checkpoint_directory(directory)
    options = options or read_options(directory)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    checkpoint = load_checkpoint(directory, dev, dt, options.tokenizer)
    return Pi0Backend(Pi0Inference(checkpoint, dev, dt, seed=options.noise_seed, action_rows=options.action_rows),
                      options)


def load_pi0_policy(directory: str | Path, method: str = 'none', method_config: Optional[dict] = None,
                    device: str = 'auto', dtype: str = 'auto', seed: int = 0, **options: Any) -> PrunablePolicy:
    """A ready ``Policy`` for a pi0 / pi0.5 checkpoint directory.

    Keyword arguments are :class:`Pi0Options` fields (they override ``specprune_adapter.json``).
    """
    directory = check_checkpoint_directory(directory)
    backend = load_pi0_backend(directory, device, dtype, read_options(directory, options))
    return PrunablePolicy(backend, build_method(method, method_config, seed=seed))
