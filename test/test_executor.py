"""The prunable decoder runner against transformers' own forward and an independent reference."""
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaModel
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from specprune_ros.core.executor import PlanError, PrunableDecoderRunner
from specprune_ros.core.fixed_plan import FixedKeepSchedule
from specprune_ros.core.flops import decoder_flops, layer_flops
from specprune_ros.core.kept_tokens import _arange_on, _joined_spans, span_positions
from specprune_ros.core.layer_arithmetic import compiled_layer, rms_norm
from specprune_ros.core.masks import attention_mask
from specprune_ros.core.step_types import AttentionRequest, KVStore, StepContext, StepPlan, VisualMask
from specprune_ros.core.token_layout import TokenLayout
from specprune_ros.core.weight_products import (MKL_PACKED_EXACT_FROM_ROWS, ExactCopyChoice, input_major_product,
                                                mkl_packed_product)

HIDDEN, MLP, LAYERS = 64, 128, 4
N = 50


def make_decoder(attn: str = 'sdpa', seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=8, max_position_embeddings=256)
    config._attn_implementation = attn
    return LlamaModel(config).eval()


def make_layout(causal: bool) -> TokenLayout:
    # [2 cameras x 16 patches][6 text][1 proprio][11 action]
    return TokenLayout(num_tokens=N, camera_spans=((0, 16), (16, 32)), grid_shape=(4, 4), text_span=(32, 38),
                       proprio_span=(38, 39), action_span=(39, 50), causal=causal)


def reference_forward(decoder: LlamaModel, x: torch.Tensor, layout: TokenLayout, drops: dict[int, torch.Tensor]):
    """Independent path.

    Transformers' own decoder layers (eager attention), the sequence gathered by hand, positions passed explicitly and a
    mask built element by element.
    """
    kept = list(range(N))
    hidden = x
    for index, layer in enumerate(decoder.layers):
        if index in drops:
            visual_keep = set(drops[index].tolist())
            kept_new = [t for t in kept if t >= 32 or t in visual_keep]
            hidden = hidden[:, [kept.index(t) for t in kept_new]]
            kept = kept_new
        n = len(kept)
        mask = torch.zeros(1, 1, n, n)
        for i in range(n):
            for j in range(n):
                if layout.causal and kept[j] > kept[i]:
                    mask[0, 0, i, j] = torch.finfo(torch.float32).min
        positions = torch.tensor([kept])
        cos_sin = decoder.rotary_emb(hidden, positions)
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
    return decoder.norm(hidden), torch.tensor(kept)


@pytest.mark.parametrize('causal', [False, True])
def test_keep_all_equals_transformers_forward(causal):
    decoder = make_decoder()
    layout = make_layout(causal)
    x = torch.randn(2, N, HIDDEN)
    with torch.no_grad():
        mask = None if causal else torch.ones(1, 1, N, N, dtype=torch.bool)
        expected = decoder(inputs_embeds=x, attention_mask=mask).last_hidden_state
        result = PrunableDecoderRunner(decoder)(x, layout)
    assert torch.equal(result.kept, torch.arange(N))
    assert (result.hidden - expected).abs().max().item() <= 1e-5


def two_stage_drop() -> tuple[torch.Tensor, torch.Tensor]:
    """20 of the 32 visual tokens kept before layer 1, 9 of those before layer 3 (seeded)."""
    generator = torch.Generator().manual_seed(3)
    first = torch.randperm(32, generator=generator)[:20].sort().values
    second = first[torch.randperm(20, generator=generator)[:9]].sort().values
    return first, second


def two_stage_case(causal: bool) -> tuple[torch.nn.Module, TokenLayout, torch.Tensor, FixedKeepSchedule]:
    """An eager decoder, its layout, an input and the two-stage drop asking for the text rows' attention at layer 1."""
    first, second = two_stage_drop()
    method = FixedKeepSchedule(keep_after={0: first, 2: second}, attention=[AttentionRequest(1, 'text')])
    return make_decoder(attn='eager'), make_layout(causal), torch.randn(1, N, HIDDEN), method


@pytest.mark.parametrize('causal', [False, True])
def test_dropping_at_layers_matches_independent_reference(causal):
    decoder = make_decoder(attn='eager')
    layout = make_layout(causal)
    x = torch.randn(1, N, HIDDEN)
    first, second = two_stage_drop()
    method = FixedKeepSchedule(keep_after={0: first, 2: second})
    with torch.no_grad():
        result = PrunableDecoderRunner(decoder)(x, layout, method)
        expected, expected_kept = reference_forward(decoder, x, layout, {1: first, 3: second})
    assert torch.equal(result.kept, expected_kept)
    assert (result.hidden - expected).abs().max().item() <= 1e-5
    counts = [len(k) for k in result.record.kept_per_layer]
    assert counts == [N, 20 + 18, 20 + 18, 9 + 18]
    assert result.record.visual_kept_per_layer == [32, 20, 20, 9]


