r"""This package's pruning side by side with the papers' own public code, on the same random model and inputs.

Opt-in: it runs the peers' code from checkouts the user names (nothing of it is copied here)::

    SPECPRUNE_PEER_SPECPRUNE_VLA=/src/SpecPrune-VLA     # github.com/alexwhz-sjtu/SpecPrune-VLA
    SPECPRUNE_PEER_VLA_PRUNER=/src/VLA-Pruner           # github.com/MINT-SJTU/VLA-Pruner
    python benchmarks/peer_latency.py --steps 12 --threads 2 --out docs/benchmarks

With neither variable set it says what is missing and exits; with one, it runs that peer's comparison only.

(a) SpecPrune-VLA, at the OpenVLA-OFT layout (2 x 256 patches at 224 px, proprio token, 56 action slots):
    its ``modeling_llama.py`` (the Llama model it drops into transformers, pruning inside the forward) with
    pruning off and at its defaults (static pruning with its similarity-based static-patch sets, coarse mode,
    ``V_global`` empty, layer-level pruning off), then the OFT action window it reads and the L1 action head;
    against this package's executor unpruned, ``specprune`` at its defaults and ``specprune`` in a configuration
    matched to the code's defaults (see :data:`SPECPRUNE_MATCHED`).
(b) VLA-Pruner, at the OpenVLA layout (1 x 256 patches, prefill + 6 decode steps for 7 action tokens): its own
    ``OpenVLAForActionPrediction.predict_action`` with its transformers 4.39 fork, unpruned and at 25% kept, in a
    separate process (``benchmarks/peer_vla_pruner_worker.py``); against this package's executor unpruned and
    ``vla_pruner`` at 25%.

Same model: OpenVLA(-OFT) at its published layout with random weights (``build_shape``; Llama ``--width`` wide
x ``--layers`` deep), float32 on the CPU; the peers' code gets the very same tensors (in-process for SpecPrune-VLA,
saved to a temporary directory for the VLA-Pruner process). Same inputs: frames of a closed-loop simulator
episode (or ``--frames`` from ``deployment_latency.py --save-frames``), the same prompt token ids, the same patch
features. The ViTs are not pruned by any method and are identical code on both sides: every side gets the
frame's saved patch features instead of running them (vision time is excluded everywhere; the projector,
prompt embedding and everything after run per step).

Timing: every configuration is one runner; per frame they run round-robin in an order that rotates every frame
(the VLA-Pruner runners by alternating calls to its process, which reports its own clock), the first
``--warmup`` policy steps of each episode are not timed. Reported: medians with p10 / p90; each side's speedup
over its own unpruned run; ours / theirs (the absolute ratio of median step times, with a 95% paired bootstrap
interval). The unpruned outputs must agree before any of that is trusted: the normalised actions of the peers'
unpruned run against ours (SpecPrune-VLA: read at upstream OpenVLA-OFT's action window; VLA-Pruner: the
de-tokenised actions).

Measured too (docs/peers.md explains them): how many of SpecPrune-VLA's layer-1 top-K picks are the tokens its
own scores rank top-K (its index mapping), how far its action window moves the actions, the visual tokens each
side keeps per layer.

Shims, all applied at run time by this file or the worker: SpecPrune-VLA's Llama file is loaded as a module of
the installed transformers package (its relative imports resolve there), with its two constant files made
importable under their own names while it loads, its config given the fields transformers 5 moved
(``rope_theta``, ``rope_scaling``, ``pretraining_tp``), its causal-mask builder returning no mask (what it
returns for OFT's all-ones mask with SDPA configured: OFT's pass is bidirectional) and its rotary tables rebuilt
after the shared weights are assigned; a NumPy stand-in for ``skimage.util.view_as_blocks`` (the one scikit-image
call of its similarity code). OpenVLA's hard-coded empty token id 29871 is given the in-memory tokenizer's
empty-token embedding, and both sides use that id.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from specprune_ros.adapters.published_shapes import PublishedShape, build_shape
from specprune_ros.command_line import HelpFormatter
from specprune_ros.core.json_documents import strict_json
from specprune_ros.pruning import build_method

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deployment_latency as harness  # noqa: E402  (sibling benchmark: frames, bootstrap, device name, commit)

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / 'peer_vla_pruner_worker.py'
ENV_SPECPRUNE = 'SPECPRUNE_PEER_SPECPRUNE_VLA'
ENV_VLA_PRUNER = 'SPECPRUNE_PEER_VLA_PRUNER'
OFT_EMPTY_TOKEN_ID = 29871             # OpenVLA(-OFT)'s hard-coded '▁' id (Llama-2's)
# our specprune configured like SpecPrune-VLA's public defaults: no V_global, no layer-level pruning, coarse mode
# always, K = 0.8 * 20 = 16 (primary) and 12 (wrist) of 256 patches, 3K at layer 0, caps 200 / 256 static
SPECPRUNE_MATCHED = {'use_global': False, 'use_layer_pruning': False, 'use_controller': False, 'fixed_mode': 'coarse',
                     'controller': {'alpha': 0.8, 'k_coarse': 20.0, 'camera_scale': (1.0, 0.75)}}
VLA_PRUNER_KEEP = 0.25
TARGETS = {'specprune': 0.85, 'vla_pruner': 0.75}   # ours / theirs at most this (15% and 25% faster)
AGREEMENT_TOL = 1e-4                   # max |normalised action difference| of the unpruned runs


# -- peers: where they are ----------------------------------------------------------------------------------------

def peer_checkouts(environ: Optional[dict] = None) -> tuple[dict[str, Path], list[str]]:
    """The named checkouts that look right, and a line for each peer that is missing or wrong."""
    environ = os.environ if environ is None else environ
    wanted = {'specprune_vla': (ENV_SPECPRUNE, 'modeling_llama.py', 'github.com/alexwhz-sjtu/SpecPrune-VLA'),
              'vla_pruner': (ENV_VLA_PRUNER, 'src/openvla/prismatic/extern/hf/modeling_prismatic.py',
                             'github.com/MINT-SJTU/VLA-Pruner')}
    found, missing = {}, []
    for key, (variable, marker, url) in wanted.items():
        value = environ.get(variable)
        if not value:
            missing.append(f'{variable} is not set (a checkout of {url})')
        elif not (Path(value) / marker).is_file():
            missing.append(f'{variable}={value}: no {marker} there (expected a checkout of {url})')
        else:
            found[key] = Path(value).resolve()
    return found, missing


def checkout_commit(path: Path) -> str:
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=path, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown (not a git work tree)'


# -- SpecPrune-VLA's code, loaded with run-time shims ------------------------------------------------------------

def _view_as_blocks(image: np.ndarray, block_shape: tuple[int, ...]) -> np.ndarray:
    """A NumPy stand-in for ``skimage.util.view_as_blocks`` (non-overlapping blocks, block grid first)."""
    image = np.ascontiguousarray(image)
    grid = tuple(s // b for s, b in zip(image.shape, block_shape))
    split = [x for pair in zip(grid, block_shape) for x in pair]
    order = list(range(0, 2 * len(grid), 2)) + list(range(1, 2 * len(grid), 2))
    return image.reshape(split).transpose(order)


def _load_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _temporary_modules(modules: dict[str, types.ModuleType], argv: list[str]):
    saved = {name: sys.modules.get(name) for name in modules}
    saved_argv = sys.argv
    sys.modules.update(modules)
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved_argv
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _package(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []
    return module


@dataclass
class SpecPruneVLACode:
    """SpecPrune-VLA's Llama file, constants and similarity code, imported from a checkout."""

    llama: types.ModuleType
    constants: types.ModuleType
    similarity: types.ModuleType

    @classmethod
    def load(cls, checkout: Path) -> 'SpecPruneVLACode':
        oft = checkout / 'openvla-oft'
        constants = _load_file('specprune_vla_code.spec_prune_constants',
                               oft / 'experiments' / 'robot' / 'spec_prune_constants.py')
        with _temporary_modules({}, ['libero']), contextlib.redirect_stdout(io.StringIO()):
            # its platform constants follow sys.argv (LIBERO's wanted); it prints which it picked
            vla_constants = _load_file('specprune_vla_code.vla_constants', oft / 'prismatic' / 'vla' / 'constants.py')
        skimage, skimage_util = _package('skimage'), types.ModuleType('skimage.util')
        skimage_util.view_as_blocks = _view_as_blocks
        skimage.util = skimage_util
        aliases = {'experiments': _package('experiments'), 'experiments.robot': _package('experiments.robot'),
                   'experiments.robot.spec_prune_constants': constants, 'prismatic': _package('prismatic'),
                   'prismatic.vla': _package('prismatic.vla'), 'prismatic.vla.constants': vla_constants,
                   'skimage': skimage, 'skimage.util': skimage_util}
        with _temporary_modules(aliases, ['libero']):
            llama = _load_file('transformers.models.llama.specprune_vla_modeling_llama', checkout / 'modeling_llama.py')
            similarity = _load_file('specprune_vla_code.spec_prune_vla',
                                    oft / 'experiments' / 'robot' / 'spec_prune_vla.py')
        llama.LlamaModel._update_causal_mask = lambda self, *args, **kwargs: None     # OFT: bidirectional, no mask
        return cls(llama=llama, constants=constants, similarity=similarity)

    def build_lm(self, adapter: Any) -> torch.nn.Module:
        """Their ``LlamaForCausalLM`` sharing the adapter's Llama weights (assigned, not copied)."""
        config = type(adapter.model.language_model.config)(**adapter.model.language_model.config.to_dict())
        config.rope_theta, config.rope_scaling, config.pretraining_tp = 10000.0, None, 1
        config._attn_implementation = 'sdpa'
        config.use_cache = False
        with torch.device('meta'):
            lm = self.llama.LlamaForCausalLM(config)
        state = adapter.model.language_model.state_dict()
        missing, unexpected = lm.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise RuntimeError(f'SpecPrune-VLA Llama does not fit the weights: missing {missing[:4]}, '
                               f'unexpected {unexpected[:4]}')
        for layer in lm.model.layers:
            layer.self_attn._init_rope()             # its rotary tables are buffers outside the state dict
        return lm.eval()


