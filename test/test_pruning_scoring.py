"""Property tests of the pure scoring helpers (normalisation, monotonicity, bounds, determinism)."""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specprune_ros.core.token_layout import TokenLayout
from specprune_ros.pruning.scoring import (budget_count, camera_ranks, decay_weights, decayed_action_score,
                                           dense_visual_scores, dense_visual_scores_on_device,
                                           divide_rows_by_positive_sum, ema_update, layer_confidence,
                                           layer_drop_on_device, layer_importance, layer_importance_known_on_device,
                                           layer_importance_on_device, mask_to_sequence,
                                           mask_to_sequence_on_device, normalise, positions_to_sequence,
                                           rank_weights, stable_topk, stable_topk_on_device,
                                           stable_topk_rows_on_device, top_counts_per_camera,
                                           topk_masks_per_camera, topk_per_camera, topk_per_camera_on_device)

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
floats = st.floats(min_value=0.0, max_value=1.0, allow_nan=False, width=32)


def vectors(min_size=1, max_size=40):
    return st.lists(floats, min_size=min_size, max_size=max_size).map(lambda v: torch.tensor(v, dtype=torch.float32))


def layout2(grid=(3, 3)):
    p = grid[0] * grid[1]
    return TokenLayout(num_tokens=2 * p + 4, camera_spans=((0, p), (p, 2 * p)), grid_shape=grid,
                       text_span=(2 * p, 2 * p + 2), action_span=(2 * p + 2, 2 * p + 4))


@SETTINGS
@given(st.floats(min_value=0.0, max_value=1.0), st.integers(min_value=0, max_value=500))
def test_budget_count_bounds_and_monotone(fraction, total):
    n = budget_count(fraction, total)
    assert 0 <= n <= total
    if total > 0:
        assert n >= 1
        assert abs(n - fraction * total) <= 0.5 or n == 1
        assert budget_count(min(1.0, fraction + 0.1), total) >= n


def test_budget_count_examples():
    assert budget_count(0.5, 144) == 72
    assert budget_count(0.125, 144) == 18
    assert budget_count(200 / 256, 144, minimum=0) == 113
    assert budget_count(0.0, 10, minimum=0) == 0


@SETTINGS
@given(vectors(), st.floats(min_value=0.1, max_value=20.0))
def test_rank_weights_normalised_monotone_bounded(scores, k):
    w = rank_weights(scores, k=k)
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-5)
    assert bool((w > 0).all()) and bool((w <= 1).all())
    order = torch.sort(-scores, stable=True).indices
    ws = w[order]
    assert bool((ws[:-1] >= ws[1:] - 1e-7).all())             # better rank -> no smaller weight
    # higher score -> at least the weight of any lower score
    i, j = int(torch.argmax(scores)), int(torch.argmin(scores))
    assert float(w[i]) >= float(w[j]) - 1e-7


@SETTINGS
@given(vectors(min_size=2), st.data())
def test_rank_weights_invalid_get_zero(scores, data):
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(scores), max_size=len(scores))))
    w = rank_weights(scores, valid=valid)
    assert bool((w[~valid] == 0).all())
    if valid.any():
        assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-5)
    else:
        assert float(w.sum()) == 0.0


@SETTINGS
@given(vectors(min_size=2))
def test_layer_confidence_bounded_and_scale_invariant(a):
    c = layer_confidence(a)
    assert 0.0 <= c <= 100.0
    if float(a.std(unbiased=False)) > 1e-3:
        assert math.isclose(layer_confidence(a * 3.0), c, rel_tol=1e-3)


@SETTINGS
@given(vectors(min_size=3, max_size=3), vectors(min_size=3, max_size=3), st.floats(min_value=0, max_value=1))
def test_ema_between_old_and_new(old, new, beta):
    out = ema_update(old, new, beta)
    lo, hi = torch.minimum(old, new), torch.maximum(old, new)
    assert bool((out >= lo - 1e-6).all()) and bool((out <= hi + 1e-6).all())
    mask = torch.tensor([True, False, True])
    masked = ema_update(old, new, beta, mask=mask)
    assert float(masked[1]) == float(old[1])