def test_keep_before_layer_zero_and_gapped_positions():
    decoder = make_decoder(attn='eager')
    layout = make_layout(causal=True)
    x = torch.randn(1, N, HIDDEN)
    keep = torch.tensor([0, 5, 6, 17, 31])
    with torch.no_grad():
        result = PrunableDecoderRunner(decoder)(x, layout, FixedKeepSchedule(keep_before=keep))
        expected, _ = reference_forward(decoder, x, layout, {0: keep})
    assert result.kept[:5].tolist() == keep.tolist()  # original positions, gaps kept
    assert (result.hidden - expected).abs().max().item() <= 1e-5
    # the pruned run differs from the unpruned one: dropping tokens really changes what attention sees
    with torch.no_grad():
        full = PrunableDecoderRunner(decoder)(x, layout)
    assert (full.select(result.kept[5:]) - result.hidden[:, 5:]).abs().max() > 1e-3


def test_causal_mask_with_gapped_positions():
    mask = attention_mask(torch.tensor([0, 5, 9]), torch.tensor([0, 5, 9, 7]), causal=True)[0, 0]
    assert mask.tolist() == [[True, False, False, False], [True, True, False, False], [True, True, True, True]]
    assert attention_mask(torch.tensor([0, 5]), torch.tensor([0, 5]), causal=False) is None


@pytest.mark.parametrize('causal', [False, True])
def test_attention_summaries_match_eager_weights(causal):
    decoder = make_decoder(attn='eager')
    layout = make_layout(causal)
    x = torch.randn(1, N, HIDDEN)
    requests = [AttentionRequest(1, 'text'), AttentionRequest(1, 'action'), AttentionRequest(2, 'last'),
                AttentionRequest(2, 'prefill', name='semantic'), AttentionRequest(2, 'text_action')]
    method = FixedKeepSchedule(attention=requests)
    with torch.no_grad():
        PrunableDecoderRunner(decoder)(x, layout, method)
        lowest = torch.finfo(torch.float32).min
        mask = torch.zeros(1, 1, N, N) if not causal else torch.full((N, N), lowest).triu(1)[None, None]
        eager = decoder(inputs_embeds=x, attention_mask=mask, output_attentions=True).attentions
    record = method.last_record
    rows = {'text': [*range(32, 38)], 'action': [*range(39, 50)], 'last': [49], 'semantic': [*range(0, 39)],
            'text_action': [*range(32, 38), *range(39, 50)]}
    for layer, key in [(1, 'text'), (1, 'action'), (2, 'last'), (2, 'semantic'), (2, 'text_action')]:
        keys, weights = record.attention[layer][key]
        expected = eager[layer][0, :, rows[key]].mean(dim=(0, 1))
        assert torch.equal(keys, torch.arange(N))
        assert torch.allclose(weights, expected, atol=1e-6)
        assert abs(weights.sum().item() - 1.0) < 1e-5


@pytest.mark.parametrize('layout', [
    make_layout(causal=False),                       # visual first: spans shift by the tokens gone
    TokenLayout(num_tokens=N, camera_spans=((22, 36), (36, 50)), grid_shape=(2, 7), text_span=(1, 17),
                proprio_span=(17, 18), action_span=(18, 22)),  # every span before the cameras
    TokenLayout(num_tokens=N, camera_spans=((1, 17), (30, 46)), grid_shape=(4, 4), text_span=(17, 29),
                proprio_span=(29, 30), action_span=(46, 50)),  # cameras on both sides of the text: searched
], ids=['visual first', 'visual last', 'interleaved'])
def test_query_rows_are_the_kept_positions_of_their_tokens(layout):
    """Rows found from the layout and the kept count equal a search for the tokens in the kept indices."""
    from specprune_ros.core.executor import _role_tables
    from specprune_ros.core.kept_tokens import KeptTokens
    roles, is_visual, non_visual, visual = _role_tables(layout, torch.device('cpu'))
    generator = torch.Generator().manual_seed(3)
    decoder = make_decoder()
    like = torch.zeros(1, 1, HIDDEN)
    spans = {'text': [layout.text_span], 'action': [layout.action_span],
             'text_action': [layout.text_span, layout.action_span]}
    for count in (len(visual), 9, 1):
        chosen = visual[torch.randperm(len(visual), generator=generator)[:count]]
        kept = torch.cat([non_visual, chosen]).sort().values
        for reused in (None, chosen[:1] if count > 1 else None):
            queries = kept if reused is None else kept[~torch.isin(kept, reused)]
            tokens = KeptTokens(decoder.rotary_emb, queries, reused, layout, roles, like)
            for rows, wanted in spans.items():
                indices = torch.cat([torch.arange(start, end) for start, end in wanted if end > start]).sort().values
                assert torch.equal(tokens.query_rows(rows), torch.searchsorted(queries, indices)), (rows, count)
                assert torch.equal(queries[tokens.query_rows(rows)], indices)
            assert torch.equal(tokens.query_rows('all'), torch.arange(len(queries)))
            assert tokens.query_rows('last').tolist() == [len(queries) - 1]


def test_query_rows_of_ever_changing_kept_counts_fill_no_cache():
    """A kept count that changes every step adds no cached tensor (a long run's memory would climb).

    A method that drops a few tokens per layer makes a new count at almost every step: single-span rows are slices of
    a few shared ranges.
    """
    device = torch.device('cpu')
    before = _arange_on.cache_info().currsize
    for count in range(1, 3000):
        rows = span_positions(((count - 1, count + 11),), device)
        assert rows.tolist() == list(range(count - 1, count + 11))
    assert _arange_on.cache_info().currsize - before <= 12            # one range per power of two
    for gap in range(200):
        rows = span_positions(((0, 3), (5 + gap, 7 + gap)), device)
        assert rows.tolist() == [0, 1, 2, 5 + gap, 6 + gap]
    assert _joined_spans.cache_info().currsize <= 64