@dataclass
class SpecPruneVLARun:
    """One SpecPrune-VLA step as its LIBERO evaluation runs it (``get_vla_action`` -> ``predict_action``)."""

    code: SpecPruneVLACode
    lm: torch.nn.Module
    adapter: Any
    prune: bool
    cfg: Any = None

    def __post_init__(self) -> None:
        self.cfg = types.SimpleNamespace(token_prune=self.prune, dynamic_prune=False, layer_skip=False)

    def static_sets(self, frames: list[np.ndarray], previous: list[np.ndarray]) -> tuple[Any, Any]:
        if not self.prune:
            return [], []
        c, sim = self.code.constants, self.code.similarity
        primary = sim.get_similarity_indices(frames[0], previous[0], top_k=c.PRIMARY_TOPK, patch_size=14,
                                             sim_threshold=0.986, view='primary')
        wrist = sim.get_similarity_indices(frames[1], previous[1], top_k=c.WRIST_TOPK, patch_size=14,
                                           sim_threshold=0.986, view='wrist')
        return primary, wrist

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray], previous: list[np.ndarray], instruction: str, proprio: np.ndarray,
                 acting_step: int) -> dict:
        frames = self.adapter.prepare_frames(images)
        primary, wrist = self.static_sets(frames, self.adapter.prepare_frames(previous))
        embeddings, layout, _ = self.adapter.sequence(images, instruction, proprio)
        patches_and_proprio = layout.camera_spans[-1][1] - 1 + (layout.proprio_span[1] - layout.proprio_span[0])
        n_prompt = layout.num_tokens - (layout.action_span[1] - layout.action_span[0]) - 2 - patches_and_proprio
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):     # its forward prints the retained count every step
            out = self.lm(cfg=self.cfg, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                          inputs_embeds=embeddings, labels=None, use_cache=False, output_attentions=True,
                          output_hidden_states=True, return_dict=True, num_prompt=n_prompt, skip_layer_list=[],
                          precise_mode=False, high_similarity_indices=primary, high_similarity_indices_wrist=wrist,
                          prev_attn_indices=[], acting_steps=acting_step)
        last = out.hidden_states[-1]
        k = layout.action_span[1] - layout.action_span[0]
        normalized = self.adapter.action_chunk(last[:, -k - 1:-1])          # the window its code reads
        return {'normalized': normalized, 'out': out, 'layout': layout, 'n_prompt': n_prompt}


