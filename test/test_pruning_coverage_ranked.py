"""``coverage_ranked`` through the real executor on a tiny random Llama decoder.

Coverage of every cell of each camera, the budget from the action-aware controller and the budget knob, scores
from the previous steps' probes (no pass of its own), pruning before layer 0, resets between episodes.
"""
import numpy as np
import pytest
import torch

from pruning_testkit import GRID, LAYERS, make_layout, make_runner, run_episode
from specprune_ros.pruning import build_method
from specprune_ros.pruning.methods.coverage_ranked import cell_tables, observed_ranks
from specprune_ros.pruning.scoring import budget_count, dense_visual_scores

SLOW = np.tile(np.array([0.05, 0.0, -0.05, 0.0, 0.0, 0.0, 1.0]), (8, 1))    # fine mode (paper rule)
FAST = np.tile(np.array([0.6, 0.3, 0.3, 0.0, 0.0, 0.0, -1.0]), (8, 1))      # coarse mode
P = GRID[0] * GRID[1]
CELLS = (3, 3)                      # 2 x 2 patches per cell on the 6 x 6 test grid


@pytest.fixture(scope='module')
def runner():
    return make_runner()


@pytest.fixture(scope='module')
def layout():
    return make_layout()


def cells_touched(kept: torch.Tensor, layout) -> list[set]:
    """Per camera, the cells of ``CELLS`` that hold at least one kept patch."""
    rows, cols = layout.grid_shape
    out = []
    for start, end in layout.camera_spans:
        patches = kept[(kept >= start) & (kept < end)] - start
        out.append({(int(p) // cols * CELLS[0] // rows, int(p) % cols * CELLS[1] // cols) for p in patches})
    return out


def per_camera(kept: torch.Tensor, layout) -> list[int]:
    return [int(((kept >= s) & (kept < e)).sum()) for s, e in layout.camera_spans]


def test_every_cell_of_every_camera_keeps_a_patch(runner, layout):
    method = build_method('coverage_ranked', {'cells': list(CELLS), 'keep_ratio': 0.3, 'fine_keep_ratio': 0.3})
    results = run_episode(method, steps=6, layout=layout, runner=runner, actions=FAST)
    every_cell = {(r, c) for r in range(CELLS[0]) for c in range(CELLS[1])}
    for step, result in enumerate(results):
        final = result.record.kept_per_layer[-1]
        assert cells_touched(final, layout) == [every_cell] * layout.num_cameras, f'step {step}'
    # without the quota, the ranking alone leaves cells empty on this decoder (what the quota is for)
    ranked = run_episode(build_method('coverage_ranked', {'cells': list(CELLS), 'cell_quota': 0, 'keep_ratio': 0.3,
                                                          'fine_keep_ratio': 0.3}),
                         steps=6, layout=layout, runner=runner, actions=FAST)
    assert any(cells_touched(r.record.kept_per_layer[-1], layout) != [every_cell] * layout.num_cameras
               for r in ranked)


def test_prunes_before_layer_0_from_history_after_a_first_step_that_scores(runner, layout):
    method = build_method('coverage_ranked', {'keep_ratio': 0.25, 'use_controller': False})
    results = run_episode(method, steps=4, layout=layout, runner=runner)
    budget = budget_count(0.25, P)
    first = results[0].record
    # first step: every patch through layers 0 and 1 (the semantic probe's layer), the budget after layer 1
    assert first.visual_kept_per_layer[:2] == [layout.num_visual] * 2
    assert first.visual_kept_per_layer[2:] == [budget * layout.num_cameras] * (LAYERS - 2)
    assert first.info['source'] == 'first step'
    for result in results[1:]:
        rec = result.record
        assert rec.info['source'] == 'history'
        assert rec.visual_kept_per_layer == [budget * layout.num_cameras] * LAYERS     # every layer reduced
        assert per_camera(rec.kept_per_layer[0], layout) == [budget] * layout.num_cameras
        assert sorted(rec.attention) == [1, LAYERS - 1]       # two probes of a few rows, no extra pass
        assert set(rec.attention[1]) == {'cr_semantic'} and set(rec.attention[LAYERS - 1]) == {'cr_action'}


def test_controller_shapes_the_budget(runner, layout):
    config = {'keep_ratio': 0.2, 'fine_keep_ratio': 0.4}
    fine = run_episode(build_method('coverage_ranked', config), steps=3, layout=layout, runner=runner, actions=SLOW)
    coarse = run_episode(build_method('coverage_ranked', config), steps=3, layout=layout, runner=runner,
                         actions=FAST)
    assert [r.record.info['mode'] for r in fine] == ['fine'] * 3
    assert [r.record.info['mode'] for r in coarse] == ['coarse'] * 3
    assert per_camera(fine[-1].record.kept_per_layer[0], layout) == [budget_count(0.4, P)] * 2
    assert per_camera(coarse[-1].record.kept_per_layer[0], layout) == [budget_count(0.2, P)] * 2
    # without the controller the mode stays coarse whatever the motion
    fixed = run_episode(build_method('coverage_ranked', {**config, 'use_controller': False}), steps=3,
                        layout=layout, runner=runner, actions=SLOW)
    assert per_camera(fixed[-1].record.kept_per_layer[0], layout) == [budget_count(0.2, P)] * 2


def test_budget_knob_scales_both_modes_and_gives_the_configured_budget_back(runner, layout):
    method = build_method('coverage_ranked', {'keep_ratio': 0.2, 'fine_keep_ratio': 0.4})
    method.set_budget(0.5)
    coarse = run_episode(method, steps=3, layout=layout, runner=runner, actions=FAST)
    assert per_camera(coarse[-1].record.kept_per_layer[0], layout) == [budget_count(0.5, P)] * 2
    fine = run_episode(method, steps=3, layout=layout, runner=runner, actions=SLOW)     # 0.5 x 0.4 / 0.2 = 1
    assert fine[-1].record.visual_kept_per_layer == [layout.num_visual] * LAYERS
    method.set_budget(None)
    again = run_episode(method, steps=3, layout=layout, runner=runner, actions=FAST)
    assert per_camera(again[-1].record.kept_per_layer[0], layout) == [budget_count(0.2, P)] * 2
    with pytest.raises(ValueError):
        method.set_budget(-0.1)


def test_fill_follows_the_remembered_semantic_and_action_ranks(runner, layout):
    # no quota, no noise: step 1 keeps the top of max(semantic, action) running scores built from step 0's probes
    config = {'cell_quota': 0, 'keep_ratio': 0.25, 'use_controller': False, 'smoothing': 0.5, 'prior': 0.5}
    results = run_episode(build_method('coverage_ranked', config), steps=2, layout=layout, runner=runner)
    rec = results[0].record

    def running(layer, key):
        keys, weights = rec.attention[layer][key]
        dense = dense_visual_scores(keys, weights, layout, fill=float('-inf')).numpy().reshape(2, P)
        out = np.full((2, P), 0.5)
        for camera in range(2):
            seen = np.isfinite(dense[camera])
            order = np.argsort(dense[camera][seen], kind='stable')
            ranks = np.empty(seen.sum())
            ranks[order] = np.arange(seen.sum()) / max(seen.sum() - 1, 1)
            out[camera, seen] = 0.5 * 0.5 + 0.5 * ranks
        return out

    score = np.maximum(running(1, 'cr_semantic'), running(LAYERS - 1, 'cr_action'))
    budget = budget_count(0.25, P)
    kept = results[1].record.kept_per_layer[0]
    for camera, (start, end) in enumerate(layout.camera_spans):
        chosen = (kept[(kept >= start) & (kept < end)] - start).numpy()
        threshold = np.sort(score[camera])[::-1][budget - 1]
        assert (score[camera][chosen] >= threshold - 1e-3).all()          # only the best (up to the tie-break)
        assert (score[camera] > threshold + 1e-3).sum() <= budget


def test_reset_and_new_episode_start_from_the_first_step_again(runner, layout):
    method = build_method('coverage_ranked', seed=4)
    first = run_episode(method, steps=3, layout=layout, runner=runner, actions=SLOW)
    replay = run_episode(method, steps=3, layout=layout, runner=runner, actions=SLOW)    # step index restarts
    assert replay[0].record.info['reset'] == 'step index restarted'
    assert replay[0].record.info['source'] == 'first step'
    assert [[k.tolist() for k in r.record.kept_per_layer] for r in replay] == \
        [[k.tolist() for k in r.record.kept_per_layer] for r in first]
    other_seed = run_episode(build_method('coverage_ranked', seed=5), steps=3, layout=layout, runner=runner,
                             actions=SLOW)
    assert [k.tolist() for k in other_seed[-1].record.kept_per_layer] != \
        [k.tolist() for k in first[-1].record.kept_per_layer]           # the tie-break draws differ


def test_observed_ranks_and_cell_tables(layout):
    dense = torch.full((layout.num_visual,), float('-inf'))
    dense[[0, 3, 5]] = torch.tensor([0.2, 0.9, 0.1])
    dense[P:] = torch.arange(P, dtype=torch.float32)
    ranks, seen = observed_ranks(dense, layout)
    assert seen[0].sum() == 3 and bool(seen[1].all())
    assert ranks[0, [0, 3, 5]].tolist() == [0.5, 1.0, 0.0] and bool(torch.isnan(ranks[0, 1]))
    assert torch.allclose(ranks[1], torch.arange(P) / (P - 1))
    cell, slots = cell_tables((12, 12), (4, 4), 2, torch.device('cpu'))
    assert torch.bincount(cell).tolist() == [9] * 16
    assert slots.tolist() == [j + 9 * g for g in range(16) for j in (0, 1)]
    cell, slots = cell_tables((2, 3), (4, 4), 1, torch.device('cpu'))        # more cells than patches: one each
    assert cell.tolist() == list(range(6)) and slots.tolist() == list(range(6))


def test_bad_config_is_refused():
    for bad in ({'smoothing': 0.0}, {'forget': 1.5}, {'cells': [0, 4]}, {'use_semantic': False, 'use_action': False}):
        with pytest.raises(ValueError):
            build_method('coverage_ranked', bad)