def test_flops_count_against_hand_calculation():
    decoder = make_decoder()
    layout = make_layout(causal=False)
    method = FixedKeepSchedule(keep_before=torch.arange(0, 32, 2))  # 16 visual + 18 others = 34 tokens
    with torch.no_grad():
        record = PrunableDecoderRunner(decoder)(torch.randn(1, N, HIDDEN), layout, method).record
    d, m, kv = HIDDEN, MLP, HIDDEN // 2             # 4 query heads, 2 key/value heads: K and V are half as wide
    # q and o projections d x d, k and v d x d/2; scores and weighted sum over the keys; the gated MLP
    per_layer = lambda n: 2 * n * d * d + 2 * n * d * kv + 2 * n * n * d + 3 * n * d * m  # noqa: E731
    assert record.flops == LAYERS * per_layer(34)
    assert record.flops_full == LAYERS * per_layer(50)
    assert decoder_flops([10], [12], 8, 16) == 4 * 10 * 64 + 2 * 10 * 12 * 8 + 3 * 10 * 8 * 16
    # pi0's action expert: 1024 wide with 8 x 256 = 2048-wide attention and one 256-wide key/value head
    n, k = 51, 400
    assert layer_flops(n, k, 1024, 4096, attention=2048, kv=256) == (
        n * 1024 * 2048 * 2 + n * 1024 * 256 * 2 + 2 * n * k * 2048 + 3 * n * 1024 * 4096)


class HookAfter(FixedKeepSchedule):
    """A plan that names the layers of its hook, as given."""

    def __init__(self, layers: frozenset) -> None:
        super().__init__()
        self.layers = layers

    def begin_step(self, context: StepContext) -> StepPlan:
        return StepPlan(after_layers=self.layers)


@pytest.mark.parametrize('plan, message', [
    (FixedKeepSchedule(keep_before=torch.tensor([0, 1, 60])), 'out of range'),
    (FixedKeepSchedule(keep_before=torch.tensor([0, 1, 33])), 'TEXT token'),
    (FixedKeepSchedule(keep_after={1: torch.tensor([40])}), 'ACTION token'),
    (FixedKeepSchedule(keep_before=torch.tensor([], dtype=torch.long)), 'empty'),
    (FixedKeepSchedule(keep_before=torch.tensor([0, 1]), keep_after={0: torch.tensor([0, 2])}), 'already pruned'),
    (FixedKeepSchedule(attention=[AttentionRequest(9, 'text')]), 'layer 9'),
    (HookAfter(frozenset({1, 4})), 'hook asked after layer 4'),
    (HookAfter(frozenset({-1})), 'hook asked after layer -1'),
    (FixedKeepSchedule(attention=[AttentionRequest(1.5, 'text')]), r'layer 1.5; the decoder has 4 \(integer'),
    (HookAfter(frozenset({1.5})), 'hook asked after layer 1.5'),
    (FixedKeepSchedule(keep_before=torch.arange(32) < 20), 'not torch.bool values'),    # a mask, not indices
    (FixedKeepSchedule(keep_before=torch.tensor([0.0, 1.4, 2.0])), 'not torch.float32 values'),
    (FixedKeepSchedule(keep_after={0: np.array([True, False, True])}), 'not bool values'),
])
def test_bad_plans_raise_clear_errors(plan, message):
    with pytest.raises(PlanError, match=message):
        with torch.no_grad():
            PrunableDecoderRunner(make_decoder())(torch.randn(1, N, HIDDEN), make_layout(False), plan)


class MaskAfter(FixedKeepSchedule):
    """Keep what ``masks`` say (layer -> mask; -1: before layer 0) as visual masks, with counts right or wrong."""

    def __init__(self, masks: dict[int, torch.Tensor], counts: dict[int, int] | None = None) -> None:
        super().__init__(attention=[AttentionRequest(2, 'text')])
        self.masks, self.counts = masks, counts or {}

    def begin_step(self, context: StepContext) -> StepPlan:
        before = self.masks.get(-1)
        keep = None if before is None else VisualMask(before, self.counts.get(-1, int(before.sum())))
        return StepPlan(keep_before=keep, attention=list(self.attention),
                        after_layers=frozenset(layer for layer in self.masks if layer >= 0))

    def after_layer(self, view):
        mask = self.masks.get(view.layer)
        if mask is None:
            return None
        return VisualMask(mask, self.counts.get(view.layer, int(mask.sum())))


def _visual_mask(indices) -> torch.Tensor:
    return torch.zeros(32, dtype=torch.bool).index_fill_(0, torch.as_tensor(indices), True)