def upstream_window_actions(adapter: Any, result: dict) -> np.ndarray:
    """Actions from the window upstream OpenVLA-OFT reads (the last prompt token and K*D - 1 placeholders)."""
    last, layout = result['out'].hidden_states[-1], result['layout']
    k, after = layout.action_span[1] - layout.action_span[0], layout.num_tokens - layout.action_span[1]
    return adapter.action_chunk(last[:, -k - after:-after])       # counted from the end: pruning keeps the tail


def layer1_topk_check(code: SpecPruneVLACode, result: dict) -> dict:
    """How many of SpecPrune-VLA's layer-1 top-K picks are the K tokens its own layer-1 scores rank highest.

    Its layer-1 gather ranks the visual columns of the tokens still present (an index into that shortened list)
    and adds the camera's start position, as if nothing had been removed after layer 0.
    """
    attn, positions = result['out'].attentions[1]
    n_prompt, c = result['n_prompt'], code.constants
    actions = result['layout'].action_span[1] - result['layout'].action_span[0]
    rows = attn.float()[0].mean(0)[-1 - actions - n_prompt + 10:-1 - actions]
    out = {}
    for camera, start, k in (('primary', 1, c.ATTN_TOPK), ('wrist', 257, c.ATTN_TOPK_WRIST)):
        visual = (positions >= start) & (positions < start + 256)
        scores = rows[:, visual].mean(0)
        top = scores.topk(k).indices
        picked = set((top + start).tolist())
        true = set(positions[visual][top].tolist())
        out[camera] = {'k': int(k), 'picks_in_true_topk': len(picked & true)}
    return out


def visual_per_layer(result: dict, num_visual: int = 512) -> list[int]:
    """Visual tokens entering each layer of SpecPrune-VLA's pass (from the positions it returns per layer)."""
    return [int(((pos >= 1) & (pos < 1 + num_visual)).sum()) for _, pos in result['out'].attentions]


# -- the shared model and inputs -------------------------------------------------------------------------------

