"""Opt-in: the adapters against the published remote code on the tiny checkpoints.

Runs when ``timm`` (0.9.x, what the remote code requires) imports and ``SPECPRUNE_PRISMATIC_CODE`` names a directory
holding ``openvla/prismatic/...`` (github.com/openvla/openvla) and ``openvla-oft/prismatic/...``
(github.com/moojink/openvla-oft); the OFT part also needs ``diffusers`` (imported by OFT's action_heads.py).

Checks that the tiny checkpoints' state dicts load **strictly** into the published ``OpenVLAForActionPrediction``
module tree (so the parameter names are the published ones), and that logits / actions agree. Shims, all for
running 2024 remote code under transformers 5 or with a tiny vocabulary: ``tie_weights`` accepts the new keyword,
OFT's hard-coded empty-token id 29871 becomes the tiny tokenizer's, and OFT's language model gets the all-ones
(bidirectional) mask its transformers fork builds.
"""
import importlib
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from specprune_ros.adapters import load_adapter
from specprune_ros.adapters.published_checkpoint import read_component
from specprune_ros.adapters.tiny import write_tiny_checkpoint

ROOT = os.environ.get('SPECPRUNE_PRISMATIC_CODE', '')
pytestmark = pytest.mark.skipif(not ROOT or not Path(ROOT).is_dir(),
                                reason='set SPECPRUNE_PRISMATIC_CODE to checkouts of openvla/ and openvla-oft/')
INSTRUCTION = 'put the cream cheese in the bowl'


def _package(name: str, path: Path) -> None:
    """Register ``name`` as a package at ``path`` without running its (heavy) ``__init__``."""
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    sys.modules[name] = module


def _load(name: str, path: Path, replace: dict | None = None) -> types.ModuleType:
    source = path.read_text()
    for old, new in (replace or {}).items():
        source = source.replace(old, new)
    module = types.ModuleType(name)
    module.__file__, module.__package__ = str(path), name.rpartition('.')[0]
    sys.modules[name] = module
    exec(compile(source, str(path), 'exec'), module.__dict__)
    return module


def _remote_model(repo: str, directory: Path, replace: dict | None = None):
    timm = pytest.importorskip(
        'timm', reason='opt-in parity test: needs timm (pip install timm) and the public OpenVLA checkouts')
    hf = Path(ROOT) / repo / 'prismatic' / 'extern' / 'hf'
    package = f'remote_{repo.replace("-", "_")}'
    _package(package, hf)
    configuration = _load(f'{package}.configuration_prismatic', hf / 'configuration_prismatic.py')
    modeling = _load(f'{package}.modeling_prismatic', hf / 'modeling_prismatic.py', replace)
    modeling.PrismaticForConditionalGeneration.tie_weights = lambda self, *a, **k: None
    config_json = json.loads((directory / 'config.json').read_text())
    overrides = dict(zip(config_json['timm_model_ids'], config_json['timm_model_overrides']))
    create = timm.create_model
    modeling.timm.create_model = lambda model_id, **kw: create(model_id, **{**kw, **overrides.get(model_id, {})})
    try:
        keep = {k: v for k, v in config_json.items() if k not in ('timm_model_overrides', 'architectures', 'auto_map',
                                                                  'model_type', 'transformers_version', 'torch_dtype')}
        config = configuration.OpenVLAConfig(**keep)
        config._attn_implementation = 'eager'
        model = modeling.OpenVLAForActionPrediction(config).float().eval()
    finally:
        modeling.timm.create_model = create
    return model


def _full_state(directory: Path) -> dict:
    from safetensors.torch import load_file
    index = json.loads((directory / 'model.safetensors.index.json').read_text())['weight_map']
    state = {}
    for name in set(index.values()):
        state.update(load_file(str(directory / name)))
    return {k: v.float() for k, v in state.items()}


def _pixel_values(adapter, images):
    pixels = adapter.transform.pixels(adapter.prepare_frames(images))
    return pixels.reshape(1, -1, *pixels.shape[-2:])                  # OFT stacks the cameras on channels