@SETTINGS
@given(st.lists(vectors(min_size=5, max_size=5), min_size=1, max_size=5), st.floats(min_value=0.05, max_value=1.0))
def test_decayed_action_score_normalised(history, gamma):
    s = decayed_action_score(history, gamma, window=3)
    assert s is not None and bool((s >= 0).all())
    if any(float(h[-3:].sum()) > 0 for h in history[-3:]) and float(s.sum()) > 0:
        assert math.isclose(float(s.sum()), 1.0, rel_tol=1e-5)


def test_decayed_action_score_weights_newest_most():
    old, new = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    s = decayed_action_score([old, new], gamma=0.8)
    # S_hat ~ 0.8^2 * old + 0.8 * new
    assert math.isclose(float(s[1]) / float(s[0]), 0.8 / 0.64, rel_tol=1e-5)
    assert torch.allclose(decay_weights(3, 0.8), torch.tensor([0.512, 0.64, 0.8]))
    # the window keeps only the newest w entries
    s3 = decayed_action_score([torch.tensor([1.0, 0.0])] + [new] * 3, gamma=0.8, window=3)
    assert float(s3[0]) == 0.0
    assert decayed_action_score([], 0.8) is None


@SETTINGS
@given(vectors(min_size=1, max_size=30), st.integers(min_value=0, max_value=35))
def test_stable_topk_is_topk(scores, k):
    idx = stable_topk(scores, k)
    assert idx.numel() == min(k, scores.numel())
    assert len(set(idx.tolist())) == idx.numel()
    if 0 < idx.numel() < scores.numel():
        chosen = scores[idx]
        rest = scores[[i for i in range(scores.numel()) if i not in set(idx.tolist())]]
        assert float(chosen.min()) >= float(rest.max())
    assert torch.equal(idx, stable_topk(scores.clone(), k))


def test_stable_topk_ties_go_to_lower_index_and_candidates():
    s = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5])
    assert stable_topk(s, 2).tolist() == [1, 2]
    cand = torch.tensor([True, False, False, True, True])
    assert stable_topk(s, 5, cand).tolist() == [3, 0, 4]


def test_topk_per_camera_and_dense_scores():
    layout = layout2()
    keys = torch.tensor([0, 3, 9, 12, 18, 19])            # 18, 19: text tokens, ignored
    w = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.7, 0.7])
    dense = dense_visual_scores(keys, w, layout, fill=-1.0)
    assert dense.shape == (18,)
    assert dense[3] == 0.5 and dense[12] == 0.9 and dense[1] == -1.0
    mask = topk_per_camera(dense, [1, 2], layout)
    assert mask[:9].sum() == 1 and mask[9:].sum() == 2
    assert bool(mask[3]) and bool(mask[12]) and bool(mask[9])


@SETTINGS
@given(vectors(min_size=18, max_size=18))
def test_layer_importance_per_camera_sums(scores):
    layout = layout2()
    valid = torch.ones(18, dtype=torch.bool)
    s = layer_importance(scores, valid, layout)
    assert bool((s >= 0).all())
    for sl in (slice(0, 9), slice(9, 18)):
        conf = layer_confidence(scores[sl])
        assert math.isclose(float(s[sl].sum()), conf, rel_tol=1e-4, abs_tol=1e-6)


@SETTINGS
@given(vectors(min_size=18, max_size=18), st.lists(st.booleans(), min_size=18, max_size=18), st.booleans())
def test_layer_importance_equals_rank_weight_times_confidence(scores, valid, per_camera):
    """The all-cameras-at-once computation equals the per-group definition, including ties and invalid tokens."""
    layout = layout2()
    valid = torch.tensor(valid)
    scores = torch.round(scores * 4) / 4                    # many ties
    got = layer_importance(scores, valid, layout, k=5.0, per_camera=per_camera)
    expected = torch.zeros(18)
    for sl in ((slice(0, 9), slice(9, 18)) if per_camera else (slice(0, 18),)):
        if valid[sl].any():
            expected[sl] = rank_weights(scores[sl], k=5.0, valid=valid[sl]) * layer_confidence(scores[sl][valid[sl]])
    assert torch.allclose(got, expected, atol=1e-6)


@SETTINGS
@given(st.lists(st.tuples(vectors(min_size=18, max_size=18), st.lists(st.booleans(), min_size=18, max_size=18)),
                min_size=1, max_size=4))
