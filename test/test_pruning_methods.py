"""Every pruning method through the real executor on a tiny random Llama decoder.

The contract (budget, non-visual tokens kept, determinism under a seed, reset) and each method's own behaviour.
"""
import numpy as np
import pytest
import torch

from pruning_testkit import (FAST, GRID, LAYERS, P, SLOW, make_context, make_embeddings, make_layout, make_runner,
                             run_episode)
from specprune_ros.core.step_types import StepRecord
from specprune_ros.pruning import available_methods, build_method, method_config, self_speculation_hit_rate
from specprune_ros.pruning.base import protected_visual
from specprune_ros.pruning.diversity import greedy_max_min
from specprune_ros.pruning.methods import specprune as specprune_module
from specprune_ros.pruning.methods.specprune import gather_counts_on, scaled_prune_layers
from specprune_ros.pruning.scoring import budget_count, dense_visual_scores, mask_to_sequence, topk_per_camera


@pytest.fixture(scope='module')
def runner():
    return make_runner()


@pytest.fixture(scope='module')
def layout():
    return make_layout()


def kept_lists(results):
    return [[k.tolist() for k in r.record.kept_per_layer] for r in results]


def per_camera_counts(kept: torch.Tensor, layout) -> list[int]:
    return [int(((kept >= s) & (kept < e)).sum()) for s, e in layout.camera_spans]


# ------------------------------------------------------------------------------------------------- contract

@pytest.mark.parametrize('name', available_methods())
def test_contract(name, runner, layout):
    method = build_method(name, seed=3)
    assert all(callable(getattr(method, hook)) for hook in ('reset', 'begin_step', 'after_layer', 'end_step'))
    results = run_episode(method, steps=5, layout=layout, runner=runner, actions=SLOW)
    non_visual = layout.non_visual_indices()
    for r in results:
        rec = r.record
        assert rec.info['method'] == name and method.last_info['method'] == name
        counts = rec.visual_kept_per_layer
        assert all(a >= b for a, b in zip(counts, counts[1:]))           # tokens never come back
        for kept in rec.kept_per_layer:
            assert bool(torch.isin(non_visual, kept).all())              # non-visual tokens never dropped
        assert rec.flops <= rec.flops_full + 1e-6
    # deterministic under a seed: a fresh instance replays the same episode
    again = run_episode(build_method(name, seed=3), steps=5, layout=layout, runner=runner, actions=SLOW)
    assert kept_lists(results) == kept_lists(again)
    # reset: the next episode behaves like a fresh method's first one
    method.reset()
    replay = run_episode(method, steps=5, layout=layout, runner=runner, actions=SLOW)
    assert kept_lists(replay) == kept_lists(results)
    assert replay[0].record.info['reset'] == 'explicit'


class HookRecorder:
    """Wraps a method; records the layers each plan names, the hooks the runner called and where they acted.

    ``every_layer``: the plans passed on ask for the hook after every layer instead.
    """

    def __init__(self, method, every_layer: bool) -> None:
        self.method, self.name, self.every_layer = method, method.name, every_layer
        self.declared: list = []
        self.called: list[set] = []
        self.acted: list[set] = []

    def reset(self) -> None:
        self.method.reset()

    def begin_step(self, context):
        plan = self.method.begin_step(context)
        self.declared.append(plan.after_layers)
        self.called.append(set())
        self.acted.append(set())
        if self.every_layer:
            plan.after_layers = None
        return plan

    def after_layer(self, view):
        self.called[-1].add(view.layer)
        keep = self.method.after_layer(view)
        if keep is not None:
            self.acted[-1].add(view.layer)
        return keep

    def end_step(self, record) -> None:
        self.method.end_step(record)