@pytest.mark.parametrize('on_host', [True, False])
@pytest.mark.parametrize('causal', [False, True])
def test_visual_masks_keep_what_indices_keep(causal, on_host):
    # the layout's 32 visual tokens come first, so a visual token's sequence index is its place in the mask
    first, second = two_stage_drop()
    runner = PrunableDecoderRunner(make_decoder(), validate_on_host=on_host)
    x = torch.randn(1, N, HIDDEN)
    with torch.no_grad():
        want = runner(x, make_layout(causal), FixedKeepSchedule(keep_after={0: first, 2: second},
                                                                attention=[AttentionRequest(2, 'text')]))
        got = runner(x, make_layout(causal), MaskAfter({0: _visual_mask(first), 1: _visual_mask(first),
                                                        2: _visual_mask(second)}))
        # the first cut before layer 0 instead
        want_before = runner(x, make_layout(causal), FixedKeepSchedule(
            keep_before=first, keep_after={2: second}, attention=[AttentionRequest(2, 'text')]))
        got_before = runner(x, make_layout(causal), MaskAfter({-1: _visual_mask(first), 2: _visual_mask(second)}))
    for got, want in ((got, want), (got_before, want_before)):
        assert [k.tolist() for k in got.record.kept_per_layer] == [k.tolist() for k in want.record.kept_per_layer]
        assert torch.equal(got.hidden, want.hidden)
        assert torch.equal(got.record.attention[2]['text'][1], want.record.attention[2]['text'][1])


@pytest.mark.parametrize('on_host', [True, False])
def test_a_visual_mask_may_count_with_a_tensor(on_host):
    first, second = two_stage_drop()
    runner = PrunableDecoderRunner(make_decoder(), validate_on_host=on_host)
    x = torch.randn(1, N, HIDDEN)
    with torch.no_grad():
        want = runner(x, make_layout(False), MaskAfter({0: _visual_mask(first)}))
        got = runner(x, make_layout(False), MaskAfter({0: _visual_mask(first)},
                                                      {0: _visual_mask(first).sum()}))     # a 0-d tensor count
    assert [k.tolist() for k in got.record.kept_per_layer] == [k.tolist() for k in want.record.kept_per_layer]


@pytest.mark.parametrize('on_host', [True, False])
def test_visual_masks_follow_the_camera_order(on_host):
    # the second camera's patches come first in the sequence: a mask's places follow the cameras, not positions
    layout = TokenLayout(num_tokens=N, camera_spans=((16, 32), (0, 16)), grid_shape=(4, 4), text_span=(32, 38),
                         proprio_span=(38, 39), action_span=(39, 50))
    mask = _visual_mask([0, 3, 17, 30])
    indices = layout.visual_indices()[mask]
    assert indices.tolist() == [16, 19, 1, 14]
    runner = PrunableDecoderRunner(make_decoder(), validate_on_host=on_host)
    x = torch.randn(1, N, HIDDEN)
    with torch.no_grad():
        want = runner(x, layout, FixedKeepSchedule(keep_after={1: indices.sort().values},
                                                   attention=[AttentionRequest(2, 'text')]))
        got = runner(x, layout, MaskAfter({1: mask}))
    assert [k.tolist() for k in got.record.kept_per_layer] == [k.tolist() for k in want.record.kept_per_layer]
    assert torch.equal(got.hidden, want.hidden)


@pytest.mark.parametrize('on_host', [True, False])
@pytest.mark.parametrize('masks, counts, message', [
    ({0: _visual_mask([1, 2]), 1: _visual_mask([1, 3])}, None, 'no longer kept|already pruned'),
    ({0: _visual_mask([1, 2])}, {0: 3}, 'exactly 3|not the 3'),
    ({0: _visual_mask([1, 2])}, {0: 1}, 'exactly 1|not the 1'),
    ({0: torch.zeros(32, dtype=torch.bool)}, None, 'empty'),
    ({0: torch.ones(31, dtype=torch.bool)}, None, r'\(32,\) bool'),
    ({0: torch.ones(32, dtype=torch.long)}, {0: 32}, r'\(32,\) bool'),
    ({-1: _visual_mask([1, 2]), 0: _visual_mask([1, 3])}, None, 'no longer kept|already pruned'),
    ({-1: _visual_mask([1, 2])}, {-1: 3}, 'exactly 3|not the 3'),
    ({-1: torch.zeros(32, dtype=torch.bool)}, None, 'empty'),
])
def test_bad_visual_masks_are_refused(masks, counts, message, on_host):
    runner = PrunableDecoderRunner(make_decoder(), validate_on_host=on_host)
    # a device-side check raises where the device runs it: at once on the CPU
    with pytest.raises((PlanError, RuntimeError), match=message):
        with torch.no_grad():
            runner(torch.randn(1, N, HIDDEN), make_layout(False), MaskAfter(masks, counts))


class ReuseMethod(FixedKeepSchedule):
    """Serve the given visual tokens from a K/V store filled by the previous step."""

    def __init__(self, reuse: torch.Tensor):
        super().__init__()
        self.store = KVStore()
        self.reuse = reuse

    def begin_step(self, context: StepContext) -> StepPlan:
        return StepPlan(reuse_kv=self.reuse, kv_store=self.store)