class SavedFeatures:
    """Replaces the vision backbone's forward: the current frame's saved patch features (see the docstring)."""

    def __init__(self, adapter: Any, frames: list, cameras: tuple[str, ...]) -> None:
        backbone = adapter.model.vision_backbone
        self.features = []
        with torch.inference_mode():
            for frame in frames:
                prepared = adapter.prepare_frames([frame.images[c] for c in cameras])
                pixels = adapter.transform.pixels(prepared, device=adapter.device, dtype=adapter.dtype)
                self.features.append(backbone(pixels))
        self.current = 0
        backbone.forward = lambda pixel_values: self.features[self.current]


def align_empty_token(adapter: Any) -> None:
    """Give id 29871 (OpenVLA's hard-coded '▁') the in-memory tokenizer's '▁' embedding; prompts end with it."""
    if adapter.empty_id is None or adapter.empty_id == OFT_EMPTY_TOKEN_ID:
        return
    with torch.no_grad():
        table = adapter.model.language_model.model.embed_tokens.weight
        table[OFT_EMPTY_TOKEN_ID] = table[adapter.empty_id]
    adapter.empty_id = OFT_EMPTY_TOKEN_ID


def load_frames(args: argparse.Namespace) -> list:
    if args.frames is not None:
        frames = harness.load_frames(args.frames)
        timed = [f for f in frames if f.episode_step >= args.warmup]
        return frames[:frames.index(timed[min(args.steps, len(timed)) - 1]) + 1] if timed else frames
    return harness.simulator_episode(args.steps, args.warmup, args.stride, seed=args.seed)


# -- runners ---------------------------------------------------------------------------------------------------

@dataclass
class Runner:
    label: str
    side: str                        # 'theirs' | 'ours'
    pruned: bool
    step: Callable[[int], dict]      # frame index -> {'ms', 'normalized' or 'actions', 'kept_visual', ...}
    reset: Callable[[], None] = lambda: None
    times: list[float] = field(default_factory=list)
    kept: list[float] = field(default_factory=list)
    outputs: dict[int, dict] = field(default_factory=dict)


def our_runner(label: str, adapter: Any, frames: list, features: SavedFeatures, method_name: str,
               config: Optional[dict], pruned: bool) -> Runner:
    method = build_method(method_name, config)

    def step(i: int) -> dict:
        frame = frames[i]
        features.current = i
        images = [frame.images[c] for c in adapter.camera_names]
        proprio = harness.fit_proprio(frame.proprio, adapter.proprio_dim) if adapter.proprio_dim else None
        start = time.perf_counter()
        out = adapter.step(images, frame.instruction, proprio=proprio, method=method, step_index=frame.episode_step,
                           executed_actions=frame.executed_actions)
        elapsed = time.perf_counter() - start
        return {'ms': 1000 * elapsed, 'normalized': out.normalized, 'kept_visual': out.result.record.mean_visual_kept}

    return Runner(label, 'ours', pruned, step, reset=method.reset)


def camera_images(frame: Any, cameras: tuple[str, ...]) -> list[np.ndarray]:
    return [frame.images[c] for c in cameras]


def specprune_runners(code: SpecPruneVLACode, adapter: Any, frames: list, features: SavedFeatures) -> list[Runner]:
    lm = code.build_lm(adapter)
    runners = []
    for prune in (False, True):
        run = SpecPruneVLARun(code, lm, adapter, prune)

        def step(i: int, run: SpecPruneVLARun = run) -> dict:
            frame = frames[i]
            features.current = i
            images = camera_images(frame, adapter.camera_names)
            previous = images if frame.episode_step == 0 else camera_images(frames[i - 1], adapter.camera_names)
            proprio = harness.fit_proprio(frame.proprio, adapter.proprio_dim)
            start = time.perf_counter()
            result = run(images, previous, frame.instruction, proprio, frame.episode_step)
            elapsed = time.perf_counter() - start
            per_layer = visual_per_layer(result)
            extra = {'upstream_window': upstream_window_actions(adapter, result)}
            if run.prune:
                extra['layer1_topk'] = layer1_topk_check(code, result)
            return {'ms': 1000 * elapsed, 'normalized': result['normalized'],
                    'kept_visual': float(np.mean(per_layer)), **extra}

        label = 'SpecPrune-VLA code, ' + ('pruned (its defaults)' if prune else 'unpruned')
        runners.append(Runner(label, 'theirs', prune, step))
    runners += [our_runner('ours, unpruned', adapter, frames, features, 'none', None, False),
                our_runner('ours, specprune (our defaults)', adapter, frames, features, 'specprune', None, True),
                our_runner('ours, specprune (matched to its defaults)', adapter, frames, features, 'specprune',
                           SPECPRUNE_MATCHED, True)]
    return runners


