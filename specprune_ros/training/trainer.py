"""Behaviour-cloning training of the reference VLA on the simulator's demonstrations (CPU friendly).

Each sample is one control step t of a demonstration: both camera frames and the proprio vector before
action t, the instruction, and the target chunk ``actions[t : t + chunk]`` (past the episode end the chunk is
padded with a 'hold' action: no motion, the last gripper command). Loss: L1 over the whole chunk, as
OpenVLA-OFT. Images get a small random shift (pad + crop) so the policy does not memorise pixels.

Auxiliary localisation loss (``localisation_weight``): the model's localisation head predicts the named object's
table position (known from the task layout of the episode's seed, supervised only while the gripper has not yet
reached the object, so the object is where it started) and the goal's (plate or zone; not for pick). It teaches
the vision stem and the decoder to find what the instruction names, which plain behaviour cloning learns slowly.
Auxiliary pointing loss (``pointing_weight``): the same two positions projected into the fixed camera's image
become soft targets (Gaussian over patch centres) for the pointing head on that camera's patch tokens, a dense
signal that reaches the instruction-conditioned (FiLM) vision stem directly. Random shifts move the targets too.
Pruning-aware training (``token_drop_probability``): that share of batches runs the decoder on a random subset of
the visual tokens, dropped before layer 0 and/or after a random layer, so the policy learns not to depend on any
single visual token, as large pretrained VLAs do not; pruning methods then cost it less. The other batches see
every token. ``token_drop_families`` names the kinds of drop (``training/token_drops.py``): uniform random subsets
alone favour the random-pruning baseline (docs/benchmarks.md); 'all' mixes subsets shaped like every family of
selection (random, clustered, whole regions, attention-ranked, diverse), so no method's selections are the only
ones the policy practised.
"""
from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from specprune_ros.core.fixed_plan import FixedKeepSchedule
from specprune_ros.core.json_documents import strict_json
from specprune_ros.core.token_layout import TokenLayout
from specprune_ros.policy.reference_checkpoint import read_config, save_checkpoint, warm_start
from specprune_ros.policy.reference_vla import (LOCALISATION_DIMS, LOCALISATION_SCALE, ReferenceVLA,
                                                ReferenceVLAConfig)
from specprune_ros.policy.tokenizer import WordTokenizer
from specprune_ros.sim import TabletopEnv, scene
from specprune_ros.sim.projection import project_to_image
from specprune_ros.sim.tasks import sample_task
from specprune_ros.training.token_drops import family_token_drop, parse_families


@dataclass
class TrainConfig:
    """Optimisation settings; the model's sizes live in ReferenceVLAConfig."""

    steps: int = 8000
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 300
    shift_pixels: int = 4
    bf16: bool = False              # autocast pays only with native bf16 (AVX512-BF16/AMX); slower here
    threads: int = 2
    seed: int = 0
    val_fraction: float = 0.05
    log_every: int = 50
    save_every: int = 500
    max_minutes: float = 0.0        # stop (and save) after this run's wall time; 0 = no limit
    localisation_weight: float = 1.0   # auxiliary loss: where the named object and the goal are; 0 = off
    pointing_weight: float = 0.5       # auxiliary loss: which patches of camera 0 show them; 0 = off
    token_drop_probability: float = 0.0   # share of batches with randomly dropped visual tokens; 0 = off
    token_drop_min_keep: float = 0.25     # each drop stage keeps at least this share of the tokens it sees
    token_drop_families: str = 'uniform'  # comma-separated kinds of drop (training/token_drops.py) or 'all'

    def check(self) -> None:
        """Raise ValueError for a setting that cannot train, before any data is loaded or any step taken."""
        for name in ('steps', 'batch_size', 'log_every', 'save_every', 'threads'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be at least 1, not {getattr(self, name)}')
        for name in ('warmup_steps', 'shift_pixels', 'weight_decay', 'max_minutes', 'localisation_weight',
                     'pointing_weight'):
            if not getattr(self, name) >= 0:
                raise ValueError(f'{name} must not be negative, not {getattr(self, name)}')
        if not self.lr > 0:
            raise ValueError(f'lr must be positive, not {self.lr}')
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f'val_fraction must be in [0, 1), not {self.val_fraction}')
        if not 0 <= self.token_drop_probability <= 1:
            raise ValueError(f'token_drop_probability must be in [0, 1], not {self.token_drop_probability}')
        if not 0 < self.token_drop_min_keep <= 1:
            raise ValueError(f'token_drop_min_keep must be in (0, 1], not {self.token_drop_min_keep}')
        parse_families(self.token_drop_families)


