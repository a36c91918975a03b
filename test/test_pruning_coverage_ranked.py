"""``coverage_ranked`` through the real executor on a tiny random Llama decoder.

Coverage of every cell of each camera, the budget from the action-aware controller and the budget knob, scores
from the previous steps' probes (no pass of its own), pruning before layer 0, resets between episodes.
"""
import numpy as np
import pytest
import torch

from pruning_testkit import FAST, LAYERS, P, SLOW, make_layout, make_runner, run_episode
from specprune_ros.pruning import build_method
from specprune_ros.pruning.methods.coverage_ranked import CoverageRankedConfig, cell_tables, observed_ranks
from specprune_ros.pruning.scoring import budget_count, dense_visual_scores

R = CoverageRankedConfig().refine_layer      # the default refine layer (within the 6 test layers)

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
        for layer, kept in enumerate(result.record.kept_per_layer):       # the early and the final stage
            assert cells_touched(kept, layout) == [every_cell] * layout.num_cameras, f'step {step} layer {layer}'
    # without the quota, the ranking alone leaves cells empty on this decoder (what the quota is for)
    ranked = run_episode(build_method('coverage_ranked', {'cells': list(CELLS), 'cell_quota': 0, 'explore': 0.0,
                                                          'keep_ratio': 0.3, 'fine_keep_ratio': 0.3}),
                         steps=6, layout=layout, runner=runner, actions=FAST)
    assert any(cells_touched(r.record.kept_per_layer[-1], layout) != [every_cell] * layout.num_cameras
               for r in ranked)


def test_two_stages_before_layer_0_from_history_then_after_the_refine_layer(runner, layout):
    method = build_method('coverage_ranked', {'keep_ratio': 0.25, 'early_keep_ratio': 0.5, 'use_controller': False,
                                              'warmup_steps': 0})
    results = run_episode(method, steps=4, layout=layout, runner=runner)
    budget, early = budget_count(0.25, P), budget_count(0.5, P)
    first = results[0].record
    # first step (no history): every patch through layers 0..R (R the refine layer), the budget after layer R
    assert first.visual_kept_per_layer == [layout.num_visual] * (R + 1) + [budget * 2] * (LAYERS - R - 1)
    assert first.info['source'] == 'first step'
    for result in results[1:]:
        rec = result.record
        assert rec.info['source'] == 'history'
        assert rec.visual_kept_per_layer == [early * 2] * (R + 1) + [budget * 2] * (LAYERS - R - 1)
        assert per_camera(rec.kept_per_layer[0], layout) == [early] * 2
        assert per_camera(rec.kept_per_layer[-1], layout) == [budget] * 2
        assert bool(torch.isin(rec.kept_per_layer[-1], rec.kept_per_layer[0]).all())
        assert sorted(rec.attention) == [R, LAYERS - 1]       # two probes of a few rows, no extra pass
        assert set(rec.attention[R]) == {'cr_semantic'} and set(rec.attention[LAYERS - 1]) == {'cr_action'}


def test_warmup_steps_run_unpruned_and_fill_the_history(runner, layout):
    config = {'keep_ratio': 0.25, 'early_keep_ratio': 1.0, 'use_controller': False, 'warmup_steps': 2}
    method = build_method('coverage_ranked', config)
    results = run_episode(method, steps=4, layout=layout, runner=runner)
    budget = budget_count(0.25, P)
    for result in results[:2]:                    # every patch through every layer, both probes recorded
        rec = result.record
        assert rec.info['warmup'] and rec.visual_kept_per_layer == [layout.num_visual] * LAYERS
        assert sorted(rec.attention) == [R, LAYERS - 1]
    assert results[1].record.info['source'] == 'history'
    for result in results[2:]:                    # then the two stages: every patch through layer R, the budget after
        rec = result.record
        assert not rec.info['warmup']
        assert rec.visual_kept_per_layer == [layout.num_visual] * (R + 1) + [budget * 2] * (LAYERS - R - 1)
    again = run_episode(method, steps=1, layout=layout, runner=runner)     # a new episode warms up again
    assert again[0].record.info['reset'] == 'step index restarted'
    assert again[0].record.visual_kept_per_layer == [layout.num_visual] * LAYERS


def test_one_stage_prunes_every_layer_from_the_history(runner, layout):
    method = build_method('coverage_ranked', {'keep_ratio': 0.25, 'early_keep_ratio': 0.0, 'use_controller': False,
                                              'warmup_steps': 0})
    results = run_episode(method, steps=3, layout=layout, runner=runner)
    budget = budget_count(0.25, P)
    for result in results[1:]:
        assert result.record.visual_kept_per_layer == [budget * 2] * LAYERS