class VLAPrunerProcess:
    """VLA-Pruner's own code in a child process with its transformers fork first on PYTHONPATH."""

    def __init__(self, checkout: Path, threads: int) -> None:
        env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
        env['PYTHONPATH'] = str(checkout / 'src' / 'openvla' / 'transformers' / 'src')
        env['OMP_NUM_THREADS'] = str(threads)
        self.checkout = checkout
        self.process = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env=env, text=True, cwd=tempfile.gettempdir())

    def call(self, **request: Any) -> dict:
        self.process.stdin.write(json.dumps(request) + '\n')
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f'the VLA-Pruner process ended (exit {self.process.wait()}); see its stderr above')
        reply = json.loads(line)
        if not reply.pop('ok'):
            raise RuntimeError(f'VLA-Pruner\'s code failed: {reply["error"]}\n{reply.get("trace", "")}')
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.process.stdin.write(json.dumps({'cmd': 'quit'}) + '\n')
                self.process.stdin.flush()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def save_for_vla_pruner(adapter: Any, frames: list, features: SavedFeatures, directory: Path) -> dict[str, str]:
    """The shared weights, per-frame prompt ids and patch features, and the config, for the VLA-Pruner process."""
    model = adapter.model
    state = {k: v for k, v in model.state_dict().items() if k.startswith(('projector.', 'language_model.'))}
    torch.save(state, directory / 'weights.pt')
    ids = [adapter.encode_prompt(frame.instruction).ids for frame in frames]
    padded = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for i, row in enumerate(ids):
        padded[i, :len(row)] = torch.tensor(row)
    torch.save({'features': torch.cat(features.features), 'input_ids': padded,
                'lengths': torch.tensor([len(r) for r in ids])}, directory / 'inputs.pt')
    text = model.language_model.config
    text_config = {'vocab_size': text.vocab_size, 'hidden_size': text.hidden_size,
                   'intermediate_size': text.intermediate_size, 'num_hidden_layers': text.num_hidden_layers,
                   'num_attention_heads': text.num_attention_heads, 'num_key_value_heads': text.num_key_value_heads,
                   'max_position_embeddings': text.max_position_embeddings, 'rms_norm_eps': text.rms_norm_eps,
                   'rope_theta': 10000.0, 'pad_token_id': text.pad_token_id, 'bos_token_id': 1, 'eos_token_id': 2,
                   'tie_word_embeddings': False, 'torch_dtype': 'float32'}
    meta = {'text_config': text_config, 'norm_stats': adapter.checkpoint.norm_stats,
            'n_action_bins': adapter.checkpoint.n_action_bins,
            'pad_to_multiple_of': adapter.checkpoint.pad_to_multiple_of, 'pad_token_id': text.pad_token_id,
            'vision_dim': model.vision_backbone.embed_dim, 'patches': adapter.patches_per_image,
            'fastv_k': 3, 'fastv_r': 1 - VLA_PRUNER_KEEP}
    (directory / 'meta.json').write_text(json.dumps(meta))
    return {'weights': str(directory / 'weights.pt'), 'inputs': str(directory / 'inputs.pt'),
            'meta': str(directory / 'meta.json')}


def vla_pruner_runners(process: VLAPrunerProcess, adapter: Any, frames: list, features: SavedFeatures) -> list[Runner]:
    unnorm_key = adapter.unnorm_key
    runners = []
    for mode in ('unpruned', 'pruned'):
        def step(i: int, mode: str = mode) -> dict:
            reply = process.call(cmd='step', mode=mode, frame=i, unnorm_key=unnorm_key)
            return {'ms': reply['ms'], 'actions': np.asarray(reply['actions']), 'kept_visual': reply['kept_visual'],
                    'parts_ms': reply['parts_ms']}

        label = 'VLA-Pruner code, ' + ('25% kept' if mode == 'pruned' else 'unpruned')
        runners.append(Runner(label, 'theirs', mode == 'pruned', step,
                              reset=lambda: process.call(cmd='reset') and None))
    ours = [our_runner('ours, unpruned', adapter, frames, features, 'none', None, False),
            our_runner('ours, vla_pruner 25%', adapter, frames, features, 'vla_pruner',
                       {'keep_ratio': VLA_PRUNER_KEEP}, True)]
    for runner in ours:          # compare in the peer's units: un-normalised actions
        inner = runner.step
        runner.step = (lambda i, inner=inner: {**(r := inner(i)), 'actions': adapter.unnormalize(r['normalized'])})
    return runners + ours


# -- the measurement -------------------------------------------------------------------------------------------

def run_rotation(runners: list[Runner], frames: list, warmup: int, log: Callable[[str], None]) -> None:
    """Every frame through every runner, round-robin in a rotating order; warm-up steps not timed."""
    for i, frame in enumerate(frames):
        if frame.episode_step == 0:
            for runner in runners:
                runner.reset()
        shift = i % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            with torch.inference_mode():
                out = runner.step(i)
            runner.outputs[i] = out
            if frame.episode_step >= warmup:
                runner.times.append(out['ms'])
                if out.get('kept_visual') is not None:
                    runner.kept.append(float(out['kept_visual']))
        timed = 'timed' if frame.episode_step >= warmup else 'warm-up'
        times = ', '.join(f'{r.label} {r.outputs[i]["ms"]:.0f}' for r in runners)
        log(f'  frame {i + 1}/{len(frames)} ({timed}): {times}')


def stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {'median_ms': float(np.median(a)), 'p10_ms': float(np.percentile(a, 10)),
            'p90_ms': float(np.percentile(a, 90)), 'n': int(a.size)}