@pytest.mark.parametrize('causal', [False, True])
def test_kv_reuse_of_unchanged_tokens_is_exact(causal):
    decoder = make_decoder()
    layout = make_layout(causal)
    x = torch.randn(1, N, HIDDEN)
    method = ReuseMethod(torch.arange(4, 20))
    runner = PrunableDecoderRunner(decoder)
    with torch.no_grad():
        first = runner(x, layout, method)       # empty store: everything computed, store filled
        second = runner(x, layout, method)      # same input: reused K/V equal the recomputed ones
        full = runner(x, layout)
    assert first.record.reused is None
    assert second.record.reused.tolist() == list(range(4, 20))
    assert len(second.kept) == N - 16
    assert (second.hidden - full.select(second.kept)).abs().max().item() <= 1e-5
    assert second.record.flops < full.record.flops
    # a changed frame: reused tokens keep last step's K/V, so the output now differs from a full recompute
    with torch.no_grad():
        changed = x.clone()
        changed[:, 4:20] += 1.0
        third = runner(changed, layout, method)
        full_changed = runner(changed, layout)
    assert (third.hidden - full_changed.select(third.kept)).abs().max().item() > 1e-3


def test_kv_reuse_refuses_a_batch_of_several_observations():
    """The store holds one sequence: a batch of two would share (and broadcast) one observation's K/V."""
    with pytest.raises(PlanError, match='batch of one observation, not 2'):
        with torch.no_grad():
            PrunableDecoderRunner(make_decoder())(torch.randn(2, N, HIDDEN), make_layout(False),
                                                  ReuseMethod(torch.arange(4, 20)))


class ReuseMaskMethod(ReuseMethod):
    """:class:`ReuseMethod` naming the reused tokens by a visual mask (with a count that may lie), after a keep set."""

    def __init__(self, mask: torch.Tensor, count: Optional[int] = None, keep: Optional[torch.Tensor] = None):
        super().__init__(torch.zeros(0, dtype=torch.long))
        self.mask, self.count, self.keep = mask, int(mask.sum()) if count is None else count, keep

    def begin_step(self, context: StepContext) -> StepPlan:
        return StepPlan(keep_before=self.keep, reuse_kv=VisualMask(self.mask, self.count), kv_store=self.store)


@pytest.mark.parametrize('on_host', [True, False])
@pytest.mark.parametrize('causal', [False, True])
def test_kv_reuse_named_by_a_visual_mask_serves_what_indices_serve(causal, on_host):
    # cameras out of sequence order: the mask follows the cameras, the reused tokens come out ascending
    layout = TokenLayout(num_tokens=N, camera_spans=((16, 32), (0, 16)), grid_shape=(4, 4), text_span=(32, 38),
                         proprio_span=(38, 39), action_span=(39, 50), causal=causal)
    mask = _visual_mask([0, 3, 17, 30])
    indices = layout.visual_indices()[mask].sort().values
    assert indices.tolist() == [1, 14, 16, 19]
    runner = PrunableDecoderRunner(make_decoder(), validate_on_host=on_host)
    by_indices, by_mask = ReuseMethod(indices), ReuseMaskMethod(mask)
    x = torch.randn(1, N, HIDDEN)
    with torch.no_grad():
        for method in (by_indices, by_mask):
            assert runner(x, layout, method).record.reused is None     # nothing stored yet: the store filled
        changed = x + 0.5
        want, got = runner(changed, layout, by_indices), runner(changed, layout, by_mask)
    assert got.record.reused.tolist() == want.record.reused.tolist() == [1, 14, 16, 19]
    assert torch.equal(got.kept, want.kept) and len(got.kept) == N - 4
    assert torch.equal(got.hidden, want.hidden)


@pytest.mark.parametrize('on_host', [True, False])
def test_kv_reuse_by_mask_of_every_kept_visual_token_computes_one(on_host):
    layout = make_layout(False)
    runner = PrunableDecoderRunner(make_decoder(), validate_on_host=on_host)
    x = torch.randn(1, N, HIDDEN)
    method = ReuseMaskMethod(torch.zeros(32, dtype=torch.bool), keep=torch.arange(4, 12))
    with torch.no_grad():
        runner(x, layout, method)                           # the kept tokens' K/V stored
        method.mask, method.count = _visual_mask(list(range(4, 12))), 8
        second = runner(x, layout, method)
    assert second.record.reused.tolist() == list(range(5, 12))      # the first kept visual token is computed
    assert second.kept.tolist() == [4, *range(32, N)]


@pytest.mark.parametrize('on_host', [True, False])
@pytest.mark.parametrize('case, message', [
    ('store short of a layer', 'holds 3 of 4 layers'),
    ('not cached', 'not kept or have no cached'),
    ('not kept', 'not kept or have no cached'),
    ('wrong count', 'exactly 3|not the 3'),
    ('wrong shape', r'\(32,\) bool'),
])
def test_bad_kv_reuse_masks_are_refused(case, message, on_host):
    layout = make_layout(False)
    runner = PrunableDecoderRunner(make_decoder(), validate_on_host=on_host)
    x = torch.randn(1, N, HIDDEN)
    nothing = torch.zeros(32, dtype=torch.bool)
    method = ReuseMaskMethod(nothing, keep=torch.arange(8, 32) if case == 'not cached' else None)
    with torch.no_grad():
        runner(x, layout, method)                           # stores the K/V of the tokens it computed
        if case == 'store short of a layer':
            for part in (method.store.keys, method.store.values, method.store.valid):
                del part[3]
        method.mask, method.count = _visual_mask([1, 2]), 2
        if case == 'not kept':
            method.keep = torch.arange(4, 32)
        elif case == 'wrong count':
            method.count = 3
        elif case == 'wrong shape':
            method.mask, method.count = torch.ones(31, dtype=torch.bool), 31
        # a device-side check raises where the device runs it: at once on the CPU
        with pytest.raises((PlanError, RuntimeError), match=message):
            runner(x, layout, method)


