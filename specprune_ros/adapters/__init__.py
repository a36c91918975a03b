"""Adapters for the published OpenVLA and OpenVLA-OFT checkpoints on the prunable executor.

    from specprune_ros.adapters import load_adapter_policy
    policy = load_adapter_policy('/models/openvla-7b-oft-finetuned-libero-spatial', method='specprune',
                                 device='cuda', dtype='bfloat16', unnorm_key='libero_spatial')
    output = policy.predict(observation)          # PolicyOutput: un-normalised chunk + pruning record

Checkpoints load from a local directory in their Hugging Face layout (no hub access); see ``published_checkpoint``
for the files, ``openvla`` / ``openvla_oft`` for how each model maps onto the executor (each is a model backend,
``specprune_ros.policy.backend``), ``factory`` for the robot-side options, ``tiny`` for the architecture-identical
tiny random checkpoints the tests and the benchmark use. LeRobot's pi0 / pi0.5 checkpoints: the ``pi0`` package.
"""
from specprune_ros.adapters.published_checkpoint import detect_kind, read_checkpoint
from specprune_ros.adapters.factory import AdapterOptions, load_adapter, load_adapter_policy

__all__ = ['AdapterOptions', 'detect_kind', 'load_adapter', 'load_adapter_policy',
           'read_checkpoint']