def agreement(theirs: Runner, ours: Runner, key: str, their_key: Optional[str] = None) -> float:
    """Max |difference| over all frames of the two runners' outputs (``key``; ``their_key`` on their side)."""
    diffs = [float(np.max(np.abs(np.asarray(theirs.outputs[i][their_key or key], dtype=np.float64)
                                 - np.asarray(ours.outputs[i][key], dtype=np.float64))))
             for i in theirs.outputs]
    return max(diffs)


def rows_for(runners: list[Runner], comparison: str) -> list[dict]:
    base = {side: next(r for r in runners if r.side == side and not r.pruned) for side in ('theirs', 'ours')}
    rows = []
    for runner in runners:
        row = {'comparison': comparison, 'label': runner.label, 'side': runner.side, 'pruned': runner.pruned,
               **stats(runner.times), 'kept_visual_per_layer': float(np.mean(runner.kept)) if runner.kept else None}
        own = base[runner.side]
        row['speedup_over_own_unpruned'] = float(np.median(own.times) / np.median(runner.times))
        row['speedup_ci95'] = harness.bootstrap_ratio(np.asarray(own.times), np.asarray(runner.times))
        rows.append(row)
    return rows


def ratio_row(ours: Runner, theirs: Runner, target: float, method: str) -> dict:
    ratio = float(np.median(ours.times) / np.median(theirs.times))
    interval = harness.bootstrap_ratio(np.asarray(theirs.times), np.asarray(ours.times))   # theirs / ours
    return {'method': method, 'ours': ours.label, 'theirs': theirs.label, 'ours_over_theirs': ratio,
            'ours_over_theirs_ci95': sorted(1 / x for x in interval), 'ours_faster_by': 1 - ratio,
            'target_ours_over_theirs_at_most': target, 'meets_target': ratio <= target}


def measure_specprune(checkout: Path, args: argparse.Namespace, frames: list, log: Callable[[str], None]) -> dict:
    shape = PublishedShape(kind='openvla-oft', width=args.width, layers=args.layers, vision_scale=args.vision_scale)
    log(f'SpecPrune-VLA: building {shape.label} and loading its code from {checkout}')
    adapter = build_shape(shape, device='cpu', dtype='float32', seed=args.seed)
    features = SavedFeatures(adapter, frames, adapter.camera_names)
    code = SpecPruneVLACode.load(checkout)
    runners = specprune_runners(code, adapter, frames, features)
    run_rotation(runners, frames, args.warmup, log)
    theirs_un, theirs_pr, ours_un, ours_def, ours_match = runners
    picks = [theirs_pr.outputs[i]['layer1_topk'] for i in theirs_pr.outputs if frames[i].episode_step > 0]
    defects = {
        'layer1_topk': {camera: {'k': picks[0][camera]['k'] if picks else None,
                                 'picks_in_true_topk_mean': float(np.mean([p[camera]['picks_in_true_topk']
                                                                           for p in picks])) if picks else None,
                                 'steps': len(picks)} for camera in ('primary', 'wrist')},
        'action_window_shift_max_abs_normalized': agreement(theirs_un, theirs_un, 'normalized', 'upstream_window'),
    }
    checks = {'unpruned_max_abs_diff_normalized': agreement(theirs_un, ours_un, 'normalized', 'upstream_window'),
              'tolerance': AGREEMENT_TOL}
    checks['agree'] = checks['unpruned_max_abs_diff_normalized'] <= AGREEMENT_TOL
    return {'shape': shape.label, 'layout': 'OpenVLA-OFT: BOS, 2 x 256 patches, proprio, prompt, 56 action slots, stop',
            'rows': rows_for(runners, 'specprune'), 'agreement': checks, 'defects': defects,
            'ratios': [ratio_row(ours_def, theirs_pr, TARGETS['specprune'], 'specprune (our defaults)'),
                       ratio_row(ours_match, theirs_pr, TARGETS['specprune'], 'specprune (matched config)'),
                       ratio_row(ours_un, theirs_un, 1.0, 'unpruned')],
            'peer_commit': checkout_commit(checkout), 'matched_config': SPECPRUNE_MATCHED}