REACHED_XY = 0.04   # metres: once the tcp is this close to the object in xy ...
REACHED_Z = 0.06    # ... and this low, it may move the object, so the start position is no longer a target


def localisation_targets(episode) -> tuple[np.ndarray, np.ndarray]:
    """Per step (T, 4) targets (object xy, goal xy) x LOCALISATION_SCALE and a (T, 4) validity mask.

    From the episode's task layout (``sample_task(family, seed)``), or for a recovery demonstration the target's
    position when the expert took over (``meta['start_target_xy']``); object targets hold until the tcp first
    comes within REACHED_XY of the object below REACHED_Z; goal targets (plate or zone) hold throughout (none for
    pick).
    """
    spec, layout = sample_task(episode.family, episode.seed)
    steps = len(episode)
    targets = np.zeros((steps, LOCALISATION_DIMS), dtype=np.float32)
    mask = np.zeros((steps, LOCALISATION_DIMS), dtype=np.float32)
    obj = np.asarray(episode.meta.get('start_target_xy', layout.objects[spec.target][:2]), dtype=np.float32)
    tcp = episode.proprio[:steps, :3]
    near = (np.hypot(*(tcp[:, :2] - obj).T) < REACHED_XY) & (tcp[:, 2] < REACHED_Z)
    reached = int(np.argmax(near)) if near.any() else steps
    targets[:, :2] = obj * LOCALISATION_SCALE
    mask[:reached, :2] = 1.0
    goal = layout.plates.get(spec.plate) if spec.plate else layout.zones.get(spec.zone) if spec.zone else None
    if goal is not None:
        targets[:, 2:] = np.asarray(goal, dtype=np.float32) * LOCALISATION_SCALE
        mask[:, 2:] = 1.0
    return targets, mask


POINTING_SIGMA_PX = 6.0   # spread of the soft pointing target over patch centres


def image_targets(located: np.ndarray, camera: str, image_size: int) -> np.ndarray:
    """(T, 2, 2) pixel (column, row) of the object and the goal in ``camera`` from localisation targets (T, 4)."""
    env = _projection_env(image_size)
    world = located.reshape(-1, 2, 2) / LOCALISATION_SCALE
    heights = np.broadcast_to(np.array([scene.OBJECT_HALF, scene.PLATE_TOP]), world.shape[:2])
    points = np.concatenate([world, heights[..., None]], axis=-1).reshape(-1, 3)
    return project_to_image(env.model, env.data, camera, points, image_size).reshape(-1, 2, 2).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _projection_env(image_size: int):
    """A simulator instance only for its (fixed) camera poses; built once per image size."""
    return TabletopEnv(image_size=image_size)


