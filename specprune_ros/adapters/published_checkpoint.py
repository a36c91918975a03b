"""Read OpenVLA / OpenVLA-OFT checkpoints in their published Hugging Face layout from a local directory.

Files (OpenVLA ``openvla/openvla-7b``; OFT ``moojink/openvla-7b-oft-finetuned-libero-*``)::

    config.json                         OpenVLAConfig: timm_model_ids, image_sizes, use_fused_vision_backbone,
                                        text_config (Llama; only non-default fields), n_action_bins,
                                        pad_to_multiple_of, norm_stats
    model.safetensors.index.json        weight_map -> model-0000k-of-0000n.safetensors (or one model.safetensors)
    tokenizer.json / tokenizer.model    Llama tokenizer (+ tokenizer_config.json, special_tokens_map.json)
    preprocessor_config.json            image sizes, interpolation, per-backbone mean/std, resize strategy (optional)
    dataset_statistics.json             replaces config.json's norm_stats when present (OFT does this)
    action_head--<step>_checkpoint.pt        OFT only: L1 regression head (torch.save'd state dict, maybe 'module.')
    proprio_projector--<step>_checkpoint.pt  OFT only: required unless specprune_adapter.json says "proprio": false
    specprune_adapter.json              optional, ours: robot-side adapter options (unnorm_key, camera names, ...)

Nothing is downloaded: every file must be in the directory, and a missing or malformed one raises
:class:`CheckpointError` naming it. Weights are materialised without a random initialisation first (modules are
built on the ``meta`` device and the checkpoint tensors are assigned, already on the target device and dtype).

``config.json`` may carry ``timm_model_overrides`` (a list with one dict per vision backbone overriding
:class:`~specprune_ros.adapters.vit.ViTSpec` fields): the real checkpoints do not have it (their ViT shapes come from
the timm model ids); the tiny test checkpoints use it to shrink the backbones.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from specprune_ros.adapters.preprocessing import ImageTransform
from specprune_ros.adapters.vit import ViTSpec, timm_spec
from specprune_ros.policy.errors import CheckpointError

CONFIG_FILE = 'config.json'
INDEX_FILE = 'model.safetensors.index.json'
WEIGHTS_FILE = 'model.safetensors'
STATS_FILE = 'dataset_statistics.json'
PREPROCESSOR_FILE = 'preprocessor_config.json'
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model')
OPTIONS_FILE = 'specprune_adapter.json'
ACTION_HEAD = 'action_head'
PROPRIO_PROJECTOR = 'proprio_projector'
UNSUPPORTED_COMPONENTS = {'noisy_action_projector': 'diffusion action heads', 'vision_backbone': 'FiLM'}
OFT_FILE_PREFIXES = (ACTION_HEAD, PROPRIO_PROJECTOR, 'noisy_action_projector')
OFT_OPTIONS = ('chunk_size', 'num_images', 'proprio')       # specprune_adapter.json keys only OpenVLA-OFT reads
HF_CACHE_PREFIX = 'models--'

# transformers 4.40's LlamaConfig defaults: what the published checkpoints' minimal ``text_config`` expands to
# (the remote code builds ``LlamaConfig(**text_config)`` with those defaults; Llama-2 7B's shapes).
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=None, hidden_act='silu', max_position_embeddings=2048,
                      rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, attention_bias=False,
                      attention_dropout=0.0, mlp_bias=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
_IGNORED_KEY_SUFFIXES = ('rotary_emb.inv_freq',)      # buffers some exports carry; recomputed here


@dataclass
class PrismaticCheckpoint:
    """Everything read from a checkpoint directory except the big weights."""

    directory: Path
    config: dict
    kind: str                                   # 'openvla' | 'openvla-oft'
    vision_specs: list[ViTSpec]
    text_config: LlamaConfig
    transform: ImageTransform
    norm_stats: dict
    n_action_bins: int
    pad_to_multiple_of: int
    weight_map: dict[str, Path]                 # parameter name -> file
    components: dict[str, Path] = field(default_factory=dict)   # OFT: 'action_head' / 'proprio_projector' -> file
    options: dict = field(default_factory=dict)                 # specprune_adapter.json
    stats_source: str = STATS_FILE                              # where ``norm_stats`` were read (for errors)

    @property
    def action_vocab_size(self) -> int:
        """The tokenizer's vocabulary size OpenVLA de-tokenises against (embedding rows minus the padding)."""
        return int(self.text_config.vocab_size) - self.pad_to_multiple_of


