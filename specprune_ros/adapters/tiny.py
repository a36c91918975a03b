"""Tiny random OpenVLA / OpenVLA-OFT checkpoints in the published Hugging Face layout (tests and benchmarks).

Same module names and file layout as ``openvla/openvla-7b`` and ``moojink/openvla-7b-oft-finetuned-libero-*``;
only the widths and depths are small (DINOv2-like 32-wide and SigLIP-like 48-wide ViTs of 3 blocks, a 4-layer
64-wide Llama) and the image is 112 px (8 x 8 patches of 14 px). The ViT sizes are written to ``config.json`` as
``timm_model_overrides`` (the real configs name timm models instead). The tokenizer is a small byte-fallback BPE
with the Llama layout (``<unk>``, ``<s>``, ``</s>``, 256 byte tokens, then pieces; 384 ids), trained here on
instruction-like sentences; the embedding table has 384 + 64 rows like Llama-2's 32000 + 64 (``<PAD>`` + padding to
a multiple of 64), so OpenVLA's 256 action tokens are ids 128..383.

Weights are random (seeded), saved in bfloat16 and split over two safetensors shards with an index, like the
published checkpoints. The LM head is initialised wider than usual so greedy decoding is not decided by ties.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from transformers import LlamaConfig

from specprune_ros.adapters.published_checkpoint import (CONFIG_FILE, INDEX_FILE, PREPROCESSOR_FILE, STATS_FILE,
                                                         _text_config, _vision_specs)
from specprune_ros.adapters.prismatic import L1RegressionActionHead, PrismaticVLA, ProprioProjector

TOKENIZER_VOCAB = 384
PAD_TO = 64
DATASET = 'tiny_libero_spatial_no_noops'
WORDS = ('pick up the black bowl between the plate and the ramekin and place it on the plate open the top drawer '
         'of the cabinet put the cream cheese in the bowl turn on the stove push the plate to the front of the '
         'stove put the wine bottle on top of the cabinet close the microwave move the red block left right '
         'alphabet soup tomato sauce basket butter milk orange juice ketchup salad dressing chocolate pudding '
         'in what action should robot take to out').split()


def llama_layout_tokenizer(vocab_size: int = TOKENIZER_VOCAB, seed: int = 0, exact: bool = True,
                           extra_words: tuple[str, ...] = (), split_punctuation: bool = False):
    """A ``tokenizers.Tokenizer`` with the Llama layout, trained in memory on instruction-like prompts.

    The layout: ``<unk>``, ``<s>``, ``</s>``, 256 byte tokens, then pieces; ``<PAD>`` appended after them.

    ``exact``: raise unless the trainer reaches ``vocab_size`` pieces (a larger request may stop early once every word
    of the corpus is one piece); ``extra_words``: more words for the training prompts; ``split_punctuation``:
    punctuation and line breaks are pieces of their own (as in Llama's vocabulary, so a prompt has about Llama's
    token count).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    rng = np.random.default_rng(seed)
    words = list(WORDS) + [w for w in extra_words if w not in WORDS]
    corpus = ['In: What action should the robot take to '
              + ' '.join(rng.choice(words, size=int(rng.integers(3, 12)))) + '?\nOut:' for _ in range(400)]
    specials = ['<unk>', '<s>', '</s>'] + [f'<0x{b:02X}>' for b in range(256)]
    tokenizer = Tokenizer(models.BPE(unk_token='<unk>', byte_fallback=True, fuse_unk=True))
    metaspace = pre_tokenizers.Metaspace(replacement='\u2581', prepend_scheme='first')
    punctuation = pre_tokenizers.Split(Regex(r'[:?.,!\n]'), 'isolated')
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([punctuation, metaspace]) if split_punctuation else metaspace
    tokenizer.decoder = decoders.Metaspace(replacement='\u2581', prepend_scheme='first')
    alphabet = sorted(set(''.join(corpus).replace(' ', '\u2581')) | {'\u2581'})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    if exact and tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f'tiny tokenizer has {tokenizer.get_vocab_size()} tokens, wanted {vocab_size}')
    tokenizer.post_processor = processors.TemplateProcessing(single='<s> $A', pair='<s> $A <s> $B',
                                                             special_tokens=[('<s>', 1)])
    tokenizer.add_special_tokens(['<PAD>'])
    return tokenizer