def pointing_distribution(pixels: torch.Tensor, grid: int, patch_size: int) -> torch.Tensor:
    """(B, K, grid*grid) soft targets: a Gaussian of POINTING_SIGMA_PX around each (column, row) in ``pixels``."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * patch_size
    rows, cols = torch.meshgrid(centres, centres, indexing='ij')
    d2 = (cols.flatten() - pixels[..., :1]) ** 2 + (rows.flatten() - pixels[..., 1:]) ** 2
    return torch.softmax(-d2 / (2 * POINTING_SIGMA_PX ** 2), dim=-1)


class DemoBank:
    """All demonstration steps in memory, indexable by (episode, step)."""

    def __init__(self, episodes: Sequence, camera_names: Sequence[str], tokenizer: WordTokenizer,
                 chunk_size: int) -> None:
        self.camera_names = tuple(camera_names)
        self.chunk_size = chunk_size
        self.images = [np.stack([ep.images[c] for c in self.camera_names], axis=1) for ep in episodes]  # (T,C,H,W,3)
        self.proprio = [ep.proprio.astype(np.float32) for ep in episodes]
        self.chunks = [self._chunks(ep.actions.astype(np.float32)) for ep in episodes]
        located = [localisation_targets(ep) for ep in episodes]
        self.located = [targets for targets, _ in located]
        self.located_mask = [mask for _, mask in located]
        image_size = episodes[0].images[self.camera_names[0]].shape[1] if episodes and episodes[0].images else 96
        self.pixels = [image_targets(targets, self.camera_names[0], image_size) for targets in self.located]
        encoded = [tokenizer.encode(ep.instruction)[0] for ep in episodes]
        self.words = np.asarray(encoded, dtype=np.int64)
        self.index = np.asarray([(e, t) for e, ep in enumerate(episodes) for t in range(len(ep))], dtype=np.int64)

    def _chunks(self, actions: np.ndarray) -> np.ndarray:
        hold = np.zeros((self.chunk_size, actions.shape[1]), dtype=np.float32)
        hold[:, -1] = actions[-1, -1]
        padded = np.concatenate([actions, hold])
        return np.stack([padded[t:t + self.chunk_size] for t in range(len(actions))])

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        episode, step = self.index[rows, 0], self.index[rows, 1]
        images = np.stack([self.images[e][t] for e, t in zip(episode, step)])            # (B,C,H,W,3)
        return {
            'images': torch.from_numpy(images).permute(0, 1, 4, 2, 3).contiguous(),      # (B,C,3,H,W)
            'proprio': torch.from_numpy(np.stack([self.proprio[e][t] for e, t in zip(episode, step)])),
            'words': torch.from_numpy(self.words[episode]),
            'actions': torch.from_numpy(np.stack([self.chunks[e][t] for e, t in zip(episode, step)])),
            'located': torch.from_numpy(np.stack([self.located[e][t] for e, t in zip(episode, step)])),
            'located_mask': torch.from_numpy(np.stack([self.located_mask[e][t] for e, t in zip(episode, step)])),
            'pixels': torch.from_numpy(np.stack([self.pixels[e][t] for e, t in zip(episode, step)])),
        }


def random_shift(images: torch.Tensor, pixels: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift each image by up to ``pixels`` in x and y (edge padding), independently per sample and camera.

    Returns the shifted images and (B, cams, 2) how far the content moved (columns, rows).
    """
    if pixels <= 0:
        return images, torch.zeros(*images.shape[:2], 2)
    b, c, ch, h, w = images.shape
    flat = images.view(b * c, ch, h, w).float()
    padded = torch.nn.functional.pad(flat, (pixels,) * 4, mode='replicate')
    dx = torch.randint(0, 2 * pixels + 1, (b * c,), generator=generator)
    dy = torch.randint(0, 2 * pixels + 1, (b * c,), generator=generator)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b * c)])
    moved = torch.stack([pixels - dx, pixels - dy], dim=1).view(b, c, 2).float()
    return out.round().to(torch.uint8).view(b, c, ch, h, w), moved


