"""The model-backend contract: what a VLA implements to run behind the ``Policy`` interface with pruning.

A backend turns an observation into decoder input (:meth:`ModelBackend.encode`), runs the decoder through its
:class:`~specprune_ros.core.executor.PrunableDecoderRunner` and reads out normalised actions
(:meth:`ModelBackend.run`: one prefill pass then :meth:`ModelBackend.head` by default; an autoregressive model
overrides it to decode after the prefill), and converts them to the robot's units (:meth:`ModelBackend.actions`).
:class:`~specprune_ros.policy.prunable_policy.PrunablePolicy` owns everything around that: the step context the
pruning method sees, the step counter, timing, the output's info and resets. A new VLA plugs in by writing a
backend.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from specprune_ros.core.executor import PrunableDecoderRunner, RunResult
from specprune_ros.core.step_types import PruningMethod, StepContext
from specprune_ros.core.token_layout import TokenLayout, visual_indices_on
from specprune_ros.policy.errors import ObservationError
from specprune_ros.policy.interface import ActionSpec, Observation


@dataclass
class EncodedStep:
    """One observation as decoder input."""

    embeddings: torch.Tensor                     # (1, N, d) decoder input embeddings
    layout: TokenLayout
    frames: list[np.ndarray]                     # the camera frames the vision encoder saw, in camera order
    info: dict = field(default_factory=dict)     # facts for the policy output's info (e.g. instruction length)


@dataclass
class ModelOutput:
    """One step's normalised actions and what the executor did."""

    normalized: np.ndarray                       # (chunk, action_dim) model output in [-1, 1]
    result: RunResult                            # the (prefill) pass; result.record is the step's record
    info: dict = field(default_factory=dict)

    @property
    def layout(self) -> TokenLayout:
        return self.result.record.layout


class ModelBackend(ABC):
    """One VLA on the prunable executor.

    Subclasses set the attributes and implement ``encode`` and ``head`` (or ``run``).
    """

    name: str = 'model'                          # reported as the policy output's info['model']
    camera_names: tuple[str, ...]
    image_size: tuple[int, int]                  # (H, W) the model expects
    proprio_dim: int
    action_spec: ActionSpec
    patch_size: int                              # pixels per patch side in the encoded frames
    runner: PrunableDecoderRunner

    @abstractmethod
    def encode(self, observation: Observation) -> EncodedStep:
        """Decoder input for ``observation``; raises :class:`ObservationError` for one the model cannot act on."""

    def run(self, step: EncodedStep, method: Optional[PruningMethod], context: StepContext) -> ModelOutput:
        """The decoder pass(es) and the action readout. Default: one prefill pass, then :meth:`head`."""
        result = self.runner(step.embeddings, step.layout, method, context)
        return ModelOutput(normalized=self.head(step, result), result=result)

    def head(self, step: EncodedStep, result: RunResult) -> np.ndarray:
        """(chunk, action_dim) normalised actions from a decoder pass (needed by the default :meth:`run`)."""
        raise NotImplementedError(f'{type(self).__name__} implements neither head() nor run()')

    def actions(self, normalized: np.ndarray) -> np.ndarray:
        """Normalised actions in the robot's units (default: unchanged)."""
        return normalized

    def reset(self) -> None:
        """Forget per-episode state of the model itself (default: it has none)."""


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


def step_context(backend: ModelBackend, step: EncodedStep, observation: Observation, step_index: int) -> StepContext:
    """What the pruning method sees before the forward pass of one step."""
    embeddings = step.embeddings
    return StepContext(layout=step.layout, step_index=step_index,
                       visual_embeddings=embeddings[0, visual_indices_on(step.layout, embeddings.device)].detach(),
                       images=step.frames, patch_size=backend.patch_size,
                       executed_actions=observation.executed_actions, instruction=observation.instruction,
                       num_layers=backend.runner.num_layers)


@torch.inference_mode()
def run_step(backend: ModelBackend, observation: Observation, method: Optional[PruningMethod] = None,
             step_index: int = 0) -> ModelOutput:
    """Encode ``observation``, run the decoder with ``method`` pruning, read out the normalised actions."""
    step = backend.encode(observation)
    output = backend.run(step, method, step_context(backend, step, observation, step_index))
    output.info = {**step.info, **output.info}
    return output