def test_timing_split_is_reported():
    decoder = make_decoder()
    method = FixedKeepSchedule(attention=[AttentionRequest(0, 'text')])
    with torch.no_grad():
        record = PrunableDecoderRunner(decoder)(torch.randn(1, N, HIDDEN), make_layout(False), method).record
    assert record.model_seconds > 0 and record.selection_seconds >= 0 and record.probe_seconds > 0


def test_fused_projections_equal_the_layers_own_and_follow_weight_changes():
    decoder = make_decoder()
    layout = make_layout(False)
    x = torch.randn(1, N, HIDDEN)
    plan = FixedKeepSchedule(keep_before=torch.arange(0, 32, 2), attention=[AttentionRequest(1, 'text')])
    fused, unfused = PrunableDecoderRunner(decoder, fuse_projections=True), PrunableDecoderRunner(decoder, False)
    with torch.no_grad():
        a, b = fused(x, layout, plan), unfused(x, layout, plan)
        assert len(fused._fused) == LAYERS and not unfused._fused
        assert (a.hidden - b.hidden).abs().max().item() <= 1e-6
        assert (a.record.attention[1]['text'][1] - b.record.attention[1]['text'][1]).abs().max().item() <= 1e-7
        decoder.layers[2].mlp.up_proj.weight.mul_(2.0)           # in place: the fused copy must be rebuilt
        decoder.layers[0].self_attn.k_proj.weight.data = decoder.layers[0].self_attn.k_proj.weight.data.clone() + 0.1
        c, d = fused(x, layout, plan), unfused(x, layout, plan)
    assert (c.hidden - a.hidden).abs().max().item() > 1e-3
    assert (c.hidden - d.hidden).abs().max().item() <= 1e-6
    # with autograd on, the layers' own modules run so that gradients reach their weights
    out = fused(x, layout, plan).hidden.sum()
    out.backward()
    assert decoder.layers[0].self_attn.q_proj.weight.grad is not None


@pytest.mark.parametrize('causal', [False, True])
def test_input_major_weights_give_the_same_numbers_and_follow_weight_changes(causal):
    decoder, layout, x, method = two_stage_case(causal)
    runner, default = PrunableDecoderRunner(decoder, input_major_weights=True), PrunableDecoderRunner(decoder)
    with torch.no_grad():
        result, expected = runner(x, layout, method), default(x, layout, method)
        fused = runner._fused[0]
        assert fused.qkv_copy.t().is_contiguous() and fused.down_copy.t().is_contiguous()
        assert torch.equal(result.kept, expected.kept) and torch.equal(result.hidden, expected.hidden)
        assert torch.equal(result.record.attention[1]['text'][1], expected.record.attention[1]['text'][1])
        # the output and down projections are copied too: changing them in place rebuilds the copies
        decoder.layers[1].self_attn.o_proj.weight.mul_(2.0)
        decoder.layers[3].mlp.down_proj.weight.mul_(0.5)
        changed, expected_changed = runner(x, layout, method), default(x, layout, method)
        assert (changed.hidden - result.hidden).abs().max().item() > 1e-3
        assert torch.equal(changed.hidden, expected_changed.hidden)
        # a module replaced since the copy was made runs itself
        decoder.layers[2].self_attn.o_proj = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)
        replaced, expected_changed = runner(x, layout, method), default(x, layout, method)
        assert torch.equal(replaced.hidden, expected_changed.hidden)
        # switching the option off (and the MKL packed default with it) drops the copies
        runner.input_major_weights, runner.mkl_packed_weights = False, False
        plain = runner(x, layout, method)
        assert runner._fused[0].o_copy is None and torch.equal(plain.hidden, expected_changed.hidden)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason='this torch build has no oneDNN')
@pytest.mark.parametrize('causal', [False, True])
def test_packed_weights_give_the_default_numbers_to_rounding_and_follow_weight_changes(causal):
    decoder, layout, x, method = two_stage_case(causal)
    runner, default = PrunableDecoderRunner(decoder, packed_weights=True), PrunableDecoderRunner(decoder)
    with torch.no_grad():
        result, expected = runner(x, layout, method), default(x, layout, method)
        fused = runner._fused[0]
        assert fused.copy_kind == 'packed' and fused.qkv_copy.is_mkldnn and fused.down_copy.is_mkldnn
        assert torch.equal(result.kept, expected.kept)
        assert torch.allclose(result.hidden, expected.hidden, rtol=1e-4, atol=1e-5)
        # changing a weight in place rebuilds the packed copies
        decoder.layers[3].mlp.down_proj.weight.mul_(0.5)
        changed, expected_changed = runner(x, layout, method), default(x, layout, method)
        assert (changed.hidden - result.hidden).abs().max().item() > 1e-3
        assert torch.allclose(changed.hidden, expected_changed.hidden, rtol=1e-4, atol=1e-5)
        # switching the option off drops oneDNN's copies and gives the default numbers bit for bit
        runner.packed_weights = False
        plain = runner(x, layout, method)
        assert runner._fused[0].copy_kind != 'packed' and torch.equal(plain.hidden, expected_changed.hidden)
    with pytest.raises(ValueError, match='alternatives'):
        PrunableDecoderRunner(decoder, packed_weights=True, input_major_weights=True)


