"""Token drops for pruning-aware training: every family drops only visual tokens, each has the shape it imitates."""
import json

import numpy as np
import pytest
import torch

from specprune_ros.core.token_layout import TokenRole
from specprune_ros.models.loading import tiny_random_config
from specprune_ros.policy.reference_vla import ReferenceVLA
from specprune_ros.sim.vocab import VOCABULARY
from specprune_ros.training import trainer as training
from test_policy import random_episodes, train_recording_schedules
from specprune_ros.training.token_drops import (DROP_FAMILIES, clustered_subset, family_token_drop,
                                                farthest_points, parse_families, random_token_drop,
                                                region_subset)

MIN_KEEP = 0.25


@pytest.fixture(scope='module')
def model() -> ReferenceVLA:
    torch.manual_seed(0)
    return ReferenceVLA(tiny_random_config()).eval()


def embeddings_of(model: ReferenceVLA) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 255, (2, 2, 3, 96, 96), dtype=torch.uint8, generator=generator)
    words = torch.randint(1, 10, (2, model.config.max_words), generator=generator)
    with torch.no_grad():
        return model.embed(images, words, torch.zeros(2, 6))


def test_family_names_are_parsed_and_unknown_ones_refused():
    assert parse_families('all') == DROP_FAMILIES
    assert parse_families(' ranked, uniform ') == ('ranked', 'uniform')
    for bad in ('', 'uniform,attention', 'speculative'):
        with pytest.raises(ValueError, match='unknown token-drop families'):
            parse_families(bad)


def test_uniform_family_alone_draws_exactly_as_the_uniform_random_drop(model):
    layout = model.layout(model.config.max_words)
    for seed in range(20):
        a = family_token_drop(layout, 6, MIN_KEEP, torch.Generator().manual_seed(seed), ('uniform',))
        b = random_token_drop(layout, 6, MIN_KEEP, torch.Generator().manual_seed(seed))
        assert (a.keep_before is None) == (b.keep_before is None)
        if a.keep_before is not None:
            assert torch.equal(a.keep_before, b.keep_before)
        assert a.keep_after.keys() == b.keep_after.keys()
        assert all(torch.equal(a.keep_after[k], b.keep_after[k]) for k in a.keep_after)


@pytest.mark.parametrize('family', DROP_FAMILIES)
def test_each_family_drops_only_visual_tokens_within_its_shares(model, family):
    layout = model.layout(model.config.max_words)
    embeddings = embeddings_of(model)
    visual = layout.visual_indices()
    generator = torch.Generator().manual_seed(3)
    dropped_steps = 0
    for _ in range(12):
        schedule = family_token_drop(layout, model.config.num_layers, MIN_KEEP, generator, (family,))
        with torch.no_grad():
            result = model.runner(embeddings, layout, schedule)
        kept = result.record.kept_per_layer
        assert all(torch.isin(layout.non_visual_indices(), k).all() for k in kept)   # text, proprio, actions stay
        counts = [int(torch.isin(k, visual).sum()) for k in kept]
        assert all(later <= earlier for earlier, later in zip(counts, counts[1:]))   # drops never add tokens back
        steps = [c for c in counts if c < len(visual)]
        dropped_steps += bool(steps)
        assert min(counts) >= MIN_KEEP * MIN_KEEP * len(visual) - 2                # two stages of >= min_keep each
        actions = model.decode_actions(result, layout)
        assert actions.shape == (2, 8, 7) and torch.isfinite(actions).all()
    assert dropped_steps >= 10                   # a share near 1 may keep everything, but not on most batches


def interior_share(layout, tokens: torch.Tensor) -> float:
    """Share of a camera-0 subset's patches whose in-grid 4-neighbours are all in the subset (blobs: high)."""
    rows, cols = layout.grid_shape
    patches = set(layout.patch_of(tokens[layout.camera_of(tokens) == 0]).tolist())

    def neighbours(p: int) -> set:
        r, c = divmod(p, cols)
        return {(r + dr) * cols + c + dc for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
                if 0 <= r + dr < rows and 0 <= c + dc < cols}

    return sum(neighbours(p) <= patches for p in patches) / max(len(patches), 1)