def measure_vla_pruner(checkout: Path, args: argparse.Namespace, frames: list, log: Callable[[str], None]) -> dict:
    shape = PublishedShape(kind='openvla', width=args.width, layers=args.layers, vision_scale=args.vision_scale)
    log(f'VLA-Pruner: building {shape.label}; its code runs in a separate process from {checkout}')
    adapter = build_shape(shape, device='cpu', dtype='float32', seed=args.seed)
    align_empty_token(adapter)
    features = SavedFeatures(adapter, frames, adapter.camera_names)
    process = VLAPrunerProcess(checkout, args.threads)
    try:
        with tempfile.TemporaryDirectory(prefix='peer_latency_') as tmp:
            paths = save_for_vla_pruner(adapter, frames, features, Path(tmp))
            info = process.call(cmd='load', checkout=str(checkout), threads=args.threads, **paths)
        log(f'  VLA-Pruner process: transformers {info["transformers"]} ({info["transformers_file"]}), '
            f'attention {info["attn_implementation"]}')
        runners = vla_pruner_runners(process, adapter, frames, features)
        run_rotation(runners, frames, args.warmup, log)
    finally:
        process.close()
    theirs_un, theirs_pr, ours_un, ours_pr = runners
    scale = np.asarray(adapter.action_stats['q99']) - np.asarray(adapter.action_stats['q01'])
    diff = agreement(theirs_un, ours_un, 'actions')
    checks = {'unpruned_max_abs_diff_actions': diff, 'action_range_min': float(scale.min()),
              'tolerance': AGREEMENT_TOL * float(scale.max()), 'agree': diff <= AGREEMENT_TOL * float(scale.max())}
    timed = [i for i in theirs_pr.outputs if frames[i].episode_step >= args.warmup]
    parts = {f'{runner.label}': {part: float(np.median([runner.outputs[i]['parts_ms'].get(part, 0.0) for i in timed]))
                                 for part in ('attention_extraction', 'causal_mask')}
             for runner in (theirs_un, theirs_pr)}
    return {'shape': shape.label, 'layout': 'OpenVLA: BOS, 256 patches, prompt; prefill + 6 decode steps',
            'peer_parts_median_ms': parts,
            'rows': rows_for(runners, 'vla_pruner'), 'agreement': checks,
            'peer_process': {k: info[k] for k in ('transformers', 'attn_implementation')},
            'ratios': [ratio_row(ours_pr, theirs_pr, TARGETS['vla_pruner'], 'vla_pruner 25%'),
                       ratio_row(ours_un, theirs_un, 1.0, 'unpruned')],
            'peer_commit': checkout_commit(checkout)}


# -- report ----------------------------------------------------------------------------------------------------

def _ms(row: dict) -> str:
    return f'{row["median_ms"]:.0f} ({row["p10_ms"]:.0f}-{row["p90_ms"]:.0f})'