def test_controller_shapes_the_budget(runner, layout):
    config = {'keep_ratio': 0.2, 'fine_keep_ratio': 0.4, 'early_keep_ratio': 0.5, 'warmup_steps': 0}
    fine = run_episode(build_method('coverage_ranked', config), steps=3, layout=layout, runner=runner, actions=SLOW)
    coarse = run_episode(build_method('coverage_ranked', config), steps=3, layout=layout, runner=runner,
                         actions=FAST)
    assert [r.record.info['mode'] for r in fine] == ['fine'] * 3
    assert [r.record.info['mode'] for r in coarse] == ['coarse'] * 3
    assert per_camera(fine[-1].record.kept_per_layer[-1], layout) == [budget_count(0.4, P)] * 2
    assert per_camera(coarse[-1].record.kept_per_layer[-1], layout) == [budget_count(0.2, P)] * 2
    # the early stage keeps early_keep_ratio (0.5) in coarse mode, scaled like the final budget in fine mode
    assert per_camera(coarse[-1].record.kept_per_layer[0], layout) == [budget_count(0.5, P)] * 2
    assert per_camera(fine[-1].record.kept_per_layer[0], layout) == [P] * 2                # 0.5 x 0.4 / 0.2
    # without the controller the mode stays coarse whatever the motion
    fixed = run_episode(build_method('coverage_ranked', {**config, 'use_controller': False}), steps=3,
                        layout=layout, runner=runner, actions=SLOW)
    assert per_camera(fixed[-1].record.kept_per_layer[-1], layout) == [budget_count(0.2, P)] * 2


def test_budget_knob_scales_both_modes_and_gives_the_configured_budget_back(runner, layout):
    method = build_method('coverage_ranked', {'keep_ratio': 0.2, 'fine_keep_ratio': 0.4, 'early_keep_ratio': 0.3,
                                              'warmup_steps': 0})
    method.set_budget(0.5)
    coarse = run_episode(method, steps=3, layout=layout, runner=runner, actions=FAST)
    assert per_camera(coarse[-1].record.kept_per_layer[-1], layout) == [budget_count(0.5, P)] * 2
    # above the configured budget the early stage keeps the same 10 points more than the final cut (0.6), not
    # the same proportion (0.3 x 0.5 / 0.2 = 0.75)
    assert per_camera(coarse[-1].record.kept_per_layer[0], layout) == [budget_count(0.6, P)] * 2
    fine = run_episode(method, steps=3, layout=layout, runner=runner, actions=SLOW)     # 0.5 x 0.4 / 0.2 = 1
    assert fine[-1].record.visual_kept_per_layer == [layout.num_visual] * LAYERS
    method.set_budget(0.1)                            # below it, the same proportion: 0.3 x 0.1 / 0.2
    low = run_episode(method, steps=3, layout=layout, runner=runner, actions=FAST)
    assert per_camera(low[-1].record.kept_per_layer[0], layout) == [budget_count(0.15, P)] * 2
    assert per_camera(low[-1].record.kept_per_layer[-1], layout) == [budget_count(0.1, P)] * 2
    method.set_budget(None)
    again = run_episode(method, steps=3, layout=layout, runner=runner, actions=FAST)
    assert per_camera(again[-1].record.kept_per_layer[-1], layout) == [budget_count(0.2, P)] * 2
    with pytest.raises(ValueError):
        method.set_budget(-0.1)


def ranks_of(record, layer, key, layout) -> tuple[np.ndarray, np.ndarray]:
    """Per camera, the probe's ranks in [0, 1] among the patches it scored (host NumPy), and the scored mask."""
    keys, weights = record.attention[layer][key]
    dense = dense_visual_scores(keys, weights, layout, fill=float('-inf')).numpy().reshape(2, P)
    ranks = np.full((2, P), np.nan)
    for camera in range(2):
        seen = np.isfinite(dense[camera])
        order = np.argsort(dense[camera][seen], kind='stable')
        values = np.empty(seen.sum())
        values[order] = np.arange(seen.sum()) / max(seen.sum() - 1, 1)
        ranks[camera, seen] = values
    return ranks, np.isfinite(dense)


def assert_best(kept: torch.Tensor, score: np.ndarray, budget: int, layout) -> None:
    """``kept`` holds ``budget`` patches per camera, each among the best of ``score`` (up to the tie-break)."""
    for camera, (start, end) in enumerate(layout.camera_spans):
        chosen = (kept[(kept >= start) & (kept < end)] - start).numpy()
        assert len(chosen) == budget
        threshold = np.sort(score[camera])[::-1][budget - 1]
        assert (score[camera][chosen] >= threshold - 1e-3).all()
        assert (score[camera] > threshold + 1e-3).sum() <= budget