def test_clustered_drops_keep_compact_blobs_and_regions_keep_whole_cells(model):
    layout = model.layout(model.config.max_words)
    visual = layout.visual_indices()
    generator = torch.Generator().manual_seed(5)
    clustered, uniform, share_gaps, whole_cells = [], [], [], 0
    for _ in range(60):
        blob = clustered_subset(layout, visual, 0.2, generator)
        clustered.append(interior_share(layout, blob))
        uniform.append(interior_share(layout, visual[torch.randperm(len(visual), generator=generator)[:len(blob)]]))
        region = region_subset(layout, visual, 0.2, generator)
        cams = layout.camera_of(region)
        shares = [float((cams == c).sum()) / layout.patches_per_camera for c in range(layout.num_cameras)]
        share_gaps.append(abs(shares[0] - shares[1]))
        # whole cells: with a side of at least 2 patches, a kept patch has a kept 4-neighbour almost always
        patches = set(layout.patch_of(region[cams == 0]).tolist())
        cols = layout.grid_shape[1]
        lonely = [p for p in patches if not {p - 1, p + 1, p - cols, p + cols} & patches]
        whole_cells += len(lonely) <= 0.05 * max(len(patches), 1)
    assert np.median(clustered) > np.median(uniform) + 0.2
    assert max(share_gaps) > 0.3                 # one camera kept far more than the other, sometimes
    assert whole_cells >= 55


def test_ranked_drops_follow_the_passes_attention_and_diverse_drops_spread_over_features(model):
    layout = model.layout(model.config.max_words)
    embeddings = embeddings_of(model)
    generator = torch.Generator().manual_seed(11)
    margins = []
    while len(margins) < 8:
        schedule = family_token_drop(layout, model.config.num_layers, MIN_KEEP, generator, ('ranked',))
        with torch.no_grad():
            result = model.runner(embeddings, layout, schedule)
        layer = schedule.inside_layer
        keys, weights = result.record.attention[layer]['drop']
        after = set(result.record.kept_per_layer[layer + 1].tolist())
        is_visual = layout.roles()[keys] == int(TokenRole.VISUAL)
        kept = torch.tensor([int(k) in after for k in keys]) & is_visual
        dropped = ~torch.tensor([int(k) in after for k in keys]) & is_visual
        if kept.any() and dropped.any():
            log = torch.log(weights.float())
            spread = log[is_visual].std()
            margins.append(float(log[kept].mean() - log[dropped].mean()) / float(spread))
    assert np.mean(margins) > 1.0 and min(margins) > 0.5   # noisy, but the kept tokens are the attended ones

    clusters = torch.cat([torch.randn(1, 16) + 0.05 * torch.randn(30, 16) for _ in range(3)])
    picks = farthest_points(clusters, 3, torch.Generator().manual_seed(0))
    assert sorted((picks // 30).tolist()) == [0, 1, 2]   # one point of each cluster before any second one


def test_training_with_every_family_runs_and_records_them(tmp_path, monkeypatch):
    settings = training.TrainConfig(steps=10, batch_size=2, warmup_steps=1, threads=1, log_every=5, save_every=100,
                                    val_fraction=0.25, token_drop_probability=1.0, token_drop_families='all')
    schedules, exported = train_recording_schedules(monkeypatch, settings, tmp_path / 'run')
    assert len(schedules) == 10 and all(s is not None for s in schedules)
    assert json.loads((exported / 'config.json').read_text())['training']['token_drop_families'] == 'all'
    with pytest.raises(ValueError, match='unknown token-drop families'):
        training.train(tiny_random_config(VOCABULARY), training.TrainConfig(token_drop_families='speculative'),
                       random_episodes(), tmp_path / 'refused')