def _read_json(directory: Path, name: str, required: bool = True) -> Optional[Any]:
    path = directory / name
    if not path.is_file():
        if required:
            raise CheckpointError(f'checkpoint {directory}: missing {name}')
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f'checkpoint {directory}: malformed {name}: {error}') from error


def check_checkpoint_directory(directory: str | Path) -> Path:
    """The checkpoint directory as a path; a file, a missing path or a Hugging Face cache root is an error."""
    directory = Path(directory).expanduser()
    if directory.is_file():
        raise CheckpointError(f'checkpoint path {directory} is a file, not a directory: give the checkpoint '
                              f'directory that holds it ({directory.parent})')
    if not directory.is_dir():
        raise CheckpointError(f'checkpoint directory {directory} does not exist')
    snapshots = directory / 'snapshots'
    if directory.name.startswith(HF_CACHE_PREFIX) and snapshots.is_dir() and not (directory / CONFIG_FILE).exists():
        found = sorted(p.name for p in snapshots.iterdir() if p.is_dir())
        example = snapshots / (found[0] if found else '<hash>')
        raise CheckpointError(f'checkpoint {directory} is the root of a Hugging Face cache repository: give its '
                              f'snapshots/<hash>/ directory, e.g. {example}')
    return directory


def is_prismatic_config(config: dict) -> bool:
    """True for an OpenVLA / Prismatic ``config.json`` (either kind)."""
    archs = config.get('architectures') or []
    return (config.get('model_type') in ('openvla', 'prismatic') or 'OpenVLAForActionPrediction' in archs
            or ('timm_model_ids' in config and 'text_config' in config))


def find_component(directory: Path, name: str) -> Optional[Path]:
    """The single ``<name>--*checkpoint.pt`` (or ``<name>*.safetensors``) file, None if absent."""
    def fits(p: Path) -> bool:
        torch_save = p.name.startswith(name + '--') and 'checkpoint' in p.name and p.suffix == '.pt'
        return p.is_file() and p.name.startswith(name) and (torch_save or p.suffix == '.safetensors')

    matches = sorted(p for p in directory.iterdir() if fits(p))
    if len(matches) > 1:
        raise CheckpointError(f'checkpoint {directory}: {len(matches)} {name} files ({[p.name for p in matches]}); '
                              'keep exactly one')
    return matches[0] if matches else None


def _near_misses(directory: Path, name: str) -> list[str]:
    """Files whose name starts with ``name`` that :func:`find_component` does not take (e.g. ``action_head--5.pt``)."""
    found = find_component(directory, name)
    return sorted(p.name for p in directory.iterdir()
                  if p.is_file() and p.name.lower().startswith(name) and p != found)


def oft_signs(directory: Path, options: Optional[dict] = None) -> list[str]:
    """What marks ``directory`` as OpenVLA-OFT: its component files and OFT-only ``specprune_adapter.json`` keys."""
    signs = sorted(p.name for p in directory.iterdir()
                   if p.is_file() and p.name.lower().startswith(OFT_FILE_PREFIXES))
    if options is None:
        options = _read_json(directory, OPTIONS_FILE, required=False)
    if isinstance(options, dict):
        signs += [f'{OPTIONS_FILE} "{key}"' for key in OFT_OPTIONS if key in options]
    return signs


def _missing_component(directory: Path, name: str, signs: list[str]) -> str:
    """The message for an OFT checkpoint without a loadable ``name--<step>_checkpoint.pt``."""
    message = f'checkpoint {directory}: missing {name}--<step>_checkpoint.pt'
    near = _near_misses(directory, name)
    if near:
        message += f'; found {", ".join(near)}: rename it to {name}--<step>_checkpoint.pt'
    signs = [sign for sign in signs if sign not in near]
    if signs:
        message += f' (the directory is OpenVLA-OFT: {", ".join(signs)})'
    return message


def detect_kind(directory: str | Path) -> str:
    """'reference' (this project's checkpoint), 'openvla' or 'openvla-oft' (an ``action_head--*`` file present).

    A directory with signs of OpenVLA-OFT (:func:`oft_signs`) but no loadable action head is an error: loaded as
    OpenVLA it would act without the head the model was trained with.
    """
    directory = check_checkpoint_directory(directory)
    config = _read_json(directory, CONFIG_FILE)
    if not isinstance(config, dict):
        raise CheckpointError(f'checkpoint {directory}: malformed {CONFIG_FILE}: not a JSON object')
    if config.get('architecture') == 'specprune_ros.ReferenceVLA':
        return 'reference'
    if not is_prismatic_config(config):
        raise CheckpointError(f'checkpoint {directory}: {CONFIG_FILE} is neither an OpenVLA (model_type "openvla") '
                              'nor a specprune_ros reference checkpoint')
    if find_component(directory, ACTION_HEAD) is not None:
        return 'openvla-oft'
    signs = oft_signs(directory)
    if signs:
        raise CheckpointError(_missing_component(directory, ACTION_HEAD, signs))
    return 'openvla'