MKL_PACKED = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, '_mkl_linear')


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason='this torch build has no oneDNN')
@pytest.mark.parametrize('vendor, width, expected', [('AuthenticAMD', 256, 'packed'), ('', 256, 'packed'),
                                                     ('GenuineIntel', 256, 'mkl_packed'),
                                                     ('AuthenticAMD', 128, None)])
def test_packed_products_by_default_only_where_they_measured_faster(monkeypatch, vendor, width, expected):
    from specprune_ros.core import executor
    monkeypatch.setattr(executor, 'cpu_vendor', lambda: vendor)
    config = LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=8, max_position_embeddings=64)
    runner = PrunableDecoderRunner(LlamaModel(config).eval())
    assert runner.weight_copy_kind() == (expected if MKL_PACKED or expected == 'packed' else None)
    runner.packed_weights = True                      # forcing it works on every processor
    assert runner.weight_copy_kind() == 'packed'
    runner.packed_weights, runner.mkl_packed_weights = False, True
    assert runner.weight_copy_kind() == ('mkl_packed' if MKL_PACKED else None)
    runner.mkl_packed_weights = False
    assert runner.weight_copy_kind() is None


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason='this torch build has no oneDNN')
@pytest.mark.parametrize('vendor', ['GenuineIntel', 'AuthenticAMD'])
def test_default_weight_copies_only_where_one_more_copy_fits_a_quarter_of_free_memory(monkeypatch, vendor):
    from specprune_ros.core import executor
    monkeypatch.setattr(executor, 'cpu_vendor', lambda: vendor)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=8, max_position_embeddings=64)
    decoder = LlamaModel(config).eval()
    linear_bytes = 2 * 4 * (4 * 256 * 256 + 3 * 256 * 512)          # two layers' products, fp32
    monkeypatch.setattr(executor, 'available_memory_bytes', lambda: 4 * linear_bytes - 1)
    tight = PrunableDecoderRunner(decoder)
    assert tight.weight_copy_kind() is None
    monkeypatch.setattr(executor, 'available_memory_bytes', lambda: 10 ** 12)
    assert tight.weight_copy_kind() is None, 'decided once per runner: the copies are not rebuilt as memory changes'
    tight.packed_weights = True                       # forcing a copy ignores the memory share
    assert tight.weight_copy_kind() == 'packed'
    monkeypatch.setattr(executor, 'available_memory_bytes', lambda: 4 * linear_bytes)
    roomy = PrunableDecoderRunner(decoder)
    expected = 'packed' if vendor == 'AuthenticAMD' else ('mkl_packed' if MKL_PACKED else None)
    assert roomy.weight_copy_kind() == expected
    monkeypatch.setattr(executor, 'available_memory_bytes', lambda: None)      # unknown: as if it fits
    assert PrunableDecoderRunner(decoder).weight_copy_kind() == expected


@pytest.mark.skipif(not MKL_PACKED, reason="this torch build has no MKL packed product (torch.ops.mkl._mkl_linear)")
@pytest.mark.parametrize('causal', [False, True])
def test_mkl_packed_weights_give_the_default_numbers_bit_for_bit_and_follow_weight_changes(causal):
    decoder, layout, x, method = two_stage_case(causal)
    runner = PrunableDecoderRunner(decoder, mkl_packed_weights=True, packed_weights=False)
    default = PrunableDecoderRunner(decoder, mkl_packed_weights=False, packed_weights=False)
    with torch.no_grad():
        result, expected = runner(x, layout, method), default(x, layout, method)
        fused = runner._fused[0]
        assert fused.copy_kind == 'mkl_packed' and default._fused[0].copy_kind is None
        assert torch.equal(result.kept, expected.kept) and torch.equal(result.hidden, expected.hidden)
        assert torch.equal(result.record.attention[1]['text'][1], expected.record.attention[1]['text'][1])
        # every product shape of the pass was checked once, and the packed copy served the ones that matched
        assert runner._mkl_packed._same and any(runner._mkl_packed._same.values())
        # changing a weight in place rebuilds the packed copies
        decoder.layers[3].mlp.down_proj.weight.mul_(0.5)
        changed, expected_changed = runner(x, layout, method), default(x, layout, method)
        assert (changed.hidden - result.hidden).abs().max().item() > 1e-3
        assert torch.equal(changed.hidden, expected_changed.hidden)
        # switching the option off drops the copies
        runner.mkl_packed_weights = False
        plain = runner(x, layout, method)
        assert runner._fused[0].down_copy is None and torch.equal(plain.hidden, expected_changed.hidden)