def test_layer_importance_of_stacked_layers_equals_one_call_per_layer(layers):
    """The SpecPrune importance folds several layers' samples in one call: row by row the same as separate calls."""
    layout = layout2()
    scores = torch.stack([torch.round(s * 4) / 4 for s, _ in layers])
    valid = torch.tensor([v for _, v in layers])
    got = layer_importance(scores, valid, layout)
    assert got.shape == scores.shape
    for row in range(len(layers)):
        assert torch.equal(got[row], layer_importance(scores[row], valid[row], layout))


@SETTINGS
@given(vectors())
def test_normalise(v):
    n = normalise(v)
    assert bool((n >= 0).all())
    if float(v.sum()) > 0:
        assert math.isclose(float(n.sum()), 1.0, rel_tol=1e-5)


# coarse values make ties common; NaN and -inf (tokens that were no key) rank last in both versions
coarse = st.sampled_from([0.0, 0.25, 0.5, 1.0, float('-inf'), float('nan')])


@SETTINGS
@given(st.lists(coarse, min_size=1, max_size=30), st.integers(min_value=0, max_value=35))
def test_device_topk_orders_as_the_host_topk(values, k):
    scores = torch.tensor(values, dtype=torch.float32)
    assert stable_topk_on_device(scores, k).tolist() == stable_topk(scores, k).tolist()


@SETTINGS
@given(st.data())
def test_device_scatter_and_sequence_helpers_equal_the_host_ones(data):
    layout = layout2()
    keys = torch.tensor(sorted(data.draw(st.sets(st.integers(0, layout.num_tokens - 1), min_size=1))))
    weights = torch.rand(len(keys), generator=torch.Generator().manual_seed(len(keys)))
    for fill in (0.0, float('-inf')):
        assert torch.equal(dense_visual_scores_on_device(keys, weights, layout, fill),
                           dense_visual_scores(keys, weights, layout, fill))
    chosen = data.draw(st.lists(st.integers(0, layout.num_visual - 1), unique=True))
    mask = torch.zeros(layout.num_visual, dtype=torch.bool)
    mask[chosen] = True
    assert positions_to_sequence(torch.tensor(chosen, dtype=torch.long), layout).tolist() == \
        mask_to_sequence(mask, layout).tolist()


@SETTINGS
@given(st.lists(coarse, min_size=1, max_size=30), st.data())
def test_device_topk_with_candidates_orders_as_the_host_topk(values, data):
    scores = torch.tensor(values, dtype=torch.float32)
    rows = data.draw(st.sets(st.integers(0, len(values) - 1), min_size=1))
    mask = torch.zeros(len(values), dtype=torch.bool)
    mask[sorted(rows)] = True
    k = data.draw(st.integers(min_value=0, max_value=len(rows)))
    assert stable_topk_on_device(scores, k, mask).tolist() == stable_topk(scores, k, mask).tolist()


def random_scores(shape: tuple[int, ...], g: torch.Generator, ties: bool, levels: int = 3) -> torch.Tensor:
    """Uniform scores, or whole numbers below ``levels`` so that many tie."""
    return torch.randint(0, levels, shape, generator=g).float() if ties else torch.rand(shape, generator=g)


@SETTINGS
@given(st.integers(0, 10_000), st.integers(0, 9), st.integers(0, 9), st.booleans())
def test_device_top_k_per_camera_equals_the_host_top_k(seed, k0, k1, ties):
    # one sort over a (cameras, patches) view with per-camera counts; candidates are the finite scores
    layout = layout2()
    g = torch.Generator().manual_seed(seed)
    dense = random_scores((layout.num_visual,), g, ties, levels=4)
    dense[torch.rand(layout.num_visual, generator=g) < 0.3] = float('-inf')
    cand = torch.isfinite(dense)
    assert torch.equal(topk_per_camera_on_device(dense, [k0, k1], layout, cand),
                       topk_per_camera(dense, [k0, k1], layout, cand))


@SETTINGS
@given(st.integers(0, 10_000), st.integers(1, 5))
def test_device_layer_importance_equals_the_host_samples(seed, layers):
    layout = layout2((4, 4))
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(layers, layout.num_visual, generator=g) < 0.7
    scores = torch.where(valid, torch.rand(layers, layout.num_visual, generator=g), torch.zeros(()))
    assert torch.equal(layer_importance_on_device(scores, valid, layout), layer_importance(scores, valid, layout))


