"""VLA-Pruner's own OpenVLA path, served to ``benchmarks/peer_latency.py`` from a separate process.

VLA-Pruner ships its pruning inside a fork of transformers 4.39 (``src/openvla/transformers``), which cannot share
a process with the transformers this package uses. The benchmark starts this script with the fork's ``src`` first
on ``PYTHONPATH`` and talks to it over stdin / stdout, one JSON object a line:

    -> {"cmd": "load", "checkout": ..., "weights": ..., "inputs": ..., "threads": 2}
    <- {"ok": true, "info": {...}}
    -> {"cmd": "step", "mode": "unpruned" | "pruned", "frame": 3}
    <- {"ok": true, "ms": ..., "tokens": [...], "kept_visual": ..., "parts": {...}}

The model is VLA-Pruner's ``OpenVLAForActionPrediction`` (its ``prismatic/extern/hf/modeling_prismatic.py``) with
the fork's Llama (eager attention, as its evaluation loads it) and the projector and Llama weights the benchmark
saved. The vision backbone is replaced by a stand-in returning the benchmark's saved patch features of the frame
(the ViTs are not pruned and run the same code on both sides, so neither side times them). The calls are those of
VLA-Pruner's LIBERO evaluation (``predict_action(..., do_sample=False, return_dict_in_generate=True,
output_attentions=True)``); 'pruned' keeps its own temporal attention history across frames.

Nothing of VLA-Pruner's code is copied here: it is imported from the checkout, with these run-time shims:
``requests`` and the fork's dependency-version check stubbed (neither is used offline; the check refuses newer
tokenizers), a ``timm`` stand-in with the version its code insists on (its ViTs are never built), and the vision
backbone class swapped for the stand-in above. This file imports nothing of ``specprune_ros`` (transformers 5).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import types
from collections import deque
from pathlib import Path
from typing import Any

HF_DIR = Path('src/openvla/prismatic/extern/hf')


class _StubModule(types.ModuleType):
    """A module whose missing attributes are exception classes (capitalised) or further stub modules."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith('__'):
            raise AttributeError(name)
        value: Any = type(name, (Exception,), {}) if name[:1].isupper() else _StubModule(f'{self.__name__}.{name}')
        setattr(self, name, value)
        return value


def install_shims() -> None:
    """Stand-ins for what the fork imports but never uses offline (see the module docstring)."""
    for name in ('requests', 'requests.exceptions', 'requests.adapters'):
        sys.modules.setdefault(name, _StubModule(name))
    sys.modules['requests'].exceptions = sys.modules['requests.exceptions']
    check = types.ModuleType('transformers.dependency_versions_check')
    check.dep_version_check = lambda *args, **kwargs: None
    sys.modules['transformers.dependency_versions_check'] = check
    import transformers  # noqa: F401  (the fork, imported before the timm stand-in exists: it probes for timm)
    timm = types.ModuleType('timm')
    timm.__version__ = '0.9.16'
    timm_models = types.ModuleType('timm.models')
    timm_vit = types.ModuleType('timm.models.vision_transformer')
    timm_vit.LayerScale = type('LayerScale', (), {})
    timm.models, timm_models.vision_transformer = timm_models, timm_vit
    sys.modules.update({'timm': timm, 'timm.models': timm_models, 'timm.models.vision_transformer': timm_vit})


def _load_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_modeling(checkout: Path) -> types.ModuleType:
    """VLA-Pruner's ``modeling_prismatic`` under a private package name (its relative import resolved there)."""
    hf = checkout / HF_DIR
    if not (hf / 'modeling_prismatic.py').is_file():
        raise FileNotFoundError(f'{hf / "modeling_prismatic.py"} not found: is {checkout} a VLA-Pruner checkout?')
    package = types.ModuleType('vla_pruner_hf')
    package.__path__ = [str(hf)]
    sys.modules['vla_pruner_hf'] = package
    _load_file('vla_pruner_hf.configuration_prismatic', hf / 'configuration_prismatic.py')
    return _load_file('vla_pruner_hf.modeling_prismatic', hf / 'modeling_prismatic.py')


class SavedFeatures:
    """The vision-backbone stand-in's source: the saved patch features of the frame being served."""

    def __init__(self, features: Any) -> None:
        self.features = features
        self.frame = 0

    def backbone_class(self, embed_dim: int) -> type:
        import torch
        source = self

        class SavedFeatureBackbone(torch.nn.Module):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__()
                self.embed_dim = embed_dim

            def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
                return source.features[source.frame:source.frame + 1]

        return SavedFeatureBackbone


