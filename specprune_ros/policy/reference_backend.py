"""The reference VLA as a model backend: camera frames, instruction words and proprio in, the 8 x 7 chunk out."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from specprune_ros.codecs.instruction import InstructionError
from specprune_ros.core.executor import RunResult
from specprune_ros.core.step_types import PruningMethod
from specprune_ros.policy.backend import EncodedStep, ModelBackend, camera_frames
from specprune_ros.policy.errors import ObservationError
from specprune_ros.policy.interface import ActionSpec, Observation
from specprune_ros.policy.prunable_policy import PrunablePolicy
from specprune_ros.policy.reference_vla import ReferenceVLA


class ReferenceBackend(ModelBackend):
    """Runs :class:`ReferenceVLA` (one bidirectional pass per chunk); its actions are normalised, clamped to [-1, 1]."""

    name = 'reference'

    def __init__(self, model: ReferenceVLA, action_spec: ActionSpec = ActionSpec()) -> None:
        self.model = model.eval()
        config = model.config
        self.camera_names = config.camera_names
        self.image_size = (config.image_size, config.image_size)
        self.proprio_dim = config.proprio_dim
        self.patch_size = config.patch_size
        self.action_spec = action_spec
        self.runner = model.runner
        self._device = next(model.parameters()).device

    def encode(self, observation: Observation) -> EncodedStep:
        frames = camera_frames(observation, self.camera_names, self.image_size)
        images = torch.stack([torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1) for f in frames]).unsqueeze(0)
        proprio = self._proprio(observation)
        try:
            self.check_instruction(observation.instruction)
        except InstructionError as error:
            raise ObservationError(str(error)) from None
        word_ids, num_words = self.model.tokenizer.encode(observation.instruction)
        embeddings = self.model.embed(images.to(self._device), torch.tensor([word_ids], device=self._device),
                                      proprio.to(self._device))
        return EncodedStep(embeddings=embeddings, layout=self.model.layout(num_words), frames=frames,
                           info={'words': num_words})

    def check_instruction(self, instruction: str) -> None:
        """Refuse words outside the model's closed vocabulary and more than its ``max_words`` words.

        An unknown word would read as ``<unk>`` and a longer instruction would be cut: another task than asked for.
        """
        tokenizer = self.model.tokenizer
        count = tokenizer.word_count(instruction)
        shown = repr(instruction[:200])
        if count == 0:
            raise InstructionError('instruction_empty', f'instruction has no word this model reads: {shown}')
        if count > tokenizer.max_words:
            raise InstructionError('instruction_too_long', f'instruction has {count} words; this model reads at '
                                   f'most {tokenizer.max_words}: {shown}')
        unknown = tokenizer.unknown_words(instruction)
        if unknown:
            raise InstructionError('instruction_unknown_words', f"instruction has words this model does not "
                                   f"know ({', '.join(unknown[:10])}): {shown}; it knows "
                                   f"{', '.join(tokenizer.vocabulary)}")

    def head(self, step: EncodedStep, result: RunResult) -> np.ndarray:
        actions = self.model.decode_actions(result, step.layout)
        return actions[0].float().clamp(-1.0, 1.0).cpu().numpy().astype(np.float32)

    def _proprio(self, observation: Observation) -> torch.Tensor:
        if observation.proprio is None:
            raise ObservationError('the reference VLA needs the proprio vector (robot state)')
        try:
            proprio = np.asarray(observation.proprio, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError) as error:
            raise ObservationError(f'proprio must be {self.proprio_dim} finite numbers ({error})') from None
        if proprio.shape != (self.proprio_dim,) or not np.isfinite(proprio).all():
            raise ObservationError(f'proprio must be {self.proprio_dim} finite values, got {proprio.tolist()}')
        return torch.from_numpy(proprio).unsqueeze(0)


def reference_policy(model: ReferenceVLA, method: Optional[PruningMethod] = None,
                     action_spec: ActionSpec = ActionSpec()) -> PrunablePolicy:
    """The reference VLA with ``method`` behind the ``Policy`` interface."""
    return PrunablePolicy(ReferenceBackend(model, action_spec), method)
