"""Token-drop schedules for pruning-aware training: the visual tokens a training batch's decoder does not see.

A policy that practised one kind of drop favours the pruning method whose selections look like it: a checkpoint
trained on uniform random subsets lets the random baseline win. Each family below imitates one kind of selection
a pruning method makes, so a checkpoint trained on all of them favours none:

* ``uniform``: a uniform random subset (what the random baseline keeps);
* ``clustered``: blobs around a few random centres per camera (spatially concentrated selections such as the top
  tokens of an attention map around one object);
* ``regions``: whole cells of a coarse grid kept or dropped together, with a separate share per camera (regions a
  method never looks at, a camera kept much more than the other, as SpecPrune's per-camera sets do);
* ``ranked``: the top tokens by the batch's own text-to-visual attention at an early layer, with Gumbel noise so
  that a batch does not always see the same ranking (FastV, SpecPrune's local set, VLA-Pruner's semantic score);
* ``diverse``: a farthest-point subset of the visual tokens' hidden states at an early layer (DivPrune).

Every schedule has up to two stages, like the uniform drops the reference VLA was fine-tuned with: before layer 0
(content-free families only, the attention-based ones need a layer's output) and after a random layer; each keeps
a uniform share in ``[min_keep, 1]`` of the visual tokens it sees. Non-visual tokens are never dropped. Keep sets
are shared by the whole batch (the decoder gathers one index set); content-based families read the batch-averaged
attention and the first sample's hidden states.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from specprune_ros.core.fixed_plan import FixedKeepSchedule
from specprune_ros.core.step_types import AttentionRequest, LayerView, StepContext, StepPlan
from specprune_ros.core.token_layout import TokenLayout, TokenRole

DROP_FAMILIES = ('uniform', 'clustered', 'regions', 'ranked', 'diverse')
CONTENT_FAMILIES = ('ranked', 'diverse')     # need a layer's output: only after a layer
EARLY_LAYERS = 3                             # content-based drops score at one of the first layers, as methods do
GUMBEL_SCALE = 0.5                           # noise on the ranking, in standard deviations of the log-attention


def parse_families(text: str) -> tuple[str, ...]:
    """Families from a comma-separated list ('all' = every family); unknown names are refused."""
    names = DROP_FAMILIES if text.strip() == 'all' else tuple(n.strip() for n in text.split(',') if n.strip())
    unknown = sorted(set(names) - set(DROP_FAMILIES))
    if unknown or not names:
        raise ValueError(f'unknown token-drop families {unknown or text!r}; known: {", ".join(DROP_FAMILIES)}, all')
    return names


class FamilyDropSchedule(FixedKeepSchedule):
    """A two-stage drop whose in-pass stage may depend on the pass's own attention or hidden states."""

    def __init__(self, layout: TokenLayout, inside_family: Optional[str] = None, inside_layer: int = -1,
                 inside_share: float = 1.0, generator: Optional[torch.Generator] = None) -> None:
        super().__init__(name='token_drop')
        self.layout = layout
        self.inside_family = inside_family
        self.inside_layer = inside_layer
        self.inside_share = inside_share
        self.generator = generator

    def begin_step(self, context: StepContext) -> StepPlan:
        attention = list(self.attention)
        if self.inside_family == 'ranked':
            rows = 'text' if self.layout.text_span[1] > self.layout.text_span[0] else 'prefill'
            attention.append(AttentionRequest(layer=self.inside_layer, rows=rows, name='drop'))  # type: ignore
        return StepPlan(keep_before=self.keep_before, attention=attention)

    def after_layer(self, view: LayerView) -> Optional[torch.Tensor]:
        if view.layer in self.keep_after:
            return self.keep_after[view.layer]
        if view.layer != self.inside_layer or self.inside_family not in CONTENT_FAMILIES:
            return None
        visual = view.kept[self.layout.roles()[view.kept] == int(TokenRole.VISUAL)]
        count = max(1, round(self.inside_share * len(visual)))
        if self.inside_family == 'ranked':
            keys = view.key_indices
            weights = view.attention['drop']
            scores = torch.full((self.layout.num_tokens,), float('-inf'))
            scores[keys] = torch.log(weights.float().clamp_min(1e-12))
            ranked = scores[visual]
            ranked = (ranked - ranked.mean()) / ranked.std().clamp_min(1e-6)   # peaky or flat maps alike
            noisy = ranked + GUMBEL_SCALE * _gumbel(len(visual), self.generator)
            chosen = torch.topk(noisy, count).indices
        else:
            rows = torch.isin(view.kept, visual).nonzero().flatten()
            chosen = farthest_points(view.hidden[rows].float(), count, self.generator)
        return visual[chosen].sort().values


def family_token_drop(layout: TokenLayout, num_layers: int, min_keep: float, generator: torch.Generator,
                      families: Sequence[str] = ('uniform',)) -> FixedKeepSchedule:
    """A drop schedule for one batch; with the single family 'uniform' it draws exactly as ``random_token_drop``."""
    if tuple(families) == ('uniform',):
        return random_token_drop(layout, num_layers, min_keep, generator)
    before, inside = (torch.rand(2, generator=generator) < 0.5).tolist()
    if not (before or inside):
        before = True
    content_free = [f for f in families if f not in CONTENT_FAMILIES]
    if before and not content_free:       # only content-based families: the drop happens inside the pass
        before, inside = False, True
    visual = layout.visual_indices()
    schedule = FamilyDropSchedule(layout, generator=generator)
    if before:
        family = _pick(content_free, generator)
        visual = schedule.keep_before = CONTENT_FREE[family](layout, visual, min_keep, generator)
    if inside and num_layers > 1:
        family = _pick(list(families), generator)
        if family in CONTENT_FAMILIES:
            schedule.inside_family = family
            schedule.inside_layer = int(torch.randint(0, min(EARLY_LAYERS, num_layers - 1), (1,),
                                                      generator=generator))
            schedule.inside_share = _share(min_keep, generator)
        else:
            layer = int(torch.randint(0, num_layers - 1, (1,), generator=generator))
            schedule.keep_after[layer] = CONTENT_FREE[family](layout, visual, min_keep, generator)
    return schedule