def split_by_layout(layouts: Sequence[tuple[str, int]], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the training and the validation episodes, given each episode's layout (family, seed).

    Whole layouts are held out: every episode of one (family, seed), e.g. its expert and its recovery demonstration
    from two data directories, lands on the same side, so the validation loss is measured on layouts the policy never
    trained on. Layouts are drawn in a seeded order until the held-out episodes reach ``val_fraction`` of all (at
    least one layout when ``val_fraction`` > 0; none when it is 0). ValueError when nothing would be left to train on.
    """
    groups: dict[tuple[str, int], list[int]] = {}
    for index, layout in enumerate(layouts):
        groups.setdefault((str(layout[0]), int(layout[1])), []).append(index)
    keys = sorted(groups)
    if not keys:
        raise ValueError('no episodes to train on')
    wanted = int(len(layouts) * val_fraction)
    held: list[int] = []
    order = np.random.default_rng(seed).permutation(len(keys))
    for position in order:
        if val_fraction <= 0 or (held and len(held) >= max(1, wanted)):
            break
        held.extend(groups[keys[position]])
    if len(held) == len(layouts):
        raise ValueError(f'{len(keys)} layout(s) cannot be split into training and validation (val_fraction '
                         f'{val_fraction}); use more episodes or val_fraction 0')
    held_set = set(held)
    return [i for i in range(len(layouts)) if i not in held_set], sorted(held)


def proprio_statistics(episodes: Sequence) -> tuple[list[float], list[float]]:
    stacked = np.concatenate([ep.proprio for ep in episodes])
    return stacked.mean(axis=0).tolist(), (stacked.std(axis=0) + 1e-3).tolist()


def learning_rate(step: int, config: TrainConfig, minutes: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 5% over whichever budget (steps or ``max_minutes``) ends first."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.max_minutes:
        progress = max(progress, minutes / config.max_minutes)
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def training_losses(model: ReferenceVLA, batch: dict[str, torch.Tensor], bf16: bool,
                    schedule: Optional[FixedKeepSchedule] = None) -> dict[str, torch.Tensor]:
    """The training losses of one batch.

    'chunk' (L1 over the action chunk), 'localisation' (masked L1 of the localisation head), 'pointing' (masked
    cross-entropy of the pointing head against soft patch targets) and 'pointing_hit' (share of targets whose most
    likely patch lies within 1.5 patches of the true position; a readable diagnostic). ``schedule``: drop visual tokens
    inside the decoder as it says (pruning-aware training).
    """
    config = model.config
    layout = model.layout(config.max_words)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
        embeddings, logits = model.embed(batch['images'], batch['words'], batch['proprio'], with_pointing=True)
        result = model.runner(embeddings, layout, schedule)
        predicted = model.decode_actions(result, layout)
        located = model.localise(result, layout)
    chunk = (predicted.float() - batch['actions']).abs().mean()
    mask = batch['located_mask']
    localisation = ((located.float() - batch['located']).abs() * mask).sum() / mask.sum().clamp(min=1)
    pixels = batch['pixels'] + batch.get('shift', torch.zeros(len(mask), 2))[:, None]
    valid = torch.stack([mask[:, 0], mask[:, 2]], dim=1) * torch.isfinite(pixels).all(-1)
    pixels = torch.nan_to_num(pixels)
    target = pointing_distribution(pixels, config.grid, config.patch_size)
    cross_entropy = -(target * torch.log_softmax(logits.float(), dim=-1)).sum(-1)
    pointing = (cross_entropy * valid).sum() / valid.sum().clamp(min=1)
    best = logits.argmax(-1)
    best_xy = torch.stack([best % config.grid, best // config.grid], dim=-1).float()
    best_xy = (best_xy + 0.5) * config.patch_size
    hit = ((best_xy - pixels).norm(dim=-1) < 1.5 * config.patch_size).float()
    pointing_hit = (hit * valid).sum() / valid.sum().clamp(min=1)
    return {'chunk': chunk, 'localisation': localisation, 'pointing': pointing, 'pointing_hit': pointing_hit}


STATE_FILE = 'train_state.pt'
LOSS_LOG = 'loss_log.jsonl'


def check_run_directory(out_dir: Path, resume: bool, overwrite: bool = False) -> None:
    """Raise ValueError unless ``out_dir`` suits the run: a saved state to resume, or none to start over unless told.

    A fresh run would otherwise replace the state (optimizer, step) of an earlier run at its first save.
    """
    state_path = Path(out_dir) / STATE_FILE
    if resume and not state_path.exists():
        raise ValueError(f'nothing to resume: {state_path} does not exist (check --out, or start without --resume)')
    if not resume and state_path.exists() and not overwrite:
        raise ValueError(f'{state_path} holds the state of an earlier run: continue it with --resume, or start '
                         'over (replacing it and its loss log) with --overwrite')


def train(model_config: ReferenceVLAConfig, train_config: TrainConfig, episodes: Sequence, out_dir: Path,
          resume: bool = False, export_dir: Optional[Path] = None, init_from: Optional[Path] = None,
          overwrite: bool = False) -> Path:
    """Train (or resume) and export the final checkpoint; returns the export directory.

    ``resume`` continues from ``out_dir/train_state.pt`` (weights, optimizer, step, RNG streams), which must exist;
    without it, an existing state is an error unless ``overwrite`` (then the run starts over with a new loss log).
    ``init_from`` starts from an exported checkpoint's weights and normalisation instead (fresh optimizer), e.g. the
    committed reference VLA on a machine that no longer has the training state. The validation episodes are whole
    layouts (``split_by_layout``). ``max_minutes`` limits each run (a resumed run gets as many again); the learning
    rate's time schedule counts the minutes of all runs.
    """
    train_config.check()
    check_run_directory(out_dir, resume, overwrite)
    torch.set_num_threads(train_config.threads)
    torch.manual_seed(train_config.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / STATE_FILE
    log_path = out_dir / LOSS_LOG

    rng = np.random.default_rng(train_config.seed)
    train_index, val_index = split_by_layout([(ep.family, ep.seed) for ep in episodes], train_config.val_fraction,
                                             train_config.seed)
    val_eps = [episodes[i] for i in val_index]
    train_eps = [episodes[i] for i in train_index]
    model, model_config, earlier_steps = _initial_model(model_config, train_eps, init_from)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    step = 0
    elapsed_before = 0.0  # minutes trained by earlier runs (resume)
    generator = torch.Generator().manual_seed(train_config.seed)
    if resume:
        step, elapsed_before, rng = _load_state(state_path, model, optimizer, generator)
    _start_loss_log(log_path, step)

    train_bank = DemoBank(train_eps, model_config.camera_names, model.tokenizer, model_config.chunk_size)
    val_bank, val_rows = None, None            # val_fraction 0: no held-out set
    if val_eps:
        val_bank = DemoBank(val_eps, model_config.camera_names, model.tokenizer, model_config.chunk_size)
        val_rows = np.random.default_rng(1).choice(len(val_bank), size=min(256, len(val_bank)), replace=False)
    print(f'{len(train_bank)} training steps from {len(train_eps)} episodes, '
          f'{len(val_bank) if val_bank else 0} validation steps; '
          f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters')

    def save_state() -> None:
        torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'step': step, 'rng': rng,
                    'minutes': elapsed_before + (time.time() - started) / 60, 'generator': generator.get_state(),
                    'torch_rng': torch.get_rng_state(), 'model_config': model_config.to_dict(),
                    'train_config': asdict(train_config)}, state_path)

    started = time.time()
    model.train()
    running = []
    bar = tqdm(total=train_config.steps, initial=step, desc='train', unit='step', dynamic_ncols=True)
    layout = model.layout(model_config.max_words)          # the training sequences' layout (for token drops)
    while step < train_config.steps:
        run_minutes = (time.time() - started) / 60
        minutes = elapsed_before + run_minutes
        for group in optimizer.param_groups:
            group['lr'] = learning_rate(step, train_config, minutes)
        batch = train_bank.batch(rng.integers(0, len(train_bank), size=train_config.batch_size))
        running.append(_optimise(model, optimizer, batch, layout, train_config, generator))
        step += 1
        bar.update(1)
        if step % train_config.log_every == 0 or step == train_config.steps:
            means = {name: float(np.mean([r[name] for r in running])) for name in running[0]}
            entry = {'step': step, 'loss': means.pop('chunk'), **means,
                     'lr': optimizer.param_groups[0]['lr'], 'minutes': minutes}
            if val_bank is not None and (step % (train_config.log_every * 4) == 0 or step == train_config.steps):
                val = validation_losses(model, val_bank, val_rows, train_config.bf16)
                entry['val_loss'] = val.pop('chunk')
                entry.update({f'val_{name}': value for name, value in val.items()})
            running.clear()
            bar.set_postfix(loss=f"{entry['loss']:.4f}", val=f"{entry.get('val_loss', float('nan')):.4f}")
            with open(log_path, 'a') as f:
                f.write(strict_json(entry) + '\n')
        out_of_time = train_config.max_minutes and run_minutes >= train_config.max_minutes
        if step % train_config.save_every == 0 or out_of_time:
            save_state()
        if out_of_time:
            print(f'stopping at step {step}: this run reached --max-minutes {train_config.max_minutes} '
                  '(rerun with --resume to continue for as long again)')
            break
    bar.close()
    save_state()
    model.eval()
    export_dir = export_dir or out_dir / 'checkpoint'
    facts = {'steps_done': earlier_steps + step, 'episodes': len(train_eps), 'samples': len(train_bank)}
    save_checkpoint(model, export_dir, extra={'training': {**facts, **asdict(train_config)}})
    return export_dir


def _initial_model(model_config: ReferenceVLAConfig, train_eps: Sequence, init_from: Optional[Path]
                   ) -> tuple[ReferenceVLA, ReferenceVLAConfig, int]:
    """A fresh model (proprio normalisation from the training episodes) or one warm-started from ``init_from``.

    Returned with its config and the training steps its ancestors took.
    """
    if init_from is None:
        model_config.proprio_mean, model_config.proprio_std = proprio_statistics(train_eps)
        return ReferenceVLA(model_config), model_config, 0
    ancestor_config, meta = read_config(init_from)
    # sizes and normalisation come from the ancestor; which proprio entries the policy sees is this run's choice
    model_config = replace(ancestor_config, blind_proprio=model_config.blind_proprio)
    earlier_steps = int(meta.get('training', {}).get('steps_done', 0))
    model = ReferenceVLA(model_config)
    new_weights = warm_start(model, init_from)
    model.train()
    print(f'initialised from {init_from} ({earlier_steps} earlier steps); new weights: {new_weights or "none"}')
    return model, model_config, earlier_steps


def _load_state(state_path: Path, model: ReferenceVLA, optimizer: torch.optim.Optimizer, generator: torch.Generator
                ) -> tuple[int, float, np.random.Generator]:
    """Restore weights, optimizer, torch RNG and the augmentation generator from a training state.

    Returns (step, minutes trained, numpy RNG). States saved without the generator re-seed it from the step.
    """
    state = torch.load(state_path, weights_only=False)
    model.load_state_dict(state['model'])
    optimizer.load_state_dict(state['optimizer'])
    torch.set_rng_state(state['torch_rng'])
    if 'generator' in state:
        generator.set_state(state['generator'])
    else:
        generator.manual_seed(int(state['train_config'].get('seed', 0)) + state['step'])
    print(f'resumed from {state_path} at step {state["step"]}')
    return state['step'], state.get('minutes', 0.0), state['rng']


def _start_loss_log(log_path: Path, step: int) -> None:
    """Start the loss log of a run at ``step``: empty for a fresh run; a resumed one keeps the lines up to its step.

    Lines logged after the resumed state was saved would otherwise appear twice once those steps are trained again.
    """
    kept = []
    if step and log_path.exists():
        kept = [line for line in log_path.read_text().splitlines()
                if line.strip() and json.loads(line).get('step', 0) <= step]
    log_path.write_text(''.join(line + '\n' for line in kept))


def _optimise(model: ReferenceVLA, optimizer: torch.optim.Optimizer, batch: dict, layout: TokenLayout,
              train_config: TrainConfig, generator: torch.Generator) -> dict[str, float]:
    """One optimiser step on ``batch`` (shifted images, maybe dropped tokens); the losses."""
    batch['images'], moved = random_shift(batch['images'], train_config.shift_pixels, generator)
    batch['shift'] = moved[:, 0]                      # the pointing targets live in camera 0
    schedule = None
    drop = train_config.token_drop_probability
    if drop > 0 and float(torch.rand(1, generator=generator)) < drop:   # no draw when off: runs replay as before
        schedule = family_token_drop(layout, model.config.num_layers, train_config.token_drop_min_keep, generator,
                                     parse_families(train_config.token_drop_families))
    losses = training_losses(model, batch, train_config.bf16, schedule)
    loss = (losses['chunk'] + train_config.localisation_weight * losses['localisation']
            + train_config.pointing_weight * losses['pointing'])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return {name: value.item() for name, value in losses.items()}


def validation_losses(model: ReferenceVLA, bank: 'DemoBank', rows: np.ndarray, bf16: bool) -> dict[str, float]:
    """Mean of each loss over the fixed validation rows (the model is left in training mode)."""
    model.eval()
    with torch.no_grad():
        losses = [training_losses(model, bank.batch(rows[i:i + 64]), bf16) for i in range(0, len(rows), 64)]
    model.train()
    return {name: float(np.mean([batch[name].item() for batch in losses])) for name in losses[0]}
