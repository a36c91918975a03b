"""Visual-token pruning methods and their temporal token state (plain PyTorch, no rclpy).

Build a method by name::

    from specprune_ros.pruning import build_method
    method = build_method('specprune', {'controller': {'alpha': 0.8}}, seed=0)

Every method implements ``specprune_ros.core.step_types.PruningMethod`` (reset / begin_step / after_layer /
end_step) and reports what it did in ``record.info`` (also kept in ``method.last_info``). A step's plan names the
layers whose ``after_layer`` hook it needs (``StepPlan.after_layers``; None: every layer): on a deep decoder the
hooks a method does not need are most of its fixed cost per step. See ``registry`` for the names and ``methods/``
for each method's config and the choices made where paper and public code disagree.
"""
from specprune_ros.pruning.registry import available_methods, build_method, describe_methods, method_config
from specprune_ros.pruning.self_speculation import self_speculation_hit_rate
from specprune_ros.pruning.temporal_state import TemporalStateConfig, TemporalTokenState

__all__ = [
    'available_methods',
    'build_method',
    'describe_methods',
    'method_config',
    'self_speculation_hit_rate',
    'TemporalStateConfig',
    'TemporalTokenState',
]