@pytest.mark.parametrize('name', available_methods())
def test_the_hook_runs_only_after_the_layers_a_plan_names_and_nothing_is_lost(name, runner, layout):
    """Skipping the hooks a plan does not name keeps the same tokens as calling every one.

    And the plans name the layers where a method acts (none at all for the methods that choose before layer 0).
    """
    config = {'keep_ratio': 0.25} if name in ('fastv', 'vla_pruner', 'coverage_ranked', 'random', 'divprune') else {}
    named = HookRecorder(build_method(name, config, seed=3), every_layer=False)
    skipped = run_episode(named, steps=6, layout=layout, runner=runner, actions=FAST)
    everywhere = HookRecorder(build_method(name, config, seed=3), every_layer=True)
    called = run_episode(everywhere, steps=6, layout=layout, runner=runner, actions=FAST)
    assert kept_lists(skipped) == kept_lists(called)
    assert all(called <= set(declared) for called, declared in zip(named.called, named.declared))
    assert all(called == set(range(LAYERS - 1)) for called in everywhere.called)
    for declared, acted in zip(everywhere.declared, everywhere.acted):
        assert declared is not None and acted <= declared
    if name in ('none', 'random', 'divprune', 'vla_cache'):
        assert all(not declared for declared in everywhere.declared)
    if name in ('fastv', 'vla_pruner', 'coverage_ranked', 'specprune'):
        assert any(everywhere.acted)                     # the comparison above saw a method that prunes in the pass


KEEP_REGIONS = ((1, 0.0, 0.5, 0.25, 1.0), (0, 0.4, 0.4, 0.6, 0.6))   # wrist bottom-left quarter, agentview centre


