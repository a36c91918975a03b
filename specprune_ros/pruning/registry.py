"""Build pruning methods by name.

``build_method(name, config=None, seed=0)``: ``config`` is a dict of the method's config dataclass fields (nested
dicts for nested configs, e.g. ``{'controller': {'alpha': 0.8}}``) or an instance of that dataclass. Unknown fields
raise ValueError. Names are case-insensitive and '-' equals '_'.

| name | class | config |
|---|---|---|
| none | NoPruning | NoneConfig |
| random | RandomPruning | RandomConfig |
| fastv | FastV | FastVConfig |
| divprune | DivPrune | DivPruneConfig |
| vla_pruner | VLAPruner | VLAPrunerConfig |
| vla_cache | VLACache | VLACacheConfig |
| coverage_ranked | CoverageRanked | CoverageRankedConfig |
| specprune | SpecPrune | SpecPruneConfig (full: static + layer-level + controller) |
| specprune_static | SpecPrune | preset: use_layer_pruning=False, use_controller=False (paper ablation "static only") |
| specprune_static_layer | SpecPrune | preset: use_controller=False (paper ablation "+ layer-level") |

Presets are applied first; the caller's config overrides them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

from specprune_ros.core.step_types import PruningMethod
from specprune_ros.pruning.base import config_from_dict
from specprune_ros.pruning.methods.coverage_ranked import CoverageRanked, CoverageRankedConfig
from specprune_ros.pruning.methods.divprune import DivPrune, DivPruneConfig
from specprune_ros.pruning.methods.fastv import FastV, FastVConfig
from specprune_ros.pruning.methods.none import NoneConfig, NoPruning
from specprune_ros.pruning.methods.random_select import RandomConfig, RandomPruning
from specprune_ros.pruning.methods.specprune import SpecPrune, SpecPruneConfig
from specprune_ros.pruning.methods.vla_cache import VLACache, VLACacheConfig
from specprune_ros.pruning.methods.vla_pruner import VLAPruner, VLAPrunerConfig


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    factory: Callable[..., PruningMethod]
    config_cls: type
    preset: dict = dataclasses.field(default_factory=dict)
    description: str = ''


METHODS: dict[str, MethodSpec] = {
    'none': MethodSpec(NoPruning, NoneConfig, description='keep every token'),
    'random': MethodSpec(RandomPruning, RandomConfig, description='seeded uniform random subset before layer 0'),
    'fastv': MethodSpec(FastV, FastVConfig, description='last-row attention top-k after layer K-1'),
    'divprune': MethodSpec(DivPrune, DivPruneConfig, description='greedy max-min diversity before layer 0'),
    'vla_pruner': MethodSpec(VLAPruner, VLAPrunerConfig,
                             description='semantic + temporal action score, Combine-then-Filter before layer K'),
    'coverage_ranked': MethodSpec(CoverageRanked, CoverageRankedConfig,
                                  description='every cell of each camera covered, the rest ranked by remembered '
                                  'semantic + action attention, before layer 0, action-aware budget'),
    'vla_cache': MethodSpec(VLACache, VLACacheConfig, description='reuse K/V of static task-irrelevant tokens'),
    'specprune': MethodSpec(SpecPrune, SpecPruneConfig, description='SpecPrune-VLA: static + layer-level + controller'),
    'specprune_static': MethodSpec(SpecPrune, SpecPruneConfig,
                                   preset={'use_layer_pruning': False, 'use_controller': False},
                                   description='SpecPrune ablation: static pruning only'),
    'specprune_static_layer': MethodSpec(SpecPrune, SpecPruneConfig, preset={'use_controller': False},
                                         description='SpecPrune ablation: static + layer-level, no controller'),
}


def available_methods() -> list[str]:
    return sorted(METHODS)


def _canonical(name: str) -> str:
    return name.strip().lower().replace('-', '_')


def method_config(name: str, config: Union[dict, Any, None] = None) -> Any:
    """The config dataclass ``build_method`` would use (presets + overrides)."""
    key = _canonical(name)
    if key not in METHODS:
        raise ValueError(f'unknown pruning method {name!r}; available: {available_methods()}')
    spec = METHODS[key]
    if isinstance(config, spec.config_cls):
        return config
    if config is not None and not isinstance(config, dict):
        raise TypeError(f'config for {key!r} must be a dict or {spec.config_cls.__name__}, got {type(config).__name__}')
    merged = {**spec.preset, **(config or {})}
    return config_from_dict(spec.config_cls, merged)


def build_method(name: str, config: Union[dict, Any, None] = None, seed: int = 0) -> PruningMethod:
    """A fresh pruning method by registry name (see the module docstring)."""
    key = _canonical(name)
    cfg = method_config(key, config)
    method = METHODS[key].factory(cfg, seed=seed)
    if key != method.name:
        method.name = key                     # presets report their own name in records
    return method


def describe_methods() -> dict[str, dict[str, Any]]:
    """Name -> {description, defaults} for documentation and CLIs."""
    out: dict[str, dict[str, Any]] = {}
    for key, spec in METHODS.items():
        cfg = method_config(key)
        out[key] = {'description': spec.description, 'defaults': dataclasses.asdict(cfg)}
    return out


def get_spec(name: str) -> Optional[MethodSpec]:
    return METHODS.get(_canonical(name))