class PartClock:
    """Seconds spent inside some of VLA-Pruner's own functions during one step (wrapped, not changed)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, owner: Any, attribute: str, part: str) -> None:
        inner = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start

        setattr(owner, attribute, timed)


class Worker:
    def __init__(self) -> None:
        self.vla = None
        self.inputs: dict = {}
        self.state: dict[str, dict] = {}
        self.clock = PartClock()

    def load(self, request: dict) -> dict:
        import torch
        torch.set_num_threads(int(request.get('threads', 2)))
        torch.manual_seed(0)
        modeling = load_modeling(Path(request['checkout']))
        self.inputs = torch.load(request['inputs'], weights_only=True)
        meta = json.loads(Path(request['meta']).read_text())
        source = SavedFeatures(self.inputs['features'])
        self.source = source
        modeling.PrismaticVisionBackbone = source.backbone_class(int(meta['vision_dim']))
        config = modeling.OpenVLAConfig(vision_backbone_id='dinosiglip-vit-so-224px', llm_backbone_id='llama2-7b-pure',
                                        use_fused_vision_backbone=True, text_config=meta['text_config'],
                                        norm_stats=meta['norm_stats'], n_action_bins=meta['n_action_bins'],
                                        pad_to_multiple_of=meta['pad_to_multiple_of'],
                                        pad_token_id=meta['pad_token_id'])
        config._attn_implementation = 'eager'       # as VLA-Pruner's evaluation loads the model
        vla = modeling.OpenVLAForActionPrediction(config).eval()
        state = torch.load(request['weights'], weights_only=True)
        missing, unexpected = vla.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith('vision_backbone.') and 'rotary_emb' not in k]
        if missing or unexpected:
            raise RuntimeError(f'weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}')
        vla.to(torch.float32)
        # VLA-Pruner's evaluation settings (its run_vla_pruner scripts and GenerateConfig defaults)
        vla.use_fastv = False
        vla.fastv_k = int(meta.get('fastv_k', 3))
        vla.fastv_r = float(meta.get('fastv_r', 0.75))
        vla.fastv_image_token_start_index = 1
        vla.fastv_image_token_length = int(meta['patches'])
        vla.use_text_vision_selection = False
        vla.use_prefil_attention = False
        vla.use_temporal = True
        vla.av_decay = 0.8
        # its attention extraction after generation and its causal-mask builder (every forward call)
        self.clock.wrap(vla, '_extract_action_modality_attentions', 'attention_extraction')
        self.clock.wrap(vla.language_model.model, '_update_causal_mask', 'causal_mask')
        self.vla = vla
        self.state = {mode: {'av_hist': deque(maxlen=3), 'step': None} for mode in ('unpruned', 'pruned')}
        return {'transformers': sys.modules['transformers'].__version__,
                'transformers_file': sys.modules['transformers'].__file__,
                'attn_implementation': vla.language_model.config._attn_implementation,
                'frames': int(self.inputs['features'].shape[0])}

    def reset(self, request: dict) -> dict:
        for mode in self.state:
            self.state[mode] = {'av_hist': deque(maxlen=3), 'step': None}
        return {}

    def step(self, request: dict) -> dict:
        import torch
        vla, mode, frame = self.vla, request['mode'], int(request['frame'])
        state = self.state[mode]
        vla.use_fastv = mode == 'pruned'
        vla.av_hist, vla.step = state['av_hist'], state['step']
        self.source.frame = frame
        input_ids = self.inputs['input_ids'][frame].unsqueeze(0)
        input_ids = input_ids[:, :int(self.inputs['lengths'][frame])]
        pixel_values = torch.zeros(1, 6, 1, 1)
        lm = vla.language_model
        for holder in (lm, lm.model):          # one mode's pruning record must not leak into the other's call
            if hasattr(holder, 'pruning_info'):
                holder.pruning_info = None
        self.clock.seconds = {}
        start = time.perf_counter()
        with torch.inference_mode():
            actions, caches = vla.predict_action(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                                 pixel_values=pixel_values, unnorm_key=request.get('unnorm_key'),
                                                 do_sample=False, return_dict_in_generate=True,
                                                 output_attentions=True, past_key_values=None)
        elapsed = time.perf_counter() - start
        state['av_hist'], state['step'] = vla.av_hist, vla.step
        info = getattr(lm, 'pruning_info', None) or getattr(lm.model, 'pruning_info', None)
        patches, layers = int(self.inputs['features'].shape[1]), vla.language_model.config.num_hidden_layers
        kept = float(patches)
        if info is not None and info.get('kept_indices') is not None:       # visual tokens per layer, averaged
            keep, first = info['kept_indices'], int(info['pruning_layer'])
            after = int(((keep >= 1) & (keep < 1 + patches)).sum())
            kept = (first * patches + (layers - first) * after) / layers
        return {'ms': 1000 * elapsed, 'actions': [float(a) for a in actions.reshape(-1)], 'kept_visual': kept,
                'pruning_layer': None if info is None else info.get('pruning_layer'),
                'parts_ms': {k: 1000 * v for k, v in self.clock.seconds.items()}}


def main() -> None:
    sys.path.append(str(Path(__file__).resolve().parents[1]))     # after the fork: only for the help formatter
    from specprune_ros.command_line import HelpFormatter            # argparse alone (no torch, no transformers)
    argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter).parse_args()
    install_shims()
    worker = Worker()
    handlers = {'load': worker.load, 'step': worker.step, 'reset': worker.reset}
    for line in sys.stdin:
        request = json.loads(line)
        if request.get('cmd') == 'quit':
            break
        try:
            reply = {'ok': True, **handlers[request['cmd']](request)}
        except Exception as error:           # reported to the benchmark, which names the peer and stops
            import traceback
            reply = {'ok': False, 'error': f'{type(error).__name__}: {error}', 'trace': traceback.format_exc()}
        sys.stdout.write(json.dumps(reply) + '\n')
        sys.stdout.flush()


if __name__ == '__main__':
    main()