@pytest.mark.parametrize('name', available_methods())
def test_keep_regions_survive_every_method(name, runner, layout):
    protected = protected_visual(layout, KEEP_REGIONS)
    rows, cols = GRID
    assert len(protected) == 6 + 4                        # 2 x 3 wrist patches, 2 x 2 agentview patches
    for index in protected.tolist():                      # every protected patch's centre lies in its box
        camera = next(c for c, (s, e) in enumerate(layout.camera_spans) if s <= index < e)
        patch = index - layout.camera_spans[camera][0]
        x, y = (patch % cols + 0.5) / cols, (patch // cols + 0.5) / rows
        assert any(c == camera and x0 <= x <= x1 and y0 <= y <= y1 for c, x0, y0, x1, y1 in KEEP_REGIONS)
    config = {'keep_regions': [list(r) for r in KEEP_REGIONS]} | ({'keep_ratio': 0.125} if name not in
                                                                  ('none', 'specprune', 'specprune_static',
                                                                   'specprune_static_layer', 'vla_cache') else {})
    plain = run_episode(build_method(name, {k: v for k, v in config.items() if k != 'keep_regions'}, seed=3),
                        steps=4, layout=layout, runner=runner, actions=SLOW)
    guarded = run_episode(build_method(name, config, seed=3), steps=4, layout=layout, runner=runner, actions=SLOW)
    for r in guarded:
        for kept in r.record.kept_per_layer:
            assert bool(torch.isin(protected, kept).all())
    pruned_without = any(not bool(torch.isin(protected, k).all()) for r in plain for k in r.record.kept_per_layer)
    if name in ('random', 'divprune', 'fastv', 'vla_pruner', 'specprune'):
        assert pruned_without                           # so the regions changed something for the pruning methods


@pytest.mark.parametrize('name', available_methods())
def test_a_step_without_a_camera_runs_unpruned_and_the_episode_goes_on(name, runner):
    """Every camera feed missing (a layout with no visual token): nothing to prune, no crash; cameras come back."""
    method = build_method(name)
    blind = run_episode(method, steps=2, layout=make_layout(cameras=0), runner=runner, images=False)
    assert all(r.record.info.get('idle') == 'no visual tokens' for r in blind)
    seen = run_episode(method, steps=4, layout=make_layout(), runner=runner, start_step=2)
    assert all(r.record.info.get('idle') is None for r in seen)


def test_keep_regions_are_validated(layout):
    assert protected_visual(layout, ()) is None
    whole_wrist = protected_visual(layout, ((1, 0, 0, 1, 1),))
    assert whole_wrist.tolist() == layout.visual_indices(1).tolist()
    with pytest.raises(ValueError, match='camera 2 outside'):
        protected_visual(layout, ((2, 0, 0, 1, 1),))
    with pytest.raises(ValueError, match='expected'):
        protected_visual(layout, ((0, 0, 0, 1),))
    for bad in ([[0, 0.5, 0, 0.2, 1]], [[0, 0, 0, 1, 1.5]], [[0.5, 0, 0, 1, 1]], [[0, 'left', 0, 1, 1]], [[0, 0]]):
        with pytest.raises(ValueError, match='keep region'):     # refused when the method is built
            build_method('specprune', {'keep_regions': bad})


@pytest.mark.parametrize('name', ['random', 'divprune', 'fastv', 'vla_pruner'])
@pytest.mark.parametrize('ratio', [0.5, 0.25, 0.125])
def test_budget_respected(name, ratio, runner, layout):
    method = build_method(name, {'keep_ratio': ratio})
    per_camera = method_config(name, {'keep_ratio': ratio}).per_camera
    results = run_episode(method, steps=4, layout=layout, runner=runner)
    final = results[-1].record.kept_per_layer[-1]
    if per_camera:
        assert per_camera_counts(final, layout) == [budget_count(ratio, P)] * layout.num_cameras
    else:
        assert sum(per_camera_counts(final, layout)) == budget_count(ratio, layout.num_visual)


def test_none_requests_analysis_attention(runner, layout):
    method = build_method('none', {'attention': ['2:prefill', [-1, 'action']]})
    rec = run_episode(method, steps=1, layout=layout, runner=runner)[0].record
    assert set(rec.attention) == {2, LAYERS - 1}
    assert 'prefill' in rec.attention[2] and 'action' in rec.attention[LAYERS - 1]
    assert rec.visual_kept_per_layer == [layout.num_visual] * LAYERS


def test_build_method_rejects_unknown():
    with pytest.raises(ValueError):
        build_method('nope')
    with pytest.raises(ValueError):
        build_method('fastv', {'keep_ratoi': 0.5})
    assert build_method('VLA-Pruner').name == 'vla_pruner'
    cfg = method_config('specprune', {'controller': {'alpha': 0.8}, 'layer_prune_layers': [3, 4]})
    assert cfg.controller.alpha == 0.8 and cfg.layer_prune_layers == (3, 4)


# -------------------------------------------------------------------------------------------- simple methods

def test_random_seeds_differ_and_repeat(runner, layout):
    a = kept_lists(run_episode(build_method('random', seed=1), steps=2, layout=layout, runner=runner))
    b = kept_lists(run_episode(build_method('random', seed=2), steps=2, layout=layout, runner=runner))
    assert a != b
    assert a[0] != a[1]                                              # a new draw every step


def test_divprune_keeps_greedy_selection(runner, layout):
    method = build_method('divprune', {'keep_ratio': 0.25})
    x = make_embeddings(layout, 0)
    ctx = make_context(layout, 0, x)
    with torch.no_grad():
        res = runner(x, layout, method, ctx)
    m = budget_count(0.25, layout.num_visual)
    expected = layout.visual_indices()[greedy_max_min(x[0, layout.visual_indices()], m)].sort().values
    kept = res.record.kept_per_layer[0]
    assert torch.equal(kept[torch.isin(kept, layout.visual_indices())], expected)


def test_fastv_prunes_from_layer_k_with_last_row_topk(runner, layout):
    method = build_method('fastv', {'keep_ratio': 0.25, 'prune_layer': 3})
    x = make_embeddings(layout, 0)
    with torch.no_grad():
        res = runner(x, layout, method, make_context(layout, 0, x))
    counts = res.record.visual_kept_per_layer
    m = budget_count(0.25, layout.num_visual)
    assert counts == [layout.num_visual] * 3 + [m] * (LAYERS - 3)
    keys, w = res.record.attention[2]['fastv']
    vis = torch.isin(keys, layout.visual_indices())
    top = keys[vis][torch.sort(-w[vis], stable=True).indices[:m]].sort().values
    kept = res.record.kept_per_layer[3]
    assert torch.equal(kept[torch.isin(kept, layout.visual_indices())], top)


# ------------------------------------------------------------------------------------------------ VLA-Pruner

def test_vla_pruner_warmup_then_prunes_before_layer_k(runner, layout):
    method = build_method('vla_pruner', {'keep_ratio': 0.25, 'window': 3, 'prune_layer': 2})
    results = run_episode(method, steps=5, layout=layout, runner=runner)
    m = budget_count(0.25, P) * layout.num_cameras
    for i, r in enumerate(results):
        counts = r.record.visual_kept_per_layer
        assert r.record.info['warmup'] == (i < 3)
        if i < 3:
            assert counts == [layout.num_visual] * LAYERS
        else:
            assert counts == [layout.num_visual] * 2 + [m] * (LAYERS - 2)
            assert all(c >= budget_count(0.25, P) for c in r.record.info['candidates'])
    # an instruction change restarts the warm-up
    x = make_embeddings(layout, 9)
    with torch.no_grad():
        r = runner(x, layout, method, make_context(layout, 5, x, instruction='open the drawer'))
    assert r.record.info['reset'] == 'instruction' and r.record.info['warmup']


def test_a_runner_called_without_a_context_keeps_the_methods_episode(runner, layout):
    """Without a StepContext the step index is unknown, not 0: the method warms up once and then prunes."""
    method = build_method('vla_pruner', {'keep_ratio': 0.25, 'window': 3, 'prune_layer': 2})
    with torch.no_grad():
        results = [runner(make_embeddings(layout, step), layout, method) for step in range(5)]
    assert [r.record.info['warmup'] for r in results] == [True] * 3 + [False] * 2
    assert results[-1].record.visual_kept_per_layer[-1] == budget_count(0.25, P) * layout.num_cameras


def test_vla_pruner_prune_layer_follows_the_depth(runner, layout):
    """Default K: the paper's 3 of 32 scaled to the decoder, never below 2; a configured K wins."""
    method = build_method('vla_pruner')
    for depth, k in ((6, 2), (8, 2), (24, 2), (32, 3), (64, 6)):
        method.num_layers = depth
        assert method.prune_layer() == k
    method = build_method('vla_pruner', {'prune_layer': 4})
    method.num_layers = 32
    assert method.prune_layer() == 4
    default = run_episode(build_method('vla_pruner', {'keep_ratio': 0.25}), steps=4, layout=layout, runner=runner)
    assert default[-1].record.info['prune_layer'] == 2 and not default[-1].record.info['warmup']


def test_vla_pruner_variants_and_ablations(runner, layout):
    for cfg in ({'semantic_rows': 'last'}, {'semantic_rows': 'text'}, {'use_action': False},
                {'use_semantic': False}, {'combine': 'sum'}, {'use_diversity': False}, {'action_layer': 3}):
        method = build_method('vla_pruner', {'keep_ratio': 0.25, **cfg})
        results = run_episode(method, steps=4, layout=layout, runner=runner)
        final = results[-1].record.kept_per_layer[-1]
        assert per_camera_counts(final, layout) == [budget_count(0.25, P)] * layout.num_cameras, cfg
    # without warm-up the first steps have no action history: semantic score only, still the exact budget
    method = build_method('vla_pruner', {'keep_ratio': 0.25, 'warmup': False})
    first = run_episode(method, steps=1, layout=layout, runner=runner)[0]
    assert per_camera_counts(first.record.kept_per_layer[-1], layout) == [budget_count(0.25, P)] * 2
    # prefill-only needs no warm-up
    method = build_method('vla_pruner', {'use_action': False})
    first = run_episode(method, steps=1, layout=layout, runner=runner)[0]
    assert not first.record.info['warmup'] and first.record.visual_kept_per_layer[-1] < layout.num_visual


def test_vla_pruner_union_is_diversity_filtered(runner, layout):
    """When the two top-M sets differ, the result is the greedy max-min pick from their union."""
    method = build_method('vla_pruner', {'keep_ratio': 0.25})
    results = run_episode(method, steps=4, layout=layout, runner=runner)
    info = results[-1].record.info
    m = budget_count(0.25, P)
    assert any(c > m for c in info['candidates'])          # random attention: the two sets are not identical


# ------------------------------------------------------------------------------------------------- VLA-Cache

def test_vla_cache_reuses_static_task_irrelevant_tokens(runner, layout):
    method = build_method('vla_cache')
    results = run_episode(method, steps=4, layout=layout, runner=runner)
    assert results[0].record.reused is None and not results[0].record.info['cache_valid']
    later = results[2].record
    assert later.reused is not None and len(later.reused) == later.info['reused'] > 0
    # the moving square's patches (changed between steps 1 and 2: row = camera, columns 1 and 2) are never reused
    moving_seq = {cam * P + cam * GRID[1] + col for cam in range(layout.num_cameras) for col in (1, 2)}
    assert not (set(later.reused.tolist()) & moving_seq)
    # at most the static cap per camera, none of the previous step's task-relevant tokens
    assert all(c <= budget_count(150 / 256, P) for c in per_camera_counts(later.reused, layout))
    nonreused = results[3].record.kept_per_layer[0]
    assert len(nonreused) + len(results[3].record.reused) == layout.num_tokens
    method.reset()
    assert not method.kv_store.valid


def test_vla_cache_freshness_bound(runner, layout):
    method = build_method('vla_cache', {'max_consecutive_reuse': 1})
    results = run_episode(method, steps=4, layout=layout, runner=runner)
    r2, r3 = results[2].record.reused, results[3].record.reused
    assert r2 is not None and r3 is not None
    assert not (set(r2.tolist()) & set(r3.tolist()))              # a token reused at step 2 is recomputed at 3


# ------------------------------------------------------------------------------------------------- SpecPrune

def test_specprune_first_step_no_static_pruning_then_union(runner, layout):
    method = build_method('specprune_static')
    results = run_episode(method, steps=3, layout=layout, runner=runner, actions=FAST)
    first = results[0].record
    assert first.visual_kept_per_layer == [layout.num_visual] * LAYERS
    assert first.info['dynamic'] == 'no reference (all changed)'
    second = results[1].record
    info = second.info
    assert info['mode'] == 'coarse' and info['global'] > 0 and isinstance(info['dynamic'], int)
    counts = second.visual_kept_per_layer
    assert counts[0] == layout.num_visual and counts[1] < layout.num_visual and counts[2] <= counts[1]
    assert counts[2:] == [counts[2]] * (LAYERS - 2)                 # static only: nothing after layer 1
    # the moving square's patches changed and are kept
    kept = set(second.kept_per_layer[-1].tolist())
    for cam in range(layout.num_cameras):
        row = cam % GRID[0]
        for col in (0, 1):                                           # square at column 1 now, column 0 before
            assert cam * P + row * GRID[1] + col in kept


def test_specprune_gather_counts_auto_are_exact_on_the_cpu_and_from_the_previous_step_on_accelerators():
    for device in ('cuda', 'cuda:1', 'mps', 'xpu'):
        assert gather_counts_on('auto', torch.device(device)) == 'previous_step'
    assert gather_counts_on('auto', torch.device('cpu')) == 'exact'
    for setting in ('exact', 'previous_step'):                      # an explicit setting holds on every device
        assert {gather_counts_on(setting, torch.device(d)) for d in ('cpu', 'cuda')} == {setting}
    assert method_config('specprune').gather_counts == 'auto'


def test_specprune_default_gathers_as_the_decoders_device_says(runner, layout, monkeypatch):
    # the default on the CPU keeps the exact unions (the paper's sets; no count info), and where 'auto' resolves to
    # an accelerator's mode the default steps are those of 'previous_step' counts
    exact = run_episode(build_method('specprune_static', {'gather_counts': 'exact'}), steps=4, layout=layout,
                        runner=runner, actions=FAST)
    default = run_episode(build_method('specprune_static'), steps=4, layout=layout, runner=runner, actions=FAST)
    assert kept_lists(default) == kept_lists(exact)
    assert not any('gather_counts' in r.record.info for r in default)
    lagged = run_episode(build_method('specprune_static', {'gather_counts': 'previous_step'}), steps=4,
                         layout=layout, runner=runner, actions=FAST)
    resolved = gather_counts_on
    monkeypatch.setattr(specprune_module, 'gather_counts_on',
                        lambda setting, device: resolved(setting, torch.device('cuda')))
    accelerated = run_episode(build_method('specprune_static'), steps=4, layout=layout, runner=runner, actions=FAST)
    assert kept_lists(accelerated) == kept_lists(lagged)
    assert [r.record.info['gather_counts'] for r in accelerated][2:] == ['previous step'] * 2


def test_specprune_previous_step_counts_keep_as_many_as_the_last_union(runner, layout):
    lagged = run_episode(build_method('specprune_static', {'gather_counts': 'previous_step'}), steps=5,
                         layout=layout, runner=runner, actions=FAST)
    exact = run_episode(build_method('specprune_static'), steps=2, layout=layout, runner=runner, actions=FAST)
    infos = [r.record.info for r in lagged]
    assert [info['gather_counts'] for info in infos] == \
        ['exact (no reference frame)', 'exact (no previous count)'] + ['previous step'] * 3
    assert kept_lists(lagged[:2]) == kept_lists(exact)              # both read the exact counts until then
    for step in (2, 3, 4):
        kept = lagged[step].record.kept_per_layer
        for gather in (0, 1):
            present = per_camera_counts(kept[gather], layout)
            union_before = infos[step - 1]['union_sizes'][gather].tolist()
            assert per_camera_counts(kept[gather + 1], layout) == [min(u, n) for u, n in zip(union_before, present)]
        ran = set(kept[-1].tolist())
        for cam in range(layout.num_cameras):                       # the moving square's patches rank first
            row = cam % GRID[0]
            assert cam * P + row * GRID[1] + (step % GRID[1]) in ran
    # at the exact step the union was kept as it is: its size is the count
    assert per_camera_counts(lagged[1].record.kept_per_layer[2], layout) == infos[1]['union_sizes'][1].tolist()


def test_specprune_previous_step_counts_scale_with_k_when_it_changes(runner, layout):
    # a new K_base (here a latency budget's knob; a mode switch alike) scales the remembered union sizes instead of
    # reading the exact ones back
    method = build_method('specprune_static', {'gather_counts': 'previous_step'})
    results = run_episode(method, steps=3, layout=layout, runner=runner, actions=FAST)
    method.set_budget(0.5)
    results += run_episode(method, steps=2, layout=layout, runner=runner, actions=FAST, start_step=3)
    infos = [r.record.info for r in results]
    assert [info['gather_counts'] for info in infos][2:] == \
        ['previous step', 'previous step (scaled to the new K)', 'previous step']
    before, after = infos[2]['k_base'], infos[3]['k_base']
    assert all(a < b for a, b in zip(after, before))
    kept = results[3].record.kept_per_layer
    for gather in (0, 1):
        present = per_camera_counts(kept[gather], layout)
        union_before = infos[2]['union_sizes'][gather].tolist()
        scaled = [int(np.floor(u * a / b + 0.5)) for u, a, b in zip(union_before, after, before)]
        assert per_camera_counts(kept[gather + 1], layout) == [min(c, n) for c, n in zip(scaled, present)]


def test_specprune_one_gather_prunes_everything_after_layer_0(runner, layout):
    two = run_episode(build_method('specprune_static'), steps=3, layout=layout, runner=runner, actions=FAST)
    one = run_episode(build_method('specprune_static', {'static_gathers': 1}), steps=3, layout=layout,
                      runner=runner, actions=FAST)
    counts = one[1].record.visual_kept_per_layer
    assert counts[1] < layout.num_visual and counts[1:] == [counts[1]] * (LAYERS - 1)
    assert 'local1' not in one[1].record.info and 'local1' in two[1].record.info
    assert counts[1] < two[1].record.visual_kept_per_layer[1]       # no wide 3K set at layer 1
    kept = set(one[1].record.kept_per_layer[1].tolist())
    for cam in range(layout.num_cameras):                           # changed patches still kept
        row = cam % GRID[0]
        assert {cam * P + row * GRID[1] + col for col in (0, 1)} <= kept


def test_specprune_full_controller_and_layer_pruning(runner, layout):
    slow = run_episode(build_method('specprune'), steps=3, layout=layout, runner=runner, actions=SLOW)
    fast = run_episode(build_method('specprune'), steps=3, layout=layout, runner=runner, actions=FAST)
    assert slow[-1].record.info['mode'] == 'fine' and fast[-1].record.info['mode'] == 'coarse'
    assert slow[-1].record.info['k_base'][0] > fast[-1].record.info['k_base'][0]
    rec = slow[-1].record
    drops = rec.info['layer_drops']
    assert sorted(drops) == list(scaled_prune_layers(LAYERS)) == [2, 3, 4]
    floor = budget_count(60 / 512, P, minimum=0)
    for layer in drops:
        before = per_camera_counts(rec.kept_per_layer[layer], layout)
        after = per_camera_counts(rec.kept_per_layer[layer + 1], layout)
        assert after == [max(n - int(np.floor(0.1 * n)), min(floor, n)) for n in before]
        assert sum(before) - sum(after) == drops[layer]
    # the info reports the visual count after every gather (0, 1) and drop (2, 3, 4), and only there
    kept_after = rec.info['kept_after_layer']
    assert sorted(kept_after) == [0, 1, 2, 3, 4]
    assert all(kept_after[layer] == rec.visual_kept_per_layer[layer + 1] for layer in kept_after)


def test_specprune_ablation_switches(runner, layout):
    cfgs = [{'use_global': False}, {'use_dynamic': False}, {'use_local': False}, {'use_static': False},
            {'controller': {'variant': 'paper'}}, {'layer_prune_layers': [3]}, {'global_layer': 2}]
    for cfg in cfgs:
        results = run_episode(build_method('specprune', cfg), steps=3, layout=layout, runner=runner, actions=SLOW)
        assert results[-1].record.visual_kept_per_layer[-1] >= 1, cfg
    no_static = run_episode(build_method('specprune', {'use_static': False}), steps=3, layout=layout, runner=runner)
    assert no_static[-1].record.visual_kept_per_layer[1] == layout.num_visual


def test_specprune_task_rows_choose_the_attention_it_ranks_by(runner, layout):
    """task_rows='action': the local, global and importance sets rank by the action queries' attention."""
    text = run_episode(build_method('specprune_static'), steps=3, layout=layout, runner=runner, actions=FAST)
    action = run_episode(build_method('specprune_static', {'task_rows': 'action'}), steps=3, layout=layout,
                         runner=runner, actions=FAST)
    rec = action[1].record
    assert set(rec.attention[0]) == {'action'} and set(rec.attention[LAYERS - 1]) == {'action'}
    assert set(text[1].record.attention[0]) == {'text'}
    # the gather after layer 0 keeps the top 3 K_base of each camera by the action rows' layer-0 attention
    keys, weights = rec.attention[0]['action']
    dense = dense_visual_scores(keys, weights, layout)
    wide = [budget_count(3 * k / P, P, minimum=0) for k in rec.info['k_base']]
    top = mask_to_sequence(topk_per_camera(dense, wide, layout), layout)
    assert bool(torch.isin(top, rec.kept_per_layer[1]).all())
    assert kept_lists(action)[1:] != kept_lists(text)[1:]


def test_specprune_importance_only_at_pruning_layers(runner, layout):
    every = run_episode(build_method('specprune_static_layer', {'layer_prune_layers': [3],
                                                                'importance_every_layer': True}),
                        steps=3, layout=layout, runner=runner, actions=FAST)
    sparse = run_episode(build_method('specprune_static_layer', {'layer_prune_layers': [3]}), steps=3,
                         layout=layout, runner=runner, actions=FAST)   # the default: only where a drop needs it
    last = LAYERS - 1                                                     # V_global's layer
    assert sorted(every[1].record.attention) == [0, 1, 2, 3, last]        # importance sampled at 0..3
    assert sorted(sparse[1].record.attention) == [0, 1, 3, last]          # gathers, the drop layer, V_global
    assert list(sparse[1].record.info['layer_drops']) == [3]


def test_specprune_without_images_uses_attention_sets_only(runner, layout):
    results = run_episode(build_method('specprune_static'), steps=3, layout=layout, runner=runner, images=False)
    assert results[-1].record.info['dynamic'] == 'no images'
    assert results[-1].record.visual_kept_per_layer[-1] < layout.num_visual


@pytest.mark.parametrize('cfg, images', [({'use_local': False}, False),
                                         ({'use_local': False, 'use_dynamic': False}, True)])
def test_specprune_with_empty_static_sets_keeps_everything_until_it_has_a_global_set(cfg, images, runner, layout):
    """No local set, and no changed patches (or none asked for): the first step has nothing to gather by."""
    results = run_episode(build_method('specprune', cfg), steps=3, layout=layout, runner=runner, images=images)
    assert results[0].record.visual_kept_per_layer[1] == layout.num_visual
    assert 'static sets are empty' in results[0].record.info['error']
    assert results[-1].record.visual_kept_per_layer[-1] < layout.num_visual     # V_global from the previous step


def test_specprune_min_retention_floor(runner, layout):
    method = build_method('specprune', {'layer_drop_fraction': 0.9, 'min_visual_fraction': 0.25})
    results = run_episode(method, steps=3, layout=layout, runner=runner, actions=FAST)
    for r in results:
        assert all(c >= budget_count(0.25, P, minimum=0)
                   for c in per_camera_counts(r.record.kept_per_layer[-1], layout))


def test_gap_and_step_index_resets(runner, layout):
    method = build_method('vla_pruner')
    run_episode(method, steps=4, layout=layout, runner=runner)
    assert method.observe_gap(10.0)
    r = run_episode(method, steps=1, layout=layout, runner=runner, start_step=4)[0]
    assert r.record.info['reset'] == 'gap' and r.record.info['warmup']
    run_episode(method, steps=3, layout=layout, runner=runner, start_step=5)
    r = run_episode(method, steps=1, layout=layout, runner=runner, start_step=0)[0]
    assert r.record.info['reset'] == 'step index restarted' and r.record.info['step'] == 0


def test_causal_layout(runner):
    layout = make_layout(causal=True)
    for name in ('specprune', 'vla_pruner', 'fastv', 'vla_cache'):
        results = run_episode(build_method(name), steps=4, layout=layout, runner=runner, actions=SLOW)
        assert results[-1].record.visual_kept_per_layer[-1] >= 1


@pytest.mark.parametrize('name', ['specprune', 'vla_pruner', 'vla_cache', 'fastv'])
def test_decoder_depth_from_context_or_config(name, layout):
    shallow = make_runner(layers=4)
    # the context says 4 layers: the default config (6 layers) is overridden, -1 resolves to layer 3
    results = run_episode(build_method(name), steps=4, layout=layout, runner=shallow, actions=SLOW)
    assert len(results[-1].record.kept_per_layer) == 4
    # the context does not say: the config's num_layers is used
    results = run_episode(build_method(name, {'num_layers': 4}), steps=4, layout=layout, runner=shallow,
                          actions=SLOW, tell_depth=False)
    assert results[-1].record.visual_kept_per_layer[-1] >= 1


# ------------------------------------------------------------------------------------------ self-speculation

def test_self_speculation_hit_rate(runner, layout):
    method = build_method('none', {'self_speculation': True})
    rec = run_episode(method, steps=1, layout=layout, runner=runner)[0].record
    assert sorted(rec.attention) == [0, 1, LAYERS - 1]
    rate = self_speculation_hit_rate(rec, k=6)
    assert 0.0 <= rate <= 1.0
    # identical attention at every layer -> every late top-k token is predicted
    same = {layer: dict(rec.attention[0]) for layer in (0, 1, 5)}
    fake = StepRecord(layout=layout, kept_per_layer=rec.kept_per_layer, attention=same, reused=None,
                      model_seconds=0, selection_seconds=0, flops=0, flops_full=0)
    assert self_speculation_hit_rate(fake, k=6) == 1.0
    # reversed ranking at the last layer -> no hit
    keys, w = rec.attention[0]['text']
    rev = {0: {'text': (keys, w)}, 1: {'text': (keys, w)}, 5: {'text': (keys, -w)}}
    fake.attention = rev
    assert self_speculation_hit_rate(fake, k=6) == 0.0
    with pytest.raises(KeyError):
        self_speculation_hit_rate(fake, k=6, key='action')