def tiny_tokenizer(directory: Path, vocab_size: int = TOKENIZER_VOCAB, seed: int = 0) -> None:
    """A Llama-layout BPE tokenizer (tokenizer.json + configs) in ``directory``."""
    tokenizer = llama_layout_tokenizer(vocab_size, seed)
    tokenizer.save(str(directory / 'tokenizer.json'))
    (directory / 'tokenizer_config.json').write_text(json.dumps({
        'tokenizer_class': 'LlamaTokenizer', 'add_bos_token': True, 'add_eos_token': False, 'bos_token': '<s>',
        'eos_token': '</s>', 'unk_token': '<unk>', 'pad_token': '<PAD>', 'legacy': False,
        'model_max_length': 2048, 'padding_side': 'right'}, indent=2))
    (directory / 'special_tokens_map.json').write_text(json.dumps(
        {'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>', 'pad_token': '<PAD>'}, indent=2))
    (directory / 'added_tokens.json').write_text(json.dumps({'<PAD>': vocab_size}))


def _stats(dim: int, rng: np.random.Generator, gripper_mask: bool) -> dict:
    low = -rng.uniform(0.5, 2.0, size=dim)
    high = rng.uniform(0.5, 2.0, size=dim)
    mask = [True] * dim
    if gripper_mask:
        mask[-1] = False
    return {'mean': ((low + high) / 2).tolist(), 'std': ((high - low) / 4).tolist(), 'min': (low * 1.2).tolist(),
            'max': (high * 1.2).tolist(), 'q01': low.tolist(), 'q99': high.tolist(), 'mask': mask}


def tiny_config(kind: str, image_size: int = 112, llm_layers: int = 4, hidden: int = 64, seed: int = 0,
                action_dim: int = 7, proprio_dim: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    stats = {'action': _stats(action_dim, rng, gripper_mask=True), 'num_transitions': 1000, 'num_trajectories': 10}
    if kind == 'openvla-oft':
        stats['proprio'] = _stats(proprio_dim, rng, gripper_mask=False)
    return {
        'arch_specifier': 'no-align+fused-gelu-mlp',
        'architectures': ['OpenVLAForActionPrediction'],
        'auto_map': {'AutoConfig': 'configuration_prismatic.OpenVLAConfig',
                     'AutoModelForVision2Seq': 'modeling_prismatic.OpenVLAForActionPrediction'},
        'hf_llm_id': 'meta-llama/Llama-2-7b-hf',
        'image_resize_strategy': 'resize-naive',
        'image_sizes': [image_size, image_size],
        'llm_backbone_id': 'llama2-7b-pure',
        'llm_max_length': 2048,
        'model_type': 'openvla',
        'n_action_bins': 256,
        'norm_stats': {DATASET: stats},
        'output_projector_states': False,
        'pad_to_multiple_of': PAD_TO,
        'pad_token_id': TOKENIZER_VOCAB,
        'text_config': {'model_type': 'llama', 'pad_token_id': TOKENIZER_VOCAB, 'torch_dtype': 'bfloat16',
                        'vocab_size': TOKENIZER_VOCAB + PAD_TO, 'hidden_size': hidden,
                        'intermediate_size': 2 * hidden, 'num_hidden_layers': llm_layers,
                        'num_attention_heads': 4, 'num_key_value_heads': 4},
        'timm_model_ids': ['vit_large_patch14_reg4_dinov2.lvd142m', 'vit_so400m_patch14_siglip_224'],
        'timm_override_act_layers': [None, None],
        'timm_model_overrides': [{'embed_dim': 32, 'depth': 3, 'num_heads': 2},
                                 {'embed_dim': 48, 'depth': 3, 'num_heads': 2}],
        'torch_dtype': 'bfloat16',
        'transformers_version': '4.40.1',
        'use_fused_vision_backbone': True,
        'vision_backbone_id': 'dinosiglip-vit-so-224px',
    }


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial random values everywhere (norm gains, layer scales and biases included)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith('scale_factor') or (name.endswith('weight') and param.dim() == 1):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif param.dim() == 1 or name.endswith(('cls_token', 'reg_token', 'latent')):
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param[0].numel() if param.dim() > 1 else param.numel()
                param.copy_(torch.randn(param.shape, generator=generator) / max(fan_in, 1) ** 0.5)


def _save_shards(state: dict[str, torch.Tensor], directory: Path, shards: int) -> None:
    from safetensors.torch import save_file
    keys = sorted(state)
    if shards <= 1:
        save_file({k: state[k].contiguous() for k in keys}, str(directory / 'model.safetensors'),
                  metadata={'format': 'pt'})
        return
    size = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f'model-{i + 1:05d}-of-{shards:05d}.safetensors'
        part = {k: state[k].contiguous() for k in keys[i * size:(i + 1) * size]}
        save_file(part, str(directory / name), metadata={'format': 'pt'})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / INDEX_FILE).write_text(json.dumps({'metadata': {'total_size': total}, 'weight_map': weight_map},
                                                   indent=2))