@SETTINGS
@given(st.integers(0, 10_000))
def test_device_mask_to_sequence_equals_the_host_conversion(seed):
    layout = layout2()
    mask = torch.rand(layout.num_visual, generator=torch.Generator().manual_seed(seed)) < 0.5
    assert torch.equal(mask_to_sequence_on_device(mask, int(mask.sum()), layout), mask_to_sequence(mask, layout))


@SETTINGS
@given(st.integers(0, 10_000), st.booleans())
def test_device_layer_importance_with_host_counts_equals_the_host_sample(seed, ties):
    # one layer whose per-camera valid counts the caller knows: the same numbers without counting on the device
    layout = layout2((4, 4))
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(1, layout.num_visual, generator=g) < 0.7
    raw = random_scores((1, layout.num_visual), g, ties)
    scores = torch.where(valid, raw, torch.zeros(()))
    counts = valid.reshape(2, -1).sum(dim=1).tolist()
    assert torch.equal(layer_importance_on_device(scores, valid, layout, counts=counts),
                       layer_importance(scores, valid, layout))
    if min(counts) >= 2:        # the one-layer form SpecPrune's layer drops use
        assert torch.equal(layer_importance_known_on_device(scores[0], valid[0], counts),
                           layer_importance(scores, valid, layout)[0])


@SETTINGS
@given(st.integers(0, 10_000), st.booleans(), st.floats(0.0, 0.5))
def test_layer_drop_equals_the_sample_the_masked_ema_and_the_top_counts(seed, ties, fraction):
    # SpecPrune's default drop in one call: the host sample, the EMA on the present tokens, each camera's top kept
    layout = layout2((4, 4))
    g = torch.Generator().manual_seed(seed)
    present = torch.rand(layout.num_visual, generator=g) < 0.7
    present[[0, 1, 16, 17]] = True                     # at least two present tokens per camera
    scores = torch.where(present, random_scores((layout.num_visual,), g, ties), torch.zeros(()))
    before = torch.rand(layout.num_visual, generator=g, dtype=torch.float64)
    before[::3] = 0.0                                   # ties in the EMA as well
    counts = present.reshape(2, -1).sum(dim=1).tolist()
    kept = [max(2, n - int(fraction * n)) for n in counts]
    importance, mask = layer_drop_on_device(scores, present, before, torch.tensor([counts, kept]), k=5.0, beta=0.2)
    sample = layer_importance(scores.unsqueeze(0), present.unsqueeze(0), layout)[0].to(torch.float64)
    expected = torch.where(present, 0.8 * before + 0.2 * sample, before)
    assert torch.equal(importance[present], expected[present])
    assert torch.equal(mask, top_counts_per_camera(expected, present, kept, 2))
    assert mask.reshape(2, -1).sum(dim=1).tolist() == kept and not (mask & ~present).any()


@SETTINGS
@given(st.integers(0, 10_000), st.integers(0, 9), st.integers(0, 9), st.booleans())
def test_top_counts_per_camera_equals_the_masks_from_ranks(seed, k0, k1, ties):
    layout = layout2()
    g = torch.Generator().manual_seed(seed)
    dense = random_scores((layout.num_visual,), g, ties)
    cand = torch.rand(layout.num_visual, generator=g) < 0.6
    expected = topk_masks_per_camera(camera_ranks(dense, cand, 2), [k0, k1], cand)
    assert torch.equal(top_counts_per_camera(dense, cand, [k0, k1], 2), expected)


@SETTINGS
@given(st.integers(0, 10_000), st.integers(0, 12), st.booleans())
def test_row_helpers_equal_the_one_vector_helpers_row_by_row(seed, k, with_candidates):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (3, 10), generator=g).float() / 7
    scores[0] = 0.0                                       # a row without a positive sum stays as it is
    cand = (torch.rand(3, 10, generator=g) < 0.7) if with_candidates else None
    rows = stable_topk_rows_on_device(scores, k, cand)
    divided = divide_rows_by_positive_sum(scores)
    for i in range(3):
        assert torch.equal(rows[i], stable_topk_on_device(scores[i], k, None if cand is None else cand[i]))
        assert torch.equal(divided[i], normalise(scores[i]))
