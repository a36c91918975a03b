"""Change detection on synthetic frames: a moved square is detected, a static frame is not."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning_testkit import make_embeddings, make_layout, make_runner
from specprune_ros.core.step_types import StepContext
from specprune_ros.pruning import build_method
from specprune_ros.pruning.change_detection import (ChangeDetectionConfig, changed_mask, changed_masks,
                                                    max_static_count, patch_grid_size, patch_similarity, patch_vectors,
                                                    patchify, reference_back, static_mask, static_masks)

GRID = (12, 12)
P = 8


def background(seed=0):
    return np.random.default_rng(seed).integers(40, 200, size=(GRID[0] * P, GRID[1] * P, 3), dtype=np.uint8)


def with_square(img, row, col):
    out = img.copy()
    out[row * P:(row + 1) * P, col * P:(col + 1) * P] = (255, 0, 0)
    return out


def test_patchify_row_major():
    img = np.zeros((2 * P, 3 * P, 3), dtype=np.uint8)
    img[P:, 2 * P:] = 7                      # patch (1, 2) -> index 5
    patches = patchify(img, (2, 3), P)
    assert patches.shape == (6, P * P * 3)
    assert patches[5].min() == 7 and patches[:5].max() == 0


def test_static_frame_has_no_changed_patch():
    img = background()
    assert not changed_mask(img, img.copy(), GRID, P).any()
    assert torch.allclose(patch_similarity(img, img, GRID, P), torch.ones(144))


def test_moved_square_is_detected():
    bg = background()
    before, after = with_square(bg, 3, 4), with_square(bg, 3, 6)
    changed = changed_mask(after, before, GRID, P, threshold=0.986)
    assert set(torch.nonzero(changed).flatten().tolist()) == {3 * 12 + 4, 3 * 12 + 6}


def test_cap_on_static_patches():
    img = background()
    changed = changed_mask(img, img, GRID, P, threshold=0.986, max_static=100)
    assert int(changed.sum()) == 44             # 144 patches, at most 100 may count as static
    cfg = ChangeDetectionConfig()
    assert max_static_count(cfg, 144, fine=False) == 113 and max_static_count(cfg, 144, fine=True) == 124
    assert max_static_count(cfg, 256, fine=False) == 200 and max_static_count(cfg, 256, fine=True) == 220


def test_cap_keeps_the_most_similar():
    sim = torch.tensor([0.99, 1.0, 0.5, 0.995, 0.999])
    assert static_mask(sim, 0.986, max_static=2).tolist() == [False, True, False, False, True]
    assert static_mask(sim, 0.986).tolist() == [True, True, False, True, True]


def test_no_reference_means_all_changed():
    assert changed_mask(background(), None, GRID, P).all()


def test_brightness_change_below_threshold_is_static():
    img = background()
    darker = (img.astype(np.float32) * 0.9).astype(np.uint8)   # uniform scaling keeps cosine ~ 1
    assert not changed_mask(darker, img, GRID, P).any()


def test_patch_size_inferred_when_unknown_or_inconsistent():
    assert patch_grid_size((96, 96, 3), GRID, 0) == (8, 8)
    assert patch_grid_size((100, 97, 3), GRID, 0) == (8, 8)   # remainders ignored
    assert patch_grid_size((96, 96, 3), GRID, 14) == (8, 8)   # 14 * 12 > 96 -> inferred
    with pytest.raises(ValueError):
        patch_similarity(np.zeros((96, 96, 3)), np.zeros((48, 48, 3)), GRID)


def test_reference_back_formula():
    # code: T = int(-16/3 * v / 6 + 22/3) + 3, capped at 6 (here also >= 2)
    assert reference_back(0.0) == 6
    assert reference_back(2.0) == 6            # int(5.56) + 3 = 8 -> 6
    assert reference_back(6.0) == 5            # -16/3 + 22/3 = 2 -> int(2) + 3
    assert reference_back(7.5) == 3            # int(0.667) + 3
    assert reference_back(50.0) == 2
    assert reference_back(6.0, 'paper') == 6   # floor(2) + 4
    assert reference_back(7.5, 'paper') == 4
    with pytest.raises(ValueError):
        reference_back(1.0, 'other')


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.floats(min_value=0, max_value=20), st.floats(min_value=0, max_value=20))
def test_reference_back_monotone_and_bounded(v1, v2):
    lo, hi = min(v1, v2), max(v1, v2)
    for variant in ('code', 'paper'):
        assert 2 <= reference_back(hi, variant) <= reference_back(lo, variant) <= 6


def test_cap_on_changed_patches_keeps_the_least_similar():
    bg = background()
    moved = bg.copy()
    moved[:4 * P] = 255 - moved[:4 * P]                  # the top 4 rows change strongly: 48 patches
    moved[4 * P:5 * P, :6 * P] //= 2                     # 6 more change weakly (darker, nearly the same direction)
    sim = patch_similarity(moved, bg, GRID, P)
    free = changed_mask(moved, bg, GRID, P, threshold=0.999)
    capped = changed_mask(moved, bg, GRID, P, threshold=0.999, max_changed=20)
    assert int(free.sum()) > 20 and int(capped.sum()) == 20
    assert bool((capped <= free).all())
    assert float(sim[capped].max()) <= float(sim[free & ~capped].min())   # the 20 least similar of the changed
    assert torch.equal(changed_mask(moved, bg, GRID, P, threshold=0.999, max_changed=500), free)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(0, 10_000), st.integers(0, 36), st.sampled_from([None, 3, 10]))
def test_every_camera_at_once_equals_one_camera_at_a_time(seed, cap, changed_cap):
    rng = np.random.default_rng(seed)
    grid = (6, 6)
    frames = [rng.integers(0, 255, size=(48, 48, 3), dtype=np.uint8) for _ in range(2)]
    references = [f.copy() for f in frames]
    for ref in references:                                   # some patches change a little, some a lot
        ref[:16, :24] = np.clip(ref[:16, :24].astype(int) + rng.integers(-40, 40, size=(16, 24, 3)), 0, 255)
        ref[30:, 30:] = 0
    now, then = patch_vectors(frames, grid, 8), patch_vectors(references, grid, 8)
    together = changed_masks(now, then, 2, 0.99, cap, changed_cap)
    alone = [changed_mask(f, r, grid, 8, 0.99, cap, changed_cap).numpy() for f, r in zip(frames, references)]
    np.testing.assert_array_equal(together, np.concatenate(alone))
    static, _ = static_masks(now, then, 2, 0.99, cap)
    alone = [static_mask(patch_similarity(f, r, grid, 8), 0.99, cap).numpy() for f, r in zip(frames, references)]
    np.testing.assert_array_equal(static.reshape(-1), np.concatenate(alone))


def test_cameras_of_different_frame_sizes_are_compared_each_with_itself():
    """Patch size unknown (0): a 24 px and a 48 px camera give patches of other lengths, each judged on its own."""
    rng = np.random.default_rng(5)
    grid = (3, 3)
    frames = [rng.integers(0, 255, size=(side, side, 3), dtype=np.uint8) for side in (24, 48)]
    references = [f.copy() for f in frames]
    references[0][:8, :8] = 0                                 # the small camera's first patch changes
    references[1][16:32, 16:32] = 0                           # the large camera's centre patch changes
    together = changed_masks(patch_vectors(frames, grid, 0), patch_vectors(references, grid, 0), 2, 0.99)
    alone = [changed_mask(f, r, grid, 0, 0.99).numpy() for f, r in zip(frames, references)]
    np.testing.assert_array_equal(together, np.concatenate(alone))
    assert together.nonzero()[0].tolist() == [0, 9 + 4]


@pytest.mark.parametrize('name', ['specprune', 'vla_cache'])
def test_methods_take_frames_of_other_sizes_and_a_size_change_mid_episode(name):
    """Cameras of different sizes run; a frame size change is no comparison (all changed, or no reuse)."""
    layout, runner, method = make_layout(grid=(3, 3)), make_runner(), build_method(name)
    rng = np.random.default_rng(0)
    sizes = [[(24, 24), (48, 48)]] * 3 + [[(48, 48), (48, 48)]]
    results = []
    for step, per_camera in enumerate(sizes):
        x = make_embeddings(layout, step)
        frames = [rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8) for h, w in per_camera]
        context = StepContext(layout=layout, step_index=step, visual_embeddings=x[0, layout.visual_indices()],
                              images=frames, patch_size=0, instruction='pick up the block',
                              num_layers=runner.num_layers)
        with torch.no_grad():
            results.append(runner(x, layout, method, context))
    info = results[-1].record.info
    if name == 'specprune':
        assert info['dynamic'] == 'frame size changed (all changed)'
        assert isinstance(results[2].record.info['dynamic'], int)           # sizes differ between cameras only
    else:
        assert info['reused'] == 0