def write_tiny_checkpoint(directory: str | Path, kind: str = 'openvla', seed: int = 0, image_size: int = 112,
                          llm_layers: int = 4, shards: int = 2, dtype: torch.dtype = torch.bfloat16,
                          proprio: bool = True, chunk_size: int = 8, options: Optional[dict] = None) -> Path:
    """Write a tiny random checkpoint of ``kind`` ('openvla' or 'openvla-oft') to ``directory``."""
    if kind not in ('openvla', 'openvla-oft'):
        raise ValueError(f"kind must be 'openvla' or 'openvla-oft', got {kind!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config(kind, image_size=image_size, llm_layers=llm_layers, seed=seed)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    specs = _vision_specs(directory, config)
    (directory / PREPROCESSOR_FILE).write_text(json.dumps({
        'auto_map': {'AutoImageProcessor': 'processing_prismatic.PrismaticImageProcessor',
                     'AutoProcessor': 'processing_prismatic.PrismaticProcessor'},
        'image_processor_type': 'PrismaticImageProcessor', 'image_resize_strategy': 'resize-naive',
        'input_sizes': [[3, image_size, image_size]] * 2, 'interpolations': ['bicubic', 'bicubic'],
        'means': [list(s.mean) for s in specs], 'stds': [list(s.std) for s in specs],
        'processor_class': 'PrismaticProcessor', 'use_fused_vision_backbone': True}, indent=2))
    tiny_tokenizer(directory, seed=seed)
    text_config: LlamaConfig = _text_config(directory, config, 'sdpa')
    generator = torch.Generator().manual_seed(seed)
    model = PrismaticVLA(specs, text_config)
    _randomise(model, generator)
    with torch.no_grad():
        model.language_model.lm_head.weight.mul_(8.0)
    _save_shards({k: v.to(dtype) for k, v in model.state_dict().items()}, directory, shards)
    if kind == 'openvla-oft':
        d = text_config.hidden_size
        action_dim = len(config['norm_stats'][DATASET]['action']['q01'])
        head = L1RegressionActionHead(d, d, action_dim)
        _randomise(head, generator)
        step = 100
        torch.save({f'module.{k}': v.to(dtype) for k, v in head.state_dict().items()},
                   directory / f'action_head--{step}_checkpoint.pt')
        if proprio:
            projector = ProprioProjector(d, len(config['norm_stats'][DATASET]['proprio']['q01']))
            _randomise(projector, generator)
            torch.save({f'module.{k}': v.to(dtype) for k, v in projector.state_dict().items()},
                       directory / f'proprio_projector--{step}_checkpoint.pt')
        (directory / STATS_FILE).write_text(json.dumps(config['norm_stats'], indent=2))
        options = {'chunk_size': chunk_size, **({} if proprio else {'proprio': False}), **(options or {})}
    if options:
        (directory / 'specprune_adapter.json').write_text(json.dumps(options, indent=2))
    return directory