def _text_config(directory: Path, config: dict, attn_implementation: str) -> LlamaConfig:
    text = config.get('text_config')
    if not isinstance(text, dict):
        raise CheckpointError(f'checkpoint {directory}: malformed {CONFIG_FILE}: no text_config object')
    if text.get('model_type', 'llama') != 'llama':
        raise CheckpointError(f"checkpoint {directory}: {CONFIG_FILE}: text_config model_type "
                              f"{text.get('model_type')!r} is not supported (Llama only)")
    values = {**LLAMA_DEFAULTS, **{k: v for k, v in text.items() if k not in ('model_type', 'torch_dtype', 'dtype')}}
    try:
        llama = LlamaConfig(**values)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f'checkpoint {directory}: malformed text_config in {CONFIG_FILE}: {error}') from error
    llama._attn_implementation = attn_implementation
    return llama


def _vision_specs(directory: Path, config: dict) -> list[ViTSpec]:
    ids = config.get('timm_model_ids')
    if not isinstance(ids, list) or not 1 <= len(ids) <= 2:
        raise CheckpointError(f'checkpoint {directory}: malformed {CONFIG_FILE}: timm_model_ids must list 1 or 2 ids')
    fused = config.get('use_fused_vision_backbone', len(ids) == 2)
    if bool(fused) != (len(ids) == 2):
        raise CheckpointError(f'checkpoint {directory}: {CONFIG_FILE}: use_fused_vision_backbone={fused} but '
                              f'{len(ids)} timm_model_ids')
    sizes = config.get('image_sizes') or [224] * len(ids)
    acts = config.get('timm_override_act_layers') or [None] * len(ids)
    overrides = config.get('timm_model_overrides') or [{}] * len(ids)
    try:
        return [timm_spec(ids[i], sizes[i], acts[i], overrides[i]) for i in range(len(ids))]
    except (ValueError, IndexError, TypeError) as error:
        raise CheckpointError(f'checkpoint {directory}: {CONFIG_FILE}: {error}') from error


def _transform(directory: Path, specs: list[ViTSpec], config: dict, center_crop: bool) -> ImageTransform:
    pre = _read_json(directory, PREPROCESSOR_FILE, required=False) or {}
    sizes = pre.get('input_sizes') or [[3, s.img_size, s.img_size] for s in specs]
    size = int(sizes[0][-1])
    if any(int(s[-1]) != size for s in sizes) or any(s.img_size != size for s in specs):
        raise CheckpointError(f'checkpoint {directory}: image sizes differ between {PREPROCESSOR_FILE} / '
                              f'{CONFIG_FILE} and the backbones')
    means = pre.get('means') or [s.mean for s in specs]
    stds = pre.get('stds') or [s.std for s in specs]
    interpolations = pre.get('interpolations') or ['bicubic']
    try:
        return ImageTransform(size=size, means=tuple(tuple(float(v) for v in m) for m in means),
                              stds=tuple(tuple(float(v) for v in s) for s in stds),
                              resize_strategy=pre.get('image_resize_strategy',
                                                      config.get('image_resize_strategy', 'resize-naive')),
                              interpolation=interpolations[0], center_crop=center_crop)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f'checkpoint {directory}: malformed {PREPROCESSOR_FILE}: {error}') from error