def test_openvla_matches_the_published_model(tmp_path):
    directory = write_tiny_checkpoint(tmp_path / 'openvla', 'openvla', seed=5)
    remote = _remote_model('openvla', directory)
    remote.load_state_dict(_full_state(directory), strict=True)
    adapter = load_adapter(directory, device='cpu', dtype='float32')
    images = [np.random.default_rng(3).integers(0, 255, (112, 112, 3), dtype=np.uint8)]
    normalized, tokens, logits = adapter.reference_step(images, INSTRUCTION)
    prompt = adapter.encode_prompt(INSTRUCTION)
    sequence = torch.tensor([prompt.ids + tokens[:-1]])                 # teacher forcing = greedy generation
    with torch.no_grad():
        out = remote(input_ids=sequence, attention_mask=torch.ones_like(sequence),
                     pixel_values=_pixel_values(adapter, images))
    remote_logits = out.logits[0, -len(tokens):]
    assert remote_logits.argmax(-1).tolist() == tokens
    assert (remote_logits - torch.stack(logits)).abs().max().item() < 1e-4
    assert adapter.step(images, INSTRUCTION).info['action_token_ids'] == tokens
    bins = np.clip(remote.vocab_size - np.array(tokens) - 1, 0, remote.bin_centers.shape[0] - 1)
    np.testing.assert_array_equal(remote.bin_centers[bins], normalized[0])


def test_openvla_oft_matches_the_published_model(tmp_path):
    pytest.importorskip('diffusers', reason='opt-in parity test: needs diffusers and the public OpenVLA-OFT checkout')
    directory = write_tiny_checkpoint(tmp_path / 'oft', 'openvla-oft', seed=5)
    adapter = load_adapter(directory, device='cpu', dtype='float32')
    oft = Path(ROOT) / 'openvla-oft'
    for name in ('prismatic', 'prismatic.vla', 'prismatic.training', 'prismatic.models'):
        _package(name, oft.joinpath(*name.split('.')))
    constants = importlib.import_module('prismatic.vla.constants')
    remote = _remote_model('openvla-oft', directory, replace={'29871': str(adapter.empty_id)})
    remote.load_state_dict(_full_state(directory), strict=True)
    remote.vision_backbone.set_num_images_in_input(2)
    remote.norm_stats = json.loads((directory / 'dataset_statistics.json').read_text())
    heads = importlib.import_module('prismatic.models.action_heads')
    projectors = importlib.import_module('prismatic.models.projectors')
    d = adapter.runner.hidden_size
    head = heads.L1RegressionActionHead(input_dim=d, hidden_dim=d, action_dim=constants.ACTION_DIM).eval()
    head.load_state_dict(read_component(adapter.checkpoint.components['action_head']), strict=True)
    projector = projectors.ProprioProjector(llm_dim=d, proprio_dim=8).eval()
    projector.load_state_dict(read_component(adapter.checkpoint.components['proprio_projector']), strict=True)
    forward = remote.language_model.forward

    def bidirectional(*args, **kwargs):
        n = kwargs['inputs_embeds'].shape[1]
        kwargs['attention_mask'] = torch.ones(1, 1, n, n, dtype=torch.bool)
        return forward(*args, **kwargs)

    remote.language_model.forward = bidirectional
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, (112, 112, 3), dtype=np.uint8) for _ in range(2)]
    proprio = rng.normal(size=8)
    ids = torch.tensor([adapter.encode_prompt(INSTRUCTION).ids])
    with torch.no_grad():
        expected, _ = remote.predict_action(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=_pixel_values(adapter, images),
            unnorm_key=adapter.unnorm_key, proprio=adapter.normalized_proprio(proprio), proprio_projector=projector,
            action_head=head)
    ours = adapter.unnormalize(adapter.step(images, INSTRUCTION, proprio).normalized)
    np.testing.assert_allclose(ours, expected, atol=1e-4)
