"""Where each kind of token sits in a VLA input sequence."""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

from specprune_ros.core.constant_tensors import constant_tensors


class TokenRole(IntEnum):
    """What a token is. Only VISUAL tokens may ever be pruned."""

    VISUAL = 0
    TEXT = 1
    PROPRIO = 2
    ACTION = 3
    OTHER = 4  # BOS, separators, anything else that is never pruned


Span = tuple[int, int]  # [start, end) in the full (unpruned) sequence


@dataclass(frozen=True)
class TokenLayout:
    """Spans of the full sequence: one visual span per camera (a row-major patch grid), text, proprio, actions.

    ``causal`` selects the attention pattern of the decoder: False for chunked parallel decoding
    (OpenVLA-OFT style, bidirectional), True for autoregressive models (OpenVLA).
    """

    num_tokens: int
    camera_spans: tuple[Span, ...]
    grid_shape: tuple[int, int]
    text_span: Span = (0, 0)
    proprio_span: Span = (0, 0)
    action_span: Span = (0, 0)
    causal: bool = False

    def __post_init__(self) -> None:
        rows, cols = self.grid_shape
        for start, end in self.camera_spans:
            if end - start != rows * cols:
                raise ValueError(f'camera span {(start, end)} holds {end - start} tokens, grid is {rows}x{cols}')
        spans = [*self.camera_spans, self.text_span, self.proprio_span, self.action_span]
        for start, end in spans:
            if not 0 <= start <= end <= self.num_tokens:
                raise ValueError(f'span {(start, end)} outside a sequence of {self.num_tokens} tokens')

    @property
    def num_cameras(self) -> int:
        return len(self.camera_spans)

    @property
    def patches_per_camera(self) -> int:
        return self.grid_shape[0] * self.grid_shape[1]

    @property
    def num_visual(self) -> int:
        return self.num_cameras * self.patches_per_camera

    def roles(self) -> torch.Tensor:
        """Role of every token of the full sequence, shape (num_tokens,), dtype long."""
        roles = torch.full((self.num_tokens,), int(TokenRole.OTHER), dtype=torch.long)
        for start, end in self.camera_spans:
            roles[start:end] = int(TokenRole.VISUAL)
        roles[self.text_span[0]:self.text_span[1]] = int(TokenRole.TEXT)
        roles[self.proprio_span[0]:self.proprio_span[1]] = int(TokenRole.PROPRIO)
        roles[self.action_span[0]:self.action_span[1]] = int(TokenRole.ACTION)
        return roles

    def visual_indices(self, camera: int | None = None) -> torch.Tensor:
        """Sequence indices of the visual tokens (of one camera, or of all cameras in order)."""
        spans = self.camera_spans if camera is None else (self.camera_spans[camera],)
        return torch.cat([torch.arange(s, e) for s, e in spans]) if spans else torch.empty(0, dtype=torch.long)

    def non_visual_indices(self) -> torch.Tensor:
        """Sequence indices that are never pruned (text, proprio, action, other)."""
        return torch.nonzero(self.roles() != int(TokenRole.VISUAL)).flatten()

    def camera_of(self, indices: torch.Tensor) -> torch.Tensor:
        """Camera number of each visual sequence index (-1 for non-visual)."""
        cams = torch.full_like(indices, -1)
        for cam, (start, end) in enumerate(self.camera_spans):
            cams[(indices >= start) & (indices < end)] = cam
        return cams

    def patch_of(self, indices: torch.Tensor) -> torch.Tensor:
        """Row-major patch number inside its camera grid of each visual sequence index (-1 for non-visual)."""
        patches = torch.full_like(indices, -1)
        for start, end in self.camera_spans:
            inside = (indices >= start) & (indices < end)
            patches[inside] = indices[inside] - start
        return patches


@constant_tensors(maxsize=32)
def visual_order(layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout's visual indices in camera order, and each token's place among them (``num_visual`` elsewhere).

    The order every dense visual tensor follows; cached per layout (shared: do not modify them).
    """
    visual = layout.visual_indices()
    slots = torch.full((layout.num_tokens,), layout.num_visual, dtype=torch.long)
    slots[visual] = torch.arange(layout.num_visual)
    return visual, slots


@constant_tensors(maxsize=64)
def visual_indices_on(layout: TokenLayout, device: torch.device) -> torch.Tensor:
    """``layout.visual_indices()`` built on ``device``, once per layout and device (shared: do not modify it).

    Built there, not copied from the host: a copy from the host waits for the device's queued work on a GPU. A
    normal tensor even when first asked for in inference mode, so that passes with autograd on can index with it.
    """
    with torch.inference_mode(False):
        spans = [torch.arange(start, end, device=device) for start, end in layout.camera_spans]
        if not spans:
            return torch.empty(0, dtype=torch.long, device=device)
        return spans[0] if len(spans) == 1 else torch.cat(spans)