def markdown(report: dict) -> str:
    meta = report['meta']
    lines = ['# Side by side with the papers\' public code', '',
             f'Command: `{meta["command"]}`  ', f'Commit: {meta["commit"]}, {meta["date"]}  ',
             f'Device: {meta["device"]}, float32, torch {meta["torch"]}; {meta["frames"]} frames, '
             f'{meta["timed_steps"]} timed per configuration (warm-up {meta["warmup"]} policy steps per episode)  ',
             'Step time excludes the ViTs (same saved patch features on every side); medians with p10-p90 in ms.']
    if meta.get('load_average_at_end'):
        busy = max(meta['load_average_at_end']) > (meta.get('cores') or 1)
        lines.append(f'Machine load (1 / 5 / 15 min) at the end: {meta["load_average_at_end"]} on {meta["cores"]} '
                     f'cores{": busier than its cores, the times spread and ratios are rough" if busy else ""}.')
    if meta.get('note'):
        lines.append(f'Note: {meta["note"]}')
    lines.append('')
    for part in report['parts']:
        name = 'SpecPrune-VLA' if part['name'] == 'specprune' else 'VLA-Pruner'
        lines += [f'## {name}: {part["shape"]} ({part["layout"]})', '', f'Peer commit: {part["peer_commit"]}', '',
                  '| configuration | step ms (p10-p90) | speedup over own unpruned (95% CI) '
                  '| visual tokens per layer |',
                  '|---|---|---|---|']
        for row in part['rows']:
            lo, hi = row['speedup_ci95']
            kept = '' if row['kept_visual_per_layer'] is None else f'{row["kept_visual_per_layer"]:.0f}'
            lines.append(f'| {row["label"]} | {_ms(row)} | {row["speedup_over_own_unpruned"]:.2f}x '
                         f'({lo:.2f}-{hi:.2f}) | {kept} |')
        lines += ['', '| ours vs theirs | ours / theirs (95% CI) | ours faster by | target |', '|---|---|---|---|']
        for r in part['ratios']:
            lo, hi = r['ours_over_theirs_ci95']
            target = (f'<= {r["target_ours_over_theirs_at_most"]:.2f}: '
                      f'{"met" if r["meets_target"] else "not met"}') if r['method'] != 'unpruned' else ''
            lines.append(f'| {r["method"]} | {r["ours_over_theirs"]:.3f} ({lo:.3f}-{hi:.3f}) | '
                         f'{100 * r["ours_faster_by"]:.0f}% | {target} |')
        a = part['agreement']
        diff = a.get('unpruned_max_abs_diff_normalized', a.get('unpruned_max_abs_diff_actions'))
        lines += ['', f'Unpruned outputs agree: {"yes" if a["agree"] else "NO"} (max |difference| {diff:.2e}, '
                      f'tolerance {a["tolerance"]:.1e}).']
        for label, parts in part.get('peer_parts_median_ms', {}).items():
            lines.append(f'{label}: median {parts["attention_extraction"]:.1f} ms extracting action-modality '
                         f'attentions after generation, {parts["causal_mask"]:.1f} ms building causal masks.')
        if 'defects' in part:
            d = part['defects']
            primary, wrist = d['layer1_topk']['primary'], d['layer1_topk']['wrist']
            lines.append('Its layer-1 top-K picks that are the true top-K of its own scores (mean over '
                         f'{primary["steps"]} steps): primary {primary["picks_in_true_topk_mean"]:.1f} of '
                         f'{primary["k"]}, wrist {wrist["picks_in_true_topk_mean"]:.1f} of {wrist["k"]}. '
                         'Its action window against upstream OFT\'s: '
                         f'max |normalised action difference| {d["action_window_shift_max_abs_normalized"]:.3f}.')
        lines.append('')
    return '\n'.join(lines)


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--steps', type=int, default=12, help='timed frames per configuration')
    parser.add_argument('--warmup', type=int, default=4, help='untimed policy steps at the start of each episode')
    parser.add_argument('--stride', type=int, default=3, help='control steps between policy frames')
    parser.add_argument('--width', type=int, default=512, help='Llama width (the published 4096 shrunk for the CPU)')
    parser.add_argument('--layers', type=int, default=32, help='decoder layers of the random model')
    parser.add_argument('--vision-scale', type=float, default=0.125, help='ViT width factor (features only)')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads on every side')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random weights')
    parser.add_argument('--frames', type=Path, default=None, help='frames from deployment_latency.py --save-frames')
    parser.add_argument('--only', choices=('specprune', 'vla_pruner'), default=None,
                        help='compare one peer only (default: every peer whose checkout is named)')
    parser.add_argument('--out', type=Path, default=None, help='write peer_latency.json / .md there')
    parser.add_argument('--quiet', action='store_true', help='no progress lines')
    parser.add_argument('--combine', type=Path, nargs='+', default=None, metavar='JSON',
                        help='merge reports of separate --only runs into one (written to --out) and exit')
    parser.add_argument('--note', default=None, help='a line for the report (e.g. the machine\'s state)')
    args = parser.parse_args(argv)
    log = (lambda text: None) if args.quiet else (lambda text: print(text, flush=True))
    if args.combine:
        report = combine([json.loads(path.read_text()) for path in args.combine])
        if args.note:
            report['meta']['note'] = args.note
        return write_report(report, args.out)

    found, missing = peer_checkouts()
    if args.only:
        found = {k: v for k, v in found.items() if k == {'specprune': 'specprune_vla'}.get(args.only, args.only)}
    for line in missing:
        print(f'peer_latency: {line}', flush=True)
    if not found:
        print('peer_latency: no peer checkout to compare with; set the variables above (see --help)', flush=True)
        return None
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    frames = load_frames(args)
    log(f'{len(frames)} frames ({sum(f.episode_step >= args.warmup for f in frames)} timed)')
    parts = []
    if 'specprune_vla' in found:
        parts.append({'name': 'specprune', **measure_specprune(found['specprune_vla'], args, frames, log)})
    if 'vla_pruner' in found:
        parts.append({'name': 'vla_pruner', **measure_vla_pruner(found['vla_pruner'], args, frames, log)})
    command = 'python benchmarks/peer_latency.py ' + ' '.join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    report = {'meta': {'command': command, 'commit': harness.git_commit(),
                       'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
                       'device': harness.device_name(torch.device('cpu')), 'torch': torch.__version__,
                       'threads': args.threads, 'frames': len(frames), 'warmup': args.warmup,
                       'timed_steps': sum(f.episode_step >= args.warmup for f in frames),
                       'runtime_s': round(time.perf_counter() - started, 1),
                       'load_average_at_end': [round(x, 1) for x in os.getloadavg()], 'cores': os.cpu_count(),
                       'excluded': 'the ViTs (every side gets the same saved patch features)'},
              'parts': parts, 'rows': [row for part in parts for row in part['rows']]}
    if args.note:
        report['meta']['note'] = args.note
    return write_report(report, args.out)


def combine(reports: list[dict]) -> dict:
    """One report from several (e.g. the two peers measured by separate ``--only`` runs)."""
    meta = dict(reports[0]['meta'])
    for key in ('command', 'commit', 'date', 'runtime_s'):
        values = [str(r['meta'][key]) for r in reports]
        meta[key] = values[0] if len(set(values)) == 1 else '; '.join(values)
    parts = [part for r in reports for part in r['parts']]
    return {'meta': meta, 'parts': parts, 'rows': [row for part in parts for row in part['rows']]}


def write_report(report: dict, out: Optional[Path]) -> dict:
    text = markdown(report)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / 'peer_latency.json').write_text(strict_json(report, indent=1, default=float) + '\n')
        (out / 'peer_latency.md').write_text(text + '\n')
        print(f'wrote {out / "peer_latency.json"} and {out / "peer_latency.md"}')
    return report


if __name__ == '__main__':
    main()