def random_token_drop(layout: TokenLayout, num_layers: int, min_keep: float,
                      generator: torch.Generator) -> FixedKeepSchedule:
    """A uniform random pruning schedule for one batch.

    Each of two stages (before layer 0; after a random layer 0 .. num_layers-2) runs with probability 1/2 and keeps a
    uniform share in [min_keep, 1] of the visual tokens still kept, chosen at random; at least one stage runs.
    Non-visual tokens are never dropped.
    """
    before, inside = (torch.rand(2, generator=generator) < 0.5).tolist()
    if not (before or inside):
        before = True
    visual = layout.visual_indices()
    schedule = FixedKeepSchedule(name='random_token_drop')
    if before:
        visual = schedule.keep_before = uniform_subset(layout, visual, min_keep, generator)
    if inside and num_layers > 1:
        layer = int(torch.randint(0, num_layers - 1, (1,), generator=generator))
        schedule.keep_after[layer] = uniform_subset(layout, visual, min_keep, generator)
    return schedule


# ------------------------------------------------------------------------------------- content-free families

def uniform_subset(layout: TokenLayout, tokens: torch.Tensor, min_keep: float,
                   generator: torch.Generator) -> torch.Tensor:
    """A uniform random subset of ``tokens`` of a random share."""
    count = max(1, round(_share(min_keep, generator) * len(tokens)))
    return tokens[torch.randperm(len(tokens), generator=generator)[:count]].sort().values


def clustered_subset(layout: TokenLayout, tokens: torch.Tensor, min_keep: float,
                     generator: torch.Generator) -> torch.Tensor:
    """Blobs: per camera, the tokens nearest to 1-3 random centres (grid distance plus a little jitter)."""
    rows, cols = layout.grid_shape

    def scores(camera_tokens: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        centres = int(torch.randint(1, 4, (1,), generator=generator))
        cy = torch.rand(centres, generator=generator) * rows
        cx = torch.rand(centres, generator=generator) * cols
        y, x = (patch // cols).float()[:, None] + 0.5, (patch % cols).float()[:, None] + 0.5
        distance = ((y - cy) ** 2 + (x - cx) ** 2).sqrt().min(dim=1).values
        return -distance + 0.3 * torch.rand(len(camera_tokens), generator=generator)

    return _per_camera_top(layout, tokens, min_keep, generator, scores)


def region_subset(layout: TokenLayout, tokens: torch.Tensor, min_keep: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Whole cells of a coarse grid (2-4 patches a side) kept or dropped together, a share drawn per camera."""
    rows, cols = layout.grid_shape

    def scores(camera_tokens: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        side = int(torch.randint(2, 5, (1,), generator=generator))
        cells_x = -(-cols // side)
        cell = (patch // cols // side) * cells_x + (patch % cols) // side
        cell_score = torch.rand(int(cell.max()) + 1, generator=generator)
        return cell_score[cell] + 1e-3 * torch.rand(len(camera_tokens), generator=generator)

    return _per_camera_top(layout, tokens, min_keep, generator, scores)


CONTENT_FREE: dict[str, Callable[..., torch.Tensor]] = {
    'uniform': uniform_subset, 'clustered': clustered_subset, 'regions': region_subset}


# --------------------------------------------------------------------------------------------------- helpers

def farthest_points(features: torch.Tensor, count: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Row indices of a farthest-point subset under cosine distance, from a random first row."""
    unit = torch.nn.functional.normalize(features, dim=-1)
    first = int(torch.randint(0, len(unit), (1,), generator=generator))
    chosen = [first]
    distance = 1.0 - unit @ unit[first]
    for _ in range(count - 1):
        pick = int(torch.argmax(distance))
        chosen.append(pick)
        distance = torch.minimum(distance, 1.0 - unit @ unit[pick])
    return torch.tensor(chosen, dtype=torch.long)


def _per_camera_top(layout: TokenLayout, tokens: torch.Tensor, min_keep: float, generator: torch.Generator,
                    scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Per camera, the top share (drawn per camera) of ``tokens`` by ``scores``; at least one token overall."""
    cameras, patches = layout.camera_of(tokens), layout.patch_of(tokens)
    kept = []
    for camera in range(layout.num_cameras):
        mine = tokens[cameras == camera]
        if not len(mine):
            continue
        count = round(_share(min_keep, generator) * len(mine))
        if count:
            top = torch.topk(scores(mine, patches[cameras == camera]), count).indices
            kept.append(mine[top])
    if not kept:
        return tokens[:1]
    return torch.cat(kept).sort().values


def _share(min_keep: float, generator: Optional[torch.Generator]) -> float:
    return float(torch.empty(1).uniform_(min_keep, 1.0, generator=generator))


def _pick(options: Sequence[str], generator: torch.Generator) -> str:
    return options[int(torch.randint(0, len(options), (1,), generator=generator))]


def _gumbel(count: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    uniform = torch.rand(count, generator=generator).clamp(1e-9, 1 - 1e-9)
    return -torch.log(-torch.log(uniform))
