"""Loading OpenVLA / OpenVLA-OFT checkpoints in their published layout (tiny random ones), and clear errors."""
import json

import pytest
import torch

from specprune_ros.adapters import detect_kind, load_adapter, load_adapter_policy, read_checkpoint
from specprune_ros.adapters.published_checkpoint import load_tokenizer
from specprune_ros.adapters.tiny import write_tiny_checkpoint
from specprune_ros.adapters.vit import TIMM_PRESETS, VisionTransformer, timm_spec
from specprune_ros.models.loading import load_model, load_policy, published_kind
from specprune_ros.policy.errors import CheckpointError
from specprune_ros.policy.reference_backend import ReferenceBackend
from specprune_ros.policy.reference_checkpoint import save_checkpoint

from conftest import copy

# names the published checkpoints use (verified against the public modeling_prismatic.py + timm 0.9.16)
PUBLISHED_KEYS = [
    'vision_backbone.featurizer.cls_token', 'vision_backbone.featurizer.reg_token',
    'vision_backbone.featurizer.pos_embed', 'vision_backbone.featurizer.patch_embed.proj.weight',
    'vision_backbone.featurizer.blocks.0.attn.qkv.weight', 'vision_backbone.featurizer.blocks.0.ls1.scale_factor',
    'vision_backbone.featurizer.blocks.2.mlp.fc2.bias', 'vision_backbone.featurizer.norm.weight',
    'vision_backbone.fused_featurizer.pos_embed', 'vision_backbone.fused_featurizer.blocks.1.norm2.bias',
    'vision_backbone.fused_featurizer.attn_pool.latent', 'vision_backbone.fused_featurizer.attn_pool.kv.weight',
    'vision_backbone.fused_featurizer.attn_pool.mlp.fc1.weight',
    'projector.fc1.weight', 'projector.fc2.bias', 'projector.fc3.weight',
    'language_model.model.embed_tokens.weight', 'language_model.model.layers.3.self_attn.q_proj.weight',
    'language_model.model.layers.0.mlp.gate_proj.weight', 'language_model.model.norm.weight',
    'language_model.lm_head.weight',
]


def test_kind_is_detected_from_the_files(prismatic_checkpoints, tmp_path):
    assert detect_kind(prismatic_checkpoints['openvla']) == 'openvla'
    assert detect_kind(prismatic_checkpoints['openvla-oft']) == 'openvla-oft'
    with pytest.raises(CheckpointError, match='action_head--'):
        read_checkpoint(prismatic_checkpoints['openvla'], kind='openvla-oft')


def test_published_parameter_names_load_strictly(prismatic_checkpoints):
    adapter = load_adapter(prismatic_checkpoints['openvla'], device='cpu', dtype='float32')
    names = set(adapter.model.state_dict())
    assert set(PUBLISHED_KEYS) <= names
    assert not any(name.startswith('runner') for name in names)
    assert adapter.model.language_model.lm_head.weight.dtype == torch.float32   # saved bf16, loaded as asked
    assert not any(p.is_meta for p in adapter.model.parameters())
    assert adapter.model.decoder.rotary_emb.inv_freq.dtype == torch.float32
    oft = load_adapter(prismatic_checkpoints['openvla-oft'], device='cpu', dtype='bfloat16')
    assert {'model.layer_norm1.weight', 'model.mlp_resnet_blocks.1.ffn.1.weight', 'model.fc2.bias'} <= set(
        oft.action_head.state_dict())
    assert set(oft.proprio_projector.state_dict()) == {'fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias'}
    assert oft.model.projector.fc1.weight.dtype == torch.bfloat16
    assert (oft.proprio_dim, oft.chunk_size, oft.action_dim, oft.num_images) == (8, 8, 7, 2)


def test_real_size_vision_specs_have_the_timm_shapes():
    dino = timm_spec('vit_large_patch14_reg4_dinov2.lvd142m', 224)
    siglip = timm_spec('vit_so400m_patch14_siglip_224', 224)
    assert (dino.num_patches, dino.num_prefix_tokens, siglip.num_prefix_tokens, siglip.mlp_hidden) == (256, 5, 0, 4304)
    with torch.device('meta'):
        vit = VisionTransformer(dino)
    shapes = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    assert shapes['pos_embed'] == (1, 256, 1024) and shapes['reg_token'] == (1, 4, 1024)
    assert len(shapes) == 343 and sorted(TIMM_PRESETS)
    with pytest.raises(ValueError, match='unsupported timm'):
        timm_spec('vit_base_patch16_224.augreg_in21k')


def test_single_file_weights_load_too(tmp_path):
    directory = write_tiny_checkpoint(tmp_path / 'single', 'openvla', shards=1)
    assert (directory / 'model.safetensors').is_file()
    adapter = load_adapter(directory, device='cpu', dtype='float32')
    assert adapter.runner.num_layers == 4


def test_tokenizer_is_the_checkpoints_own(prismatic_checkpoints):
    tokenizer = load_tokenizer(prismatic_checkpoints['openvla'])
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    assert len(tokenizer) == 385                               # 384 + <PAD>, like Llama-2's 32000 + <PAD>