def _weight_map(directory: Path) -> dict[str, Path]:
    index = _read_json(directory, INDEX_FILE, required=False)
    if index is not None:
        weight_map = index.get('weight_map') if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f'checkpoint {directory}: malformed {INDEX_FILE}: no weight_map')
        files = {name: directory / str(file) for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise CheckpointError(f'checkpoint {directory}: missing {file.name} (listed in {INDEX_FILE})')
        return files
    single = directory / WEIGHTS_FILE
    if not single.is_file():
        message = f'checkpoint {directory}: missing {WEIGHTS_FILE} (or {INDEX_FILE} with its shards)'
        pickled = sorted(p.name for p in directory.glob('pytorch_model*.bin'))
        if pickled:
            message += (f'; found {", ".join(pickled)}: only safetensors weights are read, convert them (e.g. '
                        'safetensors.torch.save_file(torch.load(path), "model.safetensors"))')
        raise CheckpointError(message)
    from safetensors import safe_open
    try:
        with safe_open(str(single), framework='pt') as handle:
            return {name: single for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f'checkpoint {directory}: malformed {WEIGHTS_FILE}: {error}') from error


def _proprio_flag(directory: Path, options: dict, proprio: Optional[bool]) -> Optional[bool]:
    """``proprio`` if given, else ``specprune_adapter.json``'s ``"proprio"`` (None when it does not say)."""
    if proprio is None:
        proprio = options.get('proprio')
    if proprio is not None and not isinstance(proprio, bool):
        raise CheckpointError(f'checkpoint {directory}: malformed {OPTIONS_FILE}: "proprio" must be true or false, '
                              f'got {proprio!r}')
    return proprio


def read_checkpoint(directory: str | Path, kind: Optional[str] = None, attn_implementation: str = 'sdpa',
                    center_crop: Optional[bool] = None, proprio: Optional[bool] = None) -> PrismaticCheckpoint:
    """Parse config, statistics, preprocessing and the weight index (no tensors are read).

    OpenVLA-OFT needs its ``proprio_projector`` file unless ``proprio`` (default: ``specprune_adapter.json``'s
    ``"proprio"``) is False, which declares a model trained without the robot state.
    """
    directory = check_checkpoint_directory(directory)
    detected = detect_kind(directory)
    if detected == 'reference':
        raise CheckpointError(f'checkpoint {directory} is a specprune_ros reference checkpoint, not OpenVLA')
    kind = kind or detected
    if kind not in ('openvla', 'openvla-oft'):
        raise ValueError(f"kind must be 'openvla' or 'openvla-oft', got {kind!r}")
    if kind == 'openvla-oft' and detected != 'openvla-oft':
        raise CheckpointError(_missing_component(directory, ACTION_HEAD, []) + ' (an OpenVLA-OFT checkpoint ships '
                              'its action head as a separate file)')
    config = _read_json(directory, CONFIG_FILE)
    options = _read_json(directory, OPTIONS_FILE, required=False) or {}
    if not isinstance(options, dict):
        raise CheckpointError(f'checkpoint {directory}: malformed {OPTIONS_FILE}: not a JSON object')
    proprio = _proprio_flag(directory, options, proprio)
    specs = _vision_specs(directory, config)
    text_config = _text_config(directory, config, attn_implementation)
    if center_crop is None:
        center_crop = bool(options.get('center_crop', kind == 'openvla-oft'))
    transform = _transform(directory, specs, config, center_crop)
    stats = _read_json(directory, STATS_FILE, required=False)
    norm_stats = stats if stats is not None else config.get('norm_stats') or {}
    stats_source = STATS_FILE if stats is not None else f'{CONFIG_FILE} norm_stats'
    if not isinstance(norm_stats, dict):
        raise CheckpointError(f'checkpoint {directory}: malformed norm statistics (not an object)')
    components = {}
    if kind == 'openvla-oft':
        for name, what in UNSUPPORTED_COMPONENTS.items():
            if find_component(directory, name) is not None:
                raise CheckpointError(f'checkpoint {directory}: has a {name} file: OpenVLA-OFT with {what} is not '
                                      'supported (only the L1-regression head)')
        components[ACTION_HEAD] = find_component(directory, ACTION_HEAD)
        projector = find_component(directory, PROPRIO_PROJECTOR)
        if projector is not None and proprio is False:
            raise CheckpointError(f'checkpoint {directory}: {OPTIONS_FILE} says "proprio": false but the checkpoint '
                                  f'has {projector.name}: the model was trained with the robot state')
        if projector is None and proprio is not False:
            raise CheckpointError(_missing_component(directory, PROPRIO_PROJECTOR, []) + ': OpenVLA-OFT takes '
                                  'the robot state through it; for a model trained without proprio set '
                                  f'"proprio": false in {OPTIONS_FILE}')
        if projector is not None:
            components[PROPRIO_PROJECTOR] = projector
    try:
        n_bins = int(config.get('n_action_bins', 256))
        pad = int(config.get('pad_to_multiple_of', 64))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f'checkpoint {directory}: malformed {CONFIG_FILE}: {error}') from error
    return PrismaticCheckpoint(directory=directory, config=config, kind=kind, vision_specs=specs,
                               text_config=text_config, transform=transform, norm_stats=norm_stats,
                               n_action_bins=n_bins, pad_to_multiple_of=pad, weight_map=_weight_map(directory),
                               components=components, options=options, stats_source=stats_source)