@pytest.mark.skipif(not MKL_PACKED, reason="this torch build has no MKL packed product (torch.ops.mkl._mkl_linear)")
def test_mkl_packed_product_is_checked_per_count_only_below_the_threshold():
    weight, bias = torch.randn(96, 64), torch.randn(96)
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, 128)
    choose = ExactCopyChoice(mkl_packed_product, MKL_PACKED_EXACT_FROM_ROWS)
    for rows in (1, 7, 16, 63, MKL_PACKED_EXACT_FROM_ROWS, 141, 300):
        x = torch.randn(1, rows, 64)
        for b in (None, bias):
            assert torch.equal(choose(x, weight, packed, b), F.linear(x, weight, b))
    # one check per count below the threshold, one for all larger counts; with and without the bias
    assert sorted({key[0] for key in choose._same}) == [1, 7, 16, 63, MKL_PACKED_EXACT_FROM_ROWS]
    assert len(choose._same) == 10


@pytest.mark.skipif(not MKL_PACKED, reason="this torch build has no MKL packed product (torch.ops.mkl._mkl_linear)")
@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('shape', [(768, 256), (1536, 256), (256, 768), (256, 256), (1536, 512), (512, 1376)])
def test_from_the_threshold_on_mkl_packed_products_match_the_plain_one_at_every_count_or_at_none(shape, threads):
    # what lets ExactCopyChoice check one count per weight shape from MKL_PACKED_EXACT_FROM_ROWS rows on
    torch.manual_seed(0)
    weight = torch.randn(*shape)
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, 128)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        same = {torch.equal(mkl_packed_product(x, packed, weight, None), F.linear(x, weight))
                for x in (torch.randn(1, rows, shape[1]) for rows in range(MKL_PACKED_EXACT_FROM_ROWS, 400, 3))}
    finally:
        torch.set_num_threads(before)
    assert len(same) == 1, f'{shape}, {threads} threads: the packed product matches the plain one at some counts only'


def test_input_major_copy_is_read_only_where_it_gives_the_same_numbers():
    choose = ExactCopyChoice(input_major_product)
    weight = torch.randn(24, 16)
    exact = weight.t().contiguous().t()
    other = (weight * (1 + 1e-3)).t().contiguous().t()      # stands in for a product that sums in another order
    x = torch.randn(1, 20, 16)
    assert torch.equal(choose(x, weight, exact, None), F.linear(x, weight))
    assert len(choose._same) == 1
    refused = ExactCopyChoice(input_major_product)
    assert torch.equal(refused(x, weight, other, None), F.linear(x, weight))  # the default product runs
    assert list(refused._same.values()) == [False]


@pytest.mark.parametrize('causal', [False, True])
def test_compiled_layers_with_padded_buckets_match_the_reference(causal):
    # every kept set here (50, 38 and 27 tokens) pads to one 64-token bucket: one compilation per layout
    decoder, layout, x, method = two_stage_case(causal)
    runner = PrunableDecoderRunner(decoder, compile_layers=True, bucket=64)

    def compiled_calls() -> int:
        info = compiled_layer.cache_info()
        return info.hits + info.misses

    before = compiled_calls()
    with torch.no_grad():
        result = runner(x, layout, method)
        assert compiled_calls() == before + LAYERS              # every layer went through the compiled graph
        eager = PrunableDecoderRunner(decoder)(x, layout, method)
        first, second = two_stage_drop()
        expected, expected_kept = reference_forward(decoder, x, layout, {1: first, 3: second})
    assert torch.equal(result.kept, expected_kept)
    assert (result.hidden - expected).abs().max().item() <= 1e-5
    keys, weights = result.record.attention[1]['text']
    assert torch.equal(keys, eager.record.attention[1]['text'][0])
    assert (weights - eager.record.attention[1]['text'][1]).abs().max().item() <= 1e-6
    # padding tokens never reach the output, the kept-token records or the FLOPs
    assert [len(k) for k in result.record.kept_per_layer] == [N, 38, 38, 27]
    assert result.record.flops == eager.record.flops


@pytest.mark.parametrize('rows', [1, 37, 160, 357])
def test_rms_norm_gives_the_modules_numbers_bit_for_bit(rows):
    torch.manual_seed(rows)
    norm = LlamaRMSNorm(96, eps=1e-5)
    norm.weight.data = torch.rand(96) * 2
    x = torch.randn(1, rows, 96) * 4
    with torch.no_grad():
        assert torch.equal(rms_norm(norm, x), norm(x))
        assert torch.equal(rms_norm(norm, x.to(torch.bfloat16)), norm(x.to(torch.bfloat16)))   # the module path


def test_select_returns_surviving_tokens_and_refuses_pruned_ones():
    from specprune_ros.core.executor import RunResult
    kept = torch.tensor([0, 2, 3, 7])
    hidden = torch.arange(4 * 3, dtype=torch.float32).view(1, 4, 3)
    result = RunResult(hidden=hidden, kept=kept, record=None)
    assert torch.equal(result.select(torch.tensor([3, 7])), hidden[:, [2, 3]])
    assert result.select(torch.tensor([], dtype=torch.long)).shape == (1, 0, 3)
    for pruned in ([1], [2, 5], [8], [0, 9]):             # gone, or past the last kept token
        with pytest.raises(PlanError, match='requested tokens were pruned'):
            result.select(torch.tensor(pruned))
