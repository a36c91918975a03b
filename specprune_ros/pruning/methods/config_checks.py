"""Type and range checks of the method configs, run when a config is constructed.

Every method config mixes in :class:`CheckedConfig`, so that a bad setting fails when the method is built (and in
the node's configure-time validation), not in a step: built from a mapping, its values' types are checked by
:func:`specprune_ros.core.dataclass_mapping.dataclass_from_mapping` (``strict_types``); constructed, its fields'
types and every number's range. Messages name the setting as a user writes it (``controller.alpha``).

Layer numbers may be negative (Python style, see :mod:`specprune_ros.pruning.base`); the decoder depth is known
only in a step, so a layer beyond it, like a per-camera list longer than the cameras, is refused there.
"""
from __future__ import annotations

import typing
from typing import Any, ClassVar, Optional

from specprune_ros.core.dataclass_mapping import check_number, check_types
from specprune_ros.core.step_types import QueryRows

FRACTION_OF_TOKENS = 'a fraction of the visual tokens'
FRACTION_OF_PATCHES = "a fraction of a camera's patches"


class CheckedConfig:
    """Mixin of the method configs: typed values from a mapping, types and ranges checked at construction."""

    strict_types: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_types(self)
        check_number('num_layers', getattr(self, 'num_layers'), 1, integer=True, note='decoder depth')
        check_number('max_gap_s', getattr(self, 'max_gap_s'))
        self.check()

    def check(self) -> None:
        """Raise ValueError naming a setting of the method outside its range."""


def fraction(path: str, value: Any, note: str = '', open_low: bool = False) -> None:
    """Raise unless ``value`` is in [0, 1] ((0, 1] with ``open_low``)."""
    check_number(path, value, 0.0, 1.0, open_low=open_low, note=note)


def layers(path: str, values: Optional[tuple]) -> None:
    """Raise unless ``values`` is None or integer layer numbers (negative: from the last layer)."""
    for i, layer in enumerate(values or ()):
        check_number(f'{path}[{i}]', layer, integer=True)


def check_controller(cfg: Any, prefix: str = 'controller.') -> None:
    """The ranges of an action controller config (:class:`specprune_ros.pruning.action_controller.ControllerConfig`).

    Speeds and rotations are magnitudes (>= 0); ``enter_z`` and ``leave_z`` are signed.
    """
    for name in ('enter_speed', 'enter_xy', 'enter_rot', 'leave_rot', 'paper_speed', 'paper_rot'):
        check_number(prefix + name, getattr(cfg, name), 0.0, note='a magnitude')
    for name in ('enter_z', 'leave_z'):
        check_number(prefix + name, getattr(cfg, name))
    check_number(prefix + 'warmup_actions', cfg.warmup_actions, 0, integer=True)
    check_number(prefix + 'alpha', cfg.alpha, 0.0, note='a scale of K_base')
    check_number(prefix + 'k_fine', cfg.k_fine, 0.0, note='tokens per reference_patches')
    check_number(prefix + 'k_coarse', cfg.k_coarse, 0.0, note='tokens per reference_patches')
    check_number(prefix + 'reference_patches', cfg.reference_patches, 1, integer=True)
    for i, scale in enumerate(cfg.camera_scale):
        check_number(f'{prefix}camera_scale[{i}]', scale, 0.0, note='a scale of K_base')


def check_change(cfg: Any, prefix: str = 'change.') -> None:
    """The ranges of a change detection config (:class:`specprune_ros.pruning.change_detection.ChangeDetectionConfig`).

    The reference frame is ``T`` frames back counting the current one, so ``T`` >= 2.
    """
    check_number(prefix + 'threshold', cfg.threshold, -1.0, 1.0, note='a cosine similarity')
    fraction(prefix + 'max_static_fraction_coarse', cfg.max_static_fraction_coarse, FRACTION_OF_PATCHES)
    fraction(prefix + 'max_static_fraction_fine', cfg.max_static_fraction_fine, FRACTION_OF_PATCHES)
    fraction(prefix + 'max_changed_fraction', cfg.max_changed_fraction, FRACTION_OF_PATCHES)
    check_number(prefix + 'min_reference_back', cfg.min_reference_back, 2, integer=True,
                 note='frames, counting the current one')
    check_number(prefix + 'max_reference_back', cfg.max_reference_back, cfg.min_reference_back, integer=True,
                 note='at least min_reference_back')


def check_rows(path: str, rows: Any) -> None:
    """Raise unless ``rows`` names query rows the runner provides."""
    choices = typing.get_args(QueryRows)
    if rows not in choices:
        raise ValueError(f'{path} must be one of {list(choices)}, not {rows!r}')