def load_tokenizer(directory: str | Path):
    """The checkpoint's own tokenizer, from local files only.

    The class named in ``tokenizer_config.json`` (``LlamaTokenizer`` for the published checkpoints) is used
    directly: ``AutoTokenizer`` would read ``config.json``, whose ``auto_map`` points at remote code.
    """
    import transformers
    directory = check_checkpoint_directory(directory)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f'checkpoint {directory}: missing {TOKENIZER_FILES[0]} (or {TOKENIZER_FILES[1]})')
    settings = _read_json(directory, 'tokenizer_config.json', required=False) or {}
    name = settings.get('tokenizer_class') if isinstance(settings, dict) else None
    cls = getattr(transformers, str(name), None) if name else None
    if cls is None or not hasattr(cls, 'from_pretrained'):
        cls = transformers.PreTrainedTokenizerFast
    try:
        return cls.from_pretrained(str(directory), local_files_only=True)
    except Exception as error:  # tokenizer loading raises many error types
        raise CheckpointError(f'checkpoint {directory}: cannot load the tokenizer ({cls.__name__}): {error}') from error


def read_state(files: dict[str, Path], names: Optional[set[str]] = None, device: str | torch.device = 'cpu',
               dtype: Optional[torch.dtype] = None, directory: Optional[Path] = None) -> dict[str, torch.Tensor]:
    """Tensors of the safetensors files, on ``device``, floating ones cast to ``dtype``."""
    from safetensors import safe_open
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        if names is None or name in names:
            by_file.setdefault(file, []).append(name)
    state = {}
    for file, keys in by_file.items():
        try:
            with safe_open(str(file), framework='pt', device=str(device)) as handle:
                available = set(handle.keys())
                for key in keys:
                    if key not in available:
                        raise CheckpointError(f'checkpoint {directory or file.parent}: {file.name} lacks {key} '
                                              'listed in the index')
                    tensor = handle.get_tensor(key)
                    state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(f'checkpoint {directory or file.parent}: malformed {file.name}: {error}') from error
    return state


def read_component(path: Path, device: str | torch.device = 'cpu',
                   dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """An OFT component state dict (``torch.save`` or safetensors), DDP's ``module.`` prefix removed."""
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file
            raw = load_file(str(path), device=str(device))
        else:
            raw = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as error:
        raise CheckpointError(f'checkpoint {path.parent}: malformed {path.name}: {error}') from error
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f'checkpoint {path.parent}: malformed {path.name}: not a state dict of tensors')
    out = {}
    for key, tensor in raw.items():
        key = key[len('module.'):] if key.startswith('module.') else key
        out[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return out


def assign_state(module: nn.Module, state: dict[str, torch.Tensor], source: str, directory: Path,
                 files: Optional[dict[str, Path]] = None) -> None:
    """Strictly load ``state`` into a (meta-device) ``module`` by assignment.

    Errors name ``source`` (or the file of the offending tensor, from ``files``).
    """
    expected = module.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_KEY_SUFFIXES)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f'{len(missing)} missing weight(s), e.g. {missing[:3]}')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected weight(s), e.g. {unexpected[:3]}')
        raise CheckpointError(f'checkpoint {directory}: {source} does not fit {CONFIG_FILE}: ' + '; '.join(parts))
    for key, tensor in state.items():
        if tuple(expected[key].shape) != tuple(tensor.shape):
            where = files[key].name if files and key in files else source
            raise CheckpointError(f'checkpoint {directory}: {where}: {key} has shape {tuple(tensor.shape)}, '
                                  f'{CONFIG_FILE} implies {tuple(expected[key].shape)}')
    module.load_state_dict(state, strict=True, assign=True)


def restore_rotary(decoder: nn.Module, config: LlamaConfig, device: str | torch.device) -> None:
    """Recompute the (non-persistent, float32) rotary-embedding buffers after a meta-device build."""
    rotary = LlamaRotaryEmbedding(config=config)
    decoder.rotary_emb = rotary.to(device)


def assert_materialised(module: nn.Module, what: str) -> None:
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_meta:
            raise CheckpointError(f'{what}: {name} was not loaded')