def test_before_layer_0_keeps_the_best_remembered_semantic_and_action_ranks(runner, layout):
    # no quota, no noise: step 1 keeps the top of max(semantic, action) running scores built from step 0's probes
    config = {'cell_quota': 0, 'explore': 0.0, 'keep_ratio': 0.25, 'early_keep_ratio': 0.0, 'use_controller': False,
              'smoothing': 0.5, 'prior': 0.5, 'warmup_steps': 0}
    results = run_episode(build_method('coverage_ranked', config), steps=2, layout=layout, runner=runner)
    rec = results[0].record

    def running(layer, key):
        ranks, seen = ranks_of(rec, layer, key, layout)
        return np.where(seen, 0.5 * 0.5 + 0.5 * np.nan_to_num(ranks), 0.5)

    score = np.maximum(running(R, 'cr_semantic'), running(LAYERS - 1, 'cr_action'))
    assert_best(results[1].record.kept_per_layer[0], score, budget_count(0.25, P), layout)


def test_refine_keeps_the_best_of_this_pass_semantic_ranks_among_the_early_set(runner, layout):
    config = {'cell_quota': 0, 'explore': 0.0, 'keep_ratio': 0.25, 'early_keep_ratio': 0.5, 'use_controller': False,
              'use_action': False, 'smoothing': 0.5, 'prior': 0.5, 'warmup_steps': 0}
    results = run_episode(build_method('coverage_ranked', config), steps=2, layout=layout, runner=runner)
    before, seen_before = ranks_of(results[0].record, R, 'cr_semantic', layout)
    remembered = np.where(seen_before, 0.25 + 0.5 * np.nan_to_num(before), 0.5)
    fresh, seen = ranks_of(results[1].record, R, 'cr_semantic', layout)       # this pass, over the early set
    score = np.where(seen, 0.5 * remembered + 0.5 * np.nan_to_num(fresh), -np.inf)
    rec = results[1].record
    assert seen.sum() == 2 * budget_count(0.5, P)
    assert_best(rec.kept_per_layer[R + 1], score, budget_count(0.25, P), layout)


def test_reset_and_new_episode_start_from_the_first_step_again(runner, layout):
    method = build_method('coverage_ranked', seed=4)          # defaults: 3 warm-up steps, then two stages
    first = run_episode(method, steps=5, layout=layout, runner=runner, actions=SLOW)
    replay = run_episode(method, steps=5, layout=layout, runner=runner, actions=SLOW)    # step index restarts
    assert replay[0].record.info['reset'] == 'step index restarted'
    assert replay[0].record.info['source'] == 'first step'
    assert [[k.tolist() for k in r.record.kept_per_layer] for r in replay] == \
        [[k.tolist() for k in r.record.kept_per_layer] for r in first]
    assert [r.record.info['warmup'] for r in first] == [True] * 3 + [False] * 2
    other_seed = run_episode(build_method('coverage_ranked', seed=5), steps=5, layout=layout, runner=runner,
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
    cell, slots, tiers = cell_tables((12, 12), (4, 4), 2, torch.device('cpu'))
    assert torch.bincount(cell).tolist() == [9] * 16 and tiers.tolist() == [200.0, 100.0] * 16
    assert slots.tolist() == [j + 9 * g for g in range(16) for j in (0, 1)]
    cell, slots, _ = cell_tables((2, 3), (4, 4), 1, torch.device('cpu'))        # more cells than patches: one each
    assert cell.tolist() == list(range(6)) and slots.tolist() == list(range(6))


def test_bad_config_is_refused():
    for bad in ({'smoothing': 0.0}, {'forget': 1.5}, {'cells': [0, 4]}, {'keep_ratio': 0.0}, {'explore': 50.0},
                {'warmup_steps': -1}):
        with pytest.raises(ValueError):
            build_method('coverage_ranked', bad)


@pytest.mark.parametrize('layers, refine_layer', [(6, -1), (6, -2), (6, 2), (1, 2)])
def test_the_final_cut_happens_wherever_the_refine_layer_is_configured(layers, refine_layer, layout):
    """A refine layer resolving to the last layer (no hook runs after it) cuts after the last layer but one."""
    method = build_method('coverage_ranked', {'refine_layer': refine_layer, 'warmup_steps': 0})
    results = run_episode(method, steps=3, layout=layout, runner=make_runner(layers=layers))
    last = results[-1].record
    assert last.visual_kept_per_layer[-1] == last.info['budget']
    if layers > 1:
        assert last.visual_kept_per_layer[0] > last.info['budget']       # two stages: the early cut keeps more