@pytest.mark.parametrize('kind, remove, message', [
    ('openvla', 'config.json', 'missing config.json'),
    ('openvla', 'model-00002-of-00002.safetensors', 'missing model-00002-of-00002.safetensors'),
    ('openvla', 'tokenizer.json', r'missing tokenizer.json \(or tokenizer.model\)'),
    # required unless specprune_adapter.json declares a model without proprio ("proprio": false)
    ('openvla-oft', 'proprio_projector--100_checkpoint.pt', r'missing proprio_projector--<step>_checkpoint.pt'),
])
def test_missing_files_are_named(prismatic_checkpoints, tmp_path, kind, remove, message):
    directory = copy(prismatic_checkpoints[kind], tmp_path)
    (directory / remove).unlink()
    with pytest.raises(CheckpointError, match=message):
        load_adapter(directory, device='cpu', dtype='float32')


def test_missing_weights_file_and_directory(prismatic_checkpoints, tmp_path):
    directory = copy(prismatic_checkpoints['openvla'], tmp_path)
    (directory / 'model.safetensors.index.json').unlink()
    with pytest.raises(CheckpointError, match=r'missing model.safetensors \(or model.safetensors.index.json'):
        load_adapter(directory, device='cpu', dtype='float32')
    with pytest.raises(CheckpointError, match='does not exist'):
        load_adapter(tmp_path / 'nowhere', device='cpu', dtype='float32')
    oft = copy(prismatic_checkpoints['openvla-oft'], tmp_path, 'oft')
    (oft / 'action_head--100_checkpoint.pt').unlink()
    with pytest.raises(CheckpointError, match='action_head--<step>_checkpoint.pt'):
        load_adapter(oft, kind='openvla-oft', device='cpu', dtype='float32')


@pytest.mark.parametrize('name, content, message', [
    ('config.json', '{"model_type": "openvla", ', 'malformed config.json'),
    ('config.json', '[1, 2]', 'malformed config.json'),
    ('model.safetensors.index.json', '{"metadata": {}}', 'malformed model.safetensors.index.json'),
    ('model-00001-of-00002.safetensors', 'not a safetensors file', 'malformed model-00001-of-00002.safetensors'),
    ('preprocessor_config.json', '{"means": 3}', 'malformed preprocessor_config.json'),
    ('action_head--100_checkpoint.pt', 'garbage', 'malformed action_head--100_checkpoint.pt'),
    ('specprune_adapter.json', '{"camera_name": ["a"]}', "unknown adapter option"),
])
def test_malformed_files_are_named(prismatic_checkpoints, tmp_path, name, content, message):
    directory = copy(prismatic_checkpoints['openvla-oft'], tmp_path)
    (directory / name).write_text(content)
    with pytest.raises(CheckpointError, match=message):
        load_adapter_policy(directory, device='cpu', dtype='float32')


def test_weights_that_do_not_fit_the_config_are_named(prismatic_checkpoints, tmp_path):
    directory = copy(prismatic_checkpoints['openvla'], tmp_path)
    config = json.loads((directory / 'config.json').read_text())
    config['text_config']['num_hidden_layers'] = 3
    (directory / 'config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r'unexpected weight.*language_model.model.layers.3'):
        load_adapter(directory, device='cpu', dtype='float32')
    config['text_config']['num_hidden_layers'] = 4
    config['text_config']['intermediate_size'] = 96
    (directory / 'config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r'model-0000\d-of-00002.safetensors: language_model.*mlp.*shape'):
        load_adapter(directory, device='cpu', dtype='float32')


def test_unnorm_key_must_name_dataset_statistics(prismatic_checkpoints, tmp_path):
    directory = copy(prismatic_checkpoints['openvla'], tmp_path)
    config = json.loads((directory / 'config.json').read_text())
    stats = config['norm_stats']['tiny_libero_spatial_no_noops']
    config['norm_stats'] = {'bridge_orig': stats, 'tiny_libero_spatial_no_noops': stats}
    (directory / 'config.json').write_text(json.dumps(config))
    with pytest.raises(KeyError, match='choose unnorm_key from'):
        load_adapter_policy(directory, device='cpu', dtype='float32')
    with pytest.raises(KeyError, match="'fractal' not in the dataset statistics"):
        load_adapter_policy(directory, device='cpu', dtype='float32', unnorm_key='fractal')
    policy = load_adapter_policy(directory, device='cpu', dtype='float32', unnorm_key='tiny_libero_spatial')
    assert policy.backend.unnorm_key == 'tiny_libero_spatial_no_noops'     # OFT's '_no_noops' fallback


def test_unsupported_oft_variants_are_refused(prismatic_checkpoints, tmp_path):
    directory = copy(prismatic_checkpoints['openvla-oft'], tmp_path)
    (directory / 'noisy_action_projector--100_checkpoint.pt').write_bytes(b'')
    with pytest.raises(CheckpointError, match='diffusion'):
        load_adapter(directory, device='cpu', dtype='float32')


def test_load_policy_takes_openvla_directories_to_the_adapters(prismatic_checkpoints, tmp_path):
    assert published_kind('reference') is None and published_kind('tiny-random') is None
    assert published_kind(str(tmp_path / 'nowhere')) is None
    reference = save_checkpoint(load_model('tiny-random'), tmp_path / 'reference')
    assert published_kind(str(reference)) is None
    assert isinstance(load_policy(str(reference)).backend, ReferenceBackend)
    assert published_kind(str(prismatic_checkpoints['openvla-oft'])) == 'openvla-oft'
    policy = load_policy(str(prismatic_checkpoints['openvla-oft']), method='fastv', method_config={'keep_ratio': 0.25})
    assert policy.backend.kind == 'openvla-oft' and policy.method_name == 'fastv'
    assert policy.method.config.keep_ratio == 0.25
