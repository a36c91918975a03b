"""Greedy max-min diversity against a brute-force reference of the same greedy rule."""
import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specprune_ros.pruning.diversity import cosine_distance_matrix, greedy_max_min, greedy_max_min_groups


def brute_force_greedy(features: torch.Tensor, m: int) -> list[int]:
    """The greedy rule written out with Python loops and explicit cosine distances."""
    x = features.double()
    n = x.shape[0]

    def d(i, j):
        a, b = x[i], x[j]
        cos = float(a @ b) / max(float(a.norm()) * float(b.norm()), 1e-8)
        return min(max(1.0 - cos, 0.0), 2.0)

    if m <= 0:
        return []
    if n == 1:
        return [0]
    nearest = [min(d(i, j) for j in range(n) if j != i) for i in range(n)]
    best = max(nearest)
    chosen = [min(i for i in range(n) if abs(nearest[i] - best) <= 1e-9)]
    while len(chosen) < min(m, n):
        scores = {i: min(d(i, j) for j in chosen) for i in range(n) if i not in chosen}
        top = max(scores.values())
        chosen.append(min(i for i, s in scores.items() if abs(s - top) <= 1e-9))
    return chosen


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(min_value=1, max_value=12), st.integers(min_value=2, max_value=6), st.integers(0, 10_000),
       st.integers(min_value=0, max_value=14))
def test_matches_brute_force(n, d, seed, m):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    got = greedy_max_min(x, m).tolist()
    assert got == brute_force_greedy(x, m)
    assert len(set(got)) == len(got) == min(m, n)


def test_deterministic_and_duplicates_not_chosen_twice():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    first = greedy_max_min(x, 4)
    assert torch.equal(first, greedy_max_min(x.clone(), 4))
    assert sorted(first.tolist()) == [0, 1, 2, 3]
    assert greedy_max_min(x, 2).tolist()[1] in (0, 3) and 3 in greedy_max_min(x, 2).tolist()


def test_greedy_picks_spread_points():
    # three tight clusters: choosing three points must take one from each
    centers = torch.eye(3)
    x = torch.cat([c + 0.01 * torch.randn(4, 3, generator=torch.Generator().manual_seed(i))
                   for i, c in enumerate(centers)])
    chosen = greedy_max_min(x, 3)
    assert sorted(int(i) // 4 for i in chosen) == [0, 1, 2]


def test_greedy_min_distance_not_worse_than_any_other_first_pick_for_pairs():
    # for m = 2 the greedy pair's distance equals the farthest point from the first pick
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(5))
    dist = cosine_distance_matrix(x)
    a, b = greedy_max_min(x, 2).tolist()
    assert float(dist[a, b]) == float(dist[a].max())
    best_pair = max(float(dist[i, j]) for i, j in itertools.combinations(range(9), 2))
    assert float(dist[a, b]) <= best_pair + 1e-6


def test_distance_matrix_properties():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    dist = cosine_distance_matrix(x)
    assert torch.allclose(dist, dist.T, atol=1e-6)
    assert bool((dist >= 0).all()) and bool((dist <= 2).all())
    assert torch.all(dist.diagonal() == 0)
    assert greedy_max_min(x, 0).numel() == 0
    assert greedy_max_min(x[:1], 3).tolist() == [0]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(min_value=2, max_value=16), st.integers(0, 10_000), st.data())
def test_candidates_choose_as_the_candidate_rows_alone(n, seed, data):
    # duplicated rows make exact distance ties, which must still go to the lowest original index
    base = torch.randn((n + 1) // 2, 4, generator=torch.Generator().manual_seed(seed))
    x = base[torch.arange(n) % base.shape[0]]
    rows = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1)))
    m = data.draw(st.integers(min_value=1, max_value=len(rows)))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[rows] = True
    alone = [rows[i] for i in greedy_max_min(x[rows], m).tolist()]
    assert greedy_max_min(x, m, candidates=mask).tolist() == alone


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(0, 10_000), st.integers(min_value=0, max_value=8), st.booleans())
def test_groups_pick_what_each_group_picks_alone(seed, m, duplicates):
    # several groups (cameras) in the same steps: every group's picks equal its own greedy run
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 9, 4, generator=g)
    if duplicates:
        x[:, 1::2] = x[:, :1]
    cand = torch.rand(3, 9, generator=g) < 0.6
    cand[:, :m] = True
    got = greedy_max_min_groups(x, m, candidates=cand)
    assert got.shape == (3, min(m, 9))
    for group in range(3):
        assert torch.equal(got[group], greedy_max_min(x[group], m, candidates=cand[group]))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(0, 10_000), st.integers(min_value=1, max_value=9), st.booleans(), st.sampled_from([1, 3]))
def test_host_and_device_steps_pick_the_same(seed, m, duplicates, groups):
    # the CPU runs the greedy steps in NumPy (one group reading its rows as views), accelerators as torch operations:
    # both from the same prepared rows
    from specprune_ros.pruning.diversity import _greedy_on_device, _greedy_on_host
    g = torch.Generator().manual_seed(seed)
    n = 9
    x = torch.randn(groups, n, 4, generator=g)
    if duplicates:
        x[:, 1::2] = x[:, :1]                     # exact ties: the lowest index wins on both
    rows = cosine_distance_matrix(x)
    rows.diagonal(dim1=-2, dim2=-1).fill_(float('-inf'))
    rows[:, :, 2] = float('-inf')                 # a non-candidate column
    nearest = torch.rand(groups, n, generator=g).round(decimals=1)
    flat = rows.reshape(groups * n, n)
    on_device = _greedy_on_device(flat.clone(), nearest.clone(), m, groups, n)
    on_host = _greedy_on_host(flat.clone().numpy(), nearest.clone().numpy(), m, groups, n)
    assert on_device.shape == on_host.shape == (groups, m) and torch.equal(on_device, on_host)
