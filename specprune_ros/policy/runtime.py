"""A loaded VLA plus a pruning method, behind the ``Policy`` interface (numpy in, action chunk out)."""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from specprune_ros.core.step_types import PruningMethod, StepContext
from specprune_ros.policy.interface import ActionSpec, Observation, PolicyOutput
from specprune_ros.policy.reference_vla import ReferenceVLA


class ObservationError(ValueError):
    """An observation the policy refuses to act on (missing camera, wrong shape, NaN state)."""


def camera_frames(observation: Observation, camera_names: tuple[str, ...],
                  size: Optional[tuple[int, int]] = None) -> list[np.ndarray]:
    """The observation's frames in ``camera_names`` order, checked: present, (H, W, 3) uint8, and (H, W) = ``size``."""
    frames = []
    for name in camera_names:
        frame = observation.images.get(name)
        if frame is None:
            raise ObservationError(f'camera {name!r} missing from the observation')
        expected = f'{(*size, 3)}' if size else '(H, W, 3)'
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8 or (size and frame.shape[:2] != size):
            raise ObservationError(f'camera {name!r}: expected {expected} uint8, got {frame.shape} {frame.dtype}')
        frames.append(frame)
    return frames


class MethodState:
    """The pruning method and the step counter a policy carries across one episode."""

    method: Optional[PruningMethod] = None
    step_index: int = 0

    @property
    def method_name(self) -> str:
        return getattr(self.method, 'name', 'none')

    def reset(self) -> None:
        """New episode or instruction: forget the temporal token state."""
        self.step_index = 0
        if self.method is not None:
            self.method.reset()


class PrunedVLAPolicy(MethodState):
    """Runs the reference VLA through the prunable executor; keeps the method's temporal state per episode."""

    def __init__(self, model: ReferenceVLA, method: Optional[PruningMethod] = None,
                 action_spec: ActionSpec = ActionSpec()) -> None:
        self.model = model.eval()
        self.method = method
        config = model.config
        self.camera_names = config.camera_names
        self.image_size = (config.image_size, config.image_size)
        self.proprio_dim = config.proprio_dim
        self.action_spec = action_spec
        self.step_index = 0
        self._device = next(model.parameters()).device

    def predict(self, observation: Observation) -> PolicyOutput:
        """One chunk of normalised actions (chunk_size, action_dim) for the observation."""
        started = time.perf_counter()
        images = self._images(observation)
        proprio = self._proprio(observation)
        word_ids, num_words = self.model.tokenizer.encode(observation.instruction)
        context = StepContext(layout=None, step_index=self.step_index, visual_embeddings=None,  # filled by model
                              images=[observation.images[name] for name in self.camera_names],
                              patch_size=self.model.config.patch_size,
                              executed_actions=observation.executed_actions, instruction=observation.instruction)
        with torch.inference_mode():
            actions, result = self.model(
                images.to(self._device), torch.tensor([word_ids], device=self._device), num_words,
                proprio.to(self._device), self.method, context)
        chunk = actions[0].float().clamp(-1.0, 1.0).cpu().numpy().astype(np.float32)
        self.step_index += 1
        record = result.record
        if self.method is not None:
            record.info.update(getattr(self.method, 'last_info', {}) or {})
        return PolicyOutput(actions=chunk, latency_s=time.perf_counter() - started, record=record,
                            info={'method': self.method_name, 'step_index': self.step_index - 1,
                                  'words': num_words})

    def _images(self, observation: Observation) -> torch.Tensor:
        frames = camera_frames(observation, self.camera_names, self.image_size)
        return torch.stack([torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1) for f in frames]).unsqueeze(0)

    def _proprio(self, observation: Observation) -> torch.Tensor:
        if observation.proprio is None:
            raise ObservationError('the reference VLA needs the proprio vector (robot state)')
        proprio = np.asarray(observation.proprio, dtype=np.float32).reshape(-1)
        if proprio.shape != (self.proprio_dim,) or not np.isfinite(proprio).all():
            raise ObservationError(f'proprio must be {self.proprio_dim} finite values, got {proprio.tolist()}')
        return torch.from_numpy(proprio).unsqueeze(0)
