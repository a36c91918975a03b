"""Tiny random pi0 / pi0.5 checkpoints in LeRobot's layout (tests and benchmarks).

Same files and parameter names as ``lerobot/pi0_base`` / ``lerobot/pi05_base`` (``config.json``,
``model.safetensors`` with ``model.paligemma_with_expert...`` keys, the pre- / post-processor pipelines with their
normaliser statistics), plus a small Gemma-layout tokenizer (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3,
byte fallback, trained here on robot-task prompts with pi0.5's state numbers). Only the sizes are small: a 2-layer
32-wide SigLIP on 56 px images (4 x 4 patches of 14 px), a 3-layer 64-wide language model and a 3-layer 32-wide
expert (2 heads, 1 K/V head of 32); they are written to ``config.json`` as ``specprune_architecture``. The chunk
is the published 50 steps; ``published=True`` writes the published shapes instead (random weights, several GB).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from specprune_ros.adapters.pi0.configuration import GemmaShape, VisionShape, parse_config
from specprune_ros.adapters.pi0.modeling import Pi0Model
from specprune_ros.adapters.pi0.processing import POSTPROCESSOR_FILE, PREPROCESSOR_FILE
from specprune_ros.adapters.tiny import WORDS, _randomise

TOKENIZER_VOCAB = 320
TINY_VLM = GemmaShape(width=64, depth=3, mlp_dim=128, num_heads=2, num_kv_heads=1, head_dim=32)
TINY_EXPERT = GemmaShape(width=32, depth=3, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=32)
TINY_VISION = VisionShape(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=14)
CAMERAS = ('base_0_rgb', 'left_wrist_0_rgb')


def gemma_tokenizer(directory: Path, vocab_size: int = TOKENIZER_VOCAB, seed: int = 0) -> None:
    """A Gemma-layout BPE tokenizer (tokenizer.json + tokenizer_config.json) in ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    rng = np.random.default_rng(seed)
    corpus = []
    for _ in range(400):
        task = ' '.join(rng.choice(WORDS, size=int(rng.integers(3, 12))))
        state = ' '.join(str(int(v)) for v in rng.integers(0, 256, size=8))
        corpus += [task + '\n', f'Task: {task}, State: {state};\nAction: ']
    specials = ['<pad>', '<eos>', '<bos>', '<unk>'] + [f'<0x{b:02X}>' for b in range(256)]
    tokenizer = Tokenizer(models.BPE(unk_token='<unk>', byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement='\u2581', prepend_scheme='first')
    tokenizer.decoder = decoders.Metaspace(replacement='\u2581', prepend_scheme='first')
    alphabet = sorted(set(''.join(corpus).replace(' ', '\u2581')) | {'\u2581'})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single='<bos> $A', pair='<bos> $A <bos> $B',
                                                             special_tokens=[('<bos>', 2)])
    tokenizer.save(str(directory / 'tokenizer.json'))
    (directory / 'tokenizer_config.json').write_text(json.dumps({
        'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<bos>', 'eos_token': '<eos>',
        'unk_token': '<unk>', 'pad_token': '<pad>', 'add_bos_token': True, 'model_max_length': 2048,
        'padding_side': 'right'}, indent=2))


def tiny_config(policy_type: str = 'pi0', cameras: tuple[str, ...] = CAMERAS, state_dim: int = 8,
                action_dim: int = 7, image_size: Optional[int] = None, published: bool = False) -> dict:
    """A LeRobot-style ``config.json`` object (images 56 px, or the published 224 px)."""
    pi05 = policy_type == 'pi05'
    image_size = image_size or (224 if published else 56)
    inputs = {f'observation.images.{name}': {'type': 'VISUAL', 'shape': [3, image_size, image_size]}
              for name in cameras}
    inputs['observation.state'] = {'type': 'STATE', 'shape': [state_dim]}
    mode = 'QUANTILES' if pi05 else 'MEAN_STD'
    config = {
        'type': policy_type, 'n_obs_steps': 1, 'input_features': inputs,
        'output_features': {'action': {'type': 'ACTION', 'shape': [action_dim]}},
        'device': 'cpu', 'use_amp': False, 'push_to_hub': False,
        'paligemma_variant': 'gemma_2b', 'action_expert_variant': 'gemma_300m', 'dtype': 'float32',
        'chunk_size': 50, 'n_action_steps': 50, 'max_state_dim': 32, 'max_action_dim': 32,
        'num_inference_steps': 10, 'time_sampling_beta_alpha': 1.5, 'time_sampling_beta_beta': 1.0,
        'time_sampling_scale': 0.999, 'time_sampling_offset': 0.001, 'min_period': 0.004, 'max_period': 4.0,
        'image_resolution': [image_size, image_size], 'empty_cameras': 0,
        'normalization_mapping': {'VISUAL': 'IDENTITY', 'STATE': mode, 'ACTION': mode},
        'tokenizer_max_length': 200 if pi05 else 48,
    }
    if not published:
        config['specprune_architecture'] = {
            'vlm': TINY_VLM.__dict__, 'expert': TINY_EXPERT.__dict__, 'vision': TINY_VISION.__dict__,
            'vocab_size': TOKENIZER_VOCAB}
    return config


