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
from collections.abc import Mapping
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
    image_fit: str = 'stretch'                   # how camera frames become image_size: 'stretch' or 'pad'
    proprio_dim: int
    action_spec: ActionSpec
    patch_size: int                              # pixels per patch side in the encoded frames
    runner: PrunableDecoderRunner

    @abstractmethod
    def encode(self, observation: Observation) -> EncodedStep:
        """Decoder input for ``observation``; raises :class:`ObservationError` for one the model cannot act on."""

    def check_instruction(self, instruction: str) -> None:
        """Raise ``codecs.instruction.InstructionError`` for an instruction it cannot read (default: it reads any text).

        Callers check an instruction when it arrives, so that the robot holds on it instead of failing every step.
        """

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
    """The observation's frames in ``camera_names`` order, checked.

    Each present, a (H, W, 3) uint8 array, not empty, and (H, W) = ``size`` where given.
    """
    if not isinstance(observation.images, Mapping):
        raise ObservationError(f'images must map camera names to frames, got {type(observation.images).__name__}')
    frames = []
    for name in camera_names:
        frame = observation.images.get(name)
        if frame is None:
            raise ObservationError(f'camera {name!r} missing from the observation')
        if not isinstance(frame, np.ndarray):
            raise ObservationError(f'camera {name!r}: expected a NumPy (H, W, 3) uint8 array, got '
                                   f'{type(frame).__name__}')
        expected = f'{(*size, 3)}' if size else '(H, W, 3)'
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8 or (size and frame.shape[:2] != size) \
                or 0 in frame.shape[:2]:       # an empty frame (a failed capture) would be resized to black
            raise ObservationError(f'camera {name!r}: expected {expected} uint8, got {frame.shape} {frame.dtype}')
        frames.append(frame)
    return frames


def checked_executed_actions(actions: object, action_dim: int) -> Optional[np.ndarray]:
    """Executed actions as (k, ``action_dim``) float64 rows, oldest first, the rows with NaN or Inf left out.

    None when none is left; one action may come as (``action_dim``,). Anything else raises ObservationError: a
    method reads these rows as motion, and this runs before it changes its state.
    """
    if actions is None:
        return None
    try:
        array = np.asarray(actions, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ObservationError(f'executed_actions: not an array of numbers ({error})') from None
    if array.size == 0:
        return None
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2 or array.shape[1] != action_dim:
        raise ObservationError(f'executed_actions: expected (k, {action_dim}) rows or one ({action_dim},) action, '
                               f'got shape {np.shape(actions)}')
    finite = np.isfinite(array).all(axis=1)
    return array if finite.all() else array[finite] if finite.any() else None


def checked_timestamp(stamp: object) -> Optional[float]:
    """The observation's time as seconds (None stays None); ObservationError for anything not a finite number."""
    if stamp is None:
        return None
    try:
        seconds = float(stamp)
    except (TypeError, ValueError):
        raise ObservationError(f'timestamp must be seconds, got {stamp!r}') from None
    if not np.isfinite(seconds):
        raise ObservationError(f'timestamp must be finite, got {stamp!r}')
    return seconds


def step_context(backend: ModelBackend, step: EncodedStep, observation: Observation, step_index: int) -> StepContext:
    """What the pruning method sees before the forward pass of one step."""
    embeddings = step.embeddings
    executed = checked_executed_actions(observation.executed_actions, backend.action_spec.action_dim)
    return StepContext(layout=step.layout, step_index=step_index,
                       visual_embeddings=embeddings[0, visual_indices_on(step.layout, embeddings.device)].detach(),
                       images=step.frames, patch_size=backend.patch_size,
                       executed_actions=executed, instruction=observation.instruction,
                       timestamp=checked_timestamp(observation.timestamp),
                       num_layers=backend.runner.num_layers)


@torch.inference_mode()
def run_step(backend: ModelBackend, observation: Observation, method: Optional[PruningMethod] = None,
             step_index: int = 0) -> ModelOutput:
    """Encode ``observation``, run the decoder with ``method`` pruning, read out the normalised actions."""
    if not isinstance(observation.instruction, str):
        raise ObservationError(f'the instruction must be a str, got {type(observation.instruction).__name__}')
    step = backend.encode(observation)
    output = backend.run(step, method, step_context(backend, step, observation, step_index))
    output.info = {**step.info, **output.info}
    return output