def _stats(dim: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    low, high = -rng.uniform(0.5, 2.0, size=dim), rng.uniform(0.5, 2.0, size=dim)
    return {'mean': (low + high) / 2, 'std': (high - low) / 4, 'min': low * 1.2, 'max': high * 1.2,
            'q01': low, 'q99': high, 'q10': low * 0.8, 'q90': high * 0.8}


def write_processors(directory: Path, config: dict, seed: int = 0) -> None:
    """``policy_preprocessor.json`` / ``policy_postprocessor.json`` and their normaliser statistics."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed + 1)
    state_dim = config['input_features']['observation.state']['shape'][0]
    action_dim = config['output_features']['action']['shape'][0]
    stats = {f'observation.state.{k}': v.astype(np.float32) for k, v in _stats(state_dim, rng).items()}
    stats.update({f'action.{k}': v.astype(np.float32) for k, v in _stats(action_dim, rng).items()})
    features = {**config['input_features'], **config['output_features']}
    norm = {'eps': 1e-8, 'features': features, 'norm_map': config['normalization_mapping']}
    pre_state, post_state = (f'{PREPROCESSOR_FILE[:-5]}_step_5_normalizer_processor.safetensors',
                             f'{POSTPROCESSOR_FILE[:-5]}_step_0_unnormalizer_processor.safetensors')
    tokenize = {'registry_name': 'tokenizer_processor', 'config': {
        'max_length': config['tokenizer_max_length'], 'task_key': 'task', 'padding_side': 'right',
        'padding': 'max_length', 'truncation': True, 'tokenizer_name': 'google/paligemma-3b-pt-224'}}
    prompt = ({'registry_name': 'pi05_prepare_state_tokenizer_processor_step', 'config': {}}
              if config['type'] == 'pi05' else {'registry_name': 'pi0_new_line_processor', 'config': {}})
    pre = {'name': 'policy_preprocessor', 'steps': [
        {'registry_name': 'rename_observations_processor', 'config': {'rename_map': {}}},
        {'registry_name': 'to_batch_processor', 'config': {}}, prompt, tokenize,
        {'registry_name': 'device_processor', 'config': {'device': 'cpu', 'float_dtype': None}},
        {'registry_name': 'normalizer_processor', 'config': norm, 'state_file': pre_state}]}
    if config['type'] == 'pi05':   # pi0.5 normalises before it writes the state into the prompt
        pre['steps'] = pre['steps'][:2] + [pre['steps'][5], pre['steps'][2], pre['steps'][3], pre['steps'][4]]
        pre_state = f'{PREPROCESSOR_FILE[:-5]}_step_2_normalizer_processor.safetensors'
        pre['steps'][2]['state_file'] = pre_state
    post = {'name': 'policy_postprocessor', 'steps': [
        {'registry_name': 'unnormalizer_processor', 'config': {**norm, 'features': config['output_features']},
         'state_file': post_state},
        {'registry_name': 'device_processor', 'config': {'device': 'cpu', 'float_dtype': None}}]}
    (directory / PREPROCESSOR_FILE).write_text(json.dumps(pre, indent=2))
    (directory / POSTPROCESSOR_FILE).write_text(json.dumps(post, indent=2))
    save_file(stats, str(directory / pre_state))
    save_file(stats, str(directory / post_state))


def lerobot_state(model: Pi0Model, generator: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's parameters under the names LeRobot saves.

    The ``model.`` prefix, transformers 4's SigLIP names, the tied PaliGemma head instead of the embedding, the
    expert's unused head.
    """
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith('paligemma_with_expert.paligemma.model.vision_tower.'):
            key = key.replace('.vision_tower.', '.vision_tower.vision_model.', 1)
        if key == 'paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight':
            key = 'paligemma_with_expert.paligemma.lm_head.weight'
        state['model.' + key] = tensor.detach().to(dtype).contiguous()
    vocab = model.config.vocab_size
    state['model.paligemma_with_expert.gemma_expert.lm_head.weight'] = (
        torch.randn(vocab, model.config.expert.width, generator=generator) * 0.02).to(dtype)
    return state


def write_tiny_checkpoint(directory: str | Path, policy_type: str = 'pi0', seed: int = 0,
                          cameras: tuple[str, ...] = CAMERAS, state_dim: int = 8, action_dim: int = 7,
                          dtype: torch.dtype = torch.float32, published: bool = False,
                          options: Optional[dict] = None) -> Path:
    """Write a tiny random pi0 ('pi0') or pi0.5 ('pi05') checkpoint in LeRobot's layout to ``directory``."""
    from safetensors.torch import save_file
    if policy_type not in ('pi0', 'pi05'):
        raise ValueError(f"policy_type must be 'pi0' or 'pi05', got {policy_type!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config(policy_type, cameras, state_dim, action_dim, published=published)
    (directory / 'config.json').write_text(json.dumps(config, indent=2))
    write_processors(directory, config, seed)
    gemma_tokenizer(directory, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    model = Pi0Model(parse_config(config))
    _randomise(model, generator)
    save_file(lerobot_state(model, generator, dtype), str(directory / 'model.safetensors'),
              metadata={'format': 'pt'})
    if options:
        (directory / 'specprune_adapter.json').write_text(json.dumps(options, indent=2))
    return directory
