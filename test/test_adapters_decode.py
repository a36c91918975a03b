"""The executor's K/V cache output and single-token decode (used by the OpenVLA adapter after a pruned prefill)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from specprune_ros.core.executor import PlanError, PrunableDecoderRunner
from specprune_ros.core.fixed_plan import FixedKeepSchedule
from specprune_ros.core.token_layout import TokenLayout

HIDDEN, LAYERS, N, NEW = 64, 4, 40, 5


def make_decoder(seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=8, max_position_embeddings=256)
    config._attn_implementation = 'sdpa'
    return LlamaModel(config).eval()


def layout(num_tokens: int) -> TokenLayout:
    """[BOS][2 x 16 patches][text ...][last token] (OpenVLA-like, causal)."""
    return TokenLayout(num_tokens=num_tokens, camera_spans=((1, 17), (17, 33)), grid_shape=(4, 4),
                       text_span=(33, num_tokens - 1), action_span=(num_tokens - 1, num_tokens), causal=True)


PLANS = {
    'keep_all': lambda: None,
    'before_layer_0': lambda: FixedKeepSchedule(keep_before=torch.tensor([1, 4, 9, 18, 20, 31])),
    'inside_decoder': lambda: FixedKeepSchedule(keep_after={0: torch.arange(1, 33, 2), 2: torch.tensor([3, 5, 21])}),
}


@pytest.mark.parametrize('plan', sorted(PLANS))
def test_decode_after_pruned_prefill_equals_one_pass_over_the_longer_sequence(plan):
    """Prefill N tokens with a keep plan and decode NEW more one by one against the cache.

    The result equals one causal pass over the N + NEW tokens with the same plan (the new tokens are never pruned).
    """
    runner = PrunableDecoderRunner(make_decoder())
    x = torch.randn(1, N + NEW, HIDDEN)
    with torch.no_grad():
        prefill = runner(x[:, :N], layout(N), PLANS[plan](), return_cache=True)
        cache = prefill.cache
        steps = [runner.decode(x[:, N + i:N + i + 1], [N + i], cache) for i in range(NEW)]
        full = runner(x, layout(N + NEW), PLANS[plan]())
    decoded = torch.cat([s.hidden for s in steps], dim=1)
    assert torch.allclose(decoded, full.hidden[:, -NEW:], atol=1e-5)
    assert torch.allclose(prefill.hidden, full.hidden[:, :-NEW], atol=1e-5)
    # each layer's cache holds exactly the tokens that entered it, then the decoded ones
    for layer, kept in enumerate(full.record.kept_per_layer):
        assert torch.equal(cache.positions[layer], kept)
    assert cache.last_position == N + NEW - 1
    assert steps[-1].key_counts == [len(k) for k in full.record.kept_per_layer]


def test_decode_several_tokens_at_once_is_causal_among_them():
    runner = PrunableDecoderRunner(make_decoder())
    x = torch.randn(1, N + NEW, HIDDEN)
    with torch.no_grad():
        cache = runner(x[:, :N], layout(N), PLANS['before_layer_0'](), return_cache=True).cache
        together = runner.decode(x[:, N:], list(range(N, N + NEW)), cache)
        full = runner(x, layout(N + NEW), PLANS['before_layer_0']())
    assert torch.allclose(together.hidden, full.hidden[:, -NEW:], atol=1e-5)


def test_keep_all_decode_matches_transformers_kv_cache():
    decoder = make_decoder()
    runner = PrunableDecoderRunner(decoder)
    x = torch.randn(1, N + 2, HIDDEN)
    with torch.no_grad():
        out = decoder(inputs_embeds=x[:, :N], use_cache=True)
        past = out.past_key_values
        expected = [decoder(inputs_embeds=x[:, N + i:N + i + 1], past_key_values=past, use_cache=True).last_hidden_state
                    for i in range(2)]
        cache = runner(x[:, :N], layout(N), return_cache=True).cache
        got = [runner.decode(x[:, N + i:N + i + 1], [N + i], cache).hidden for i in range(2)]
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-5)


def test_decode_attention_summary_is_the_softmax_over_cached_keys():
    decoder = make_decoder()
    runner = PrunableDecoderRunner(decoder)
    x = torch.randn(1, N + 1, HIDDEN)
    keep = torch.tensor([2, 7, 19, 30])
    with torch.no_grad():
        cache = runner(x[:, :N], layout(N), FixedKeepSchedule(keep_before=keep), return_cache=True).cache
        step = runner.decode(x[:, N:], [N], cache, attention_layers=[1])
        # independent: eager attention of the same gathered sequence, last row
        positions = torch.cat([cache.positions[0]])
        eager = _eager_last_row(decoder, x[:, positions], positions, layer=1)
    keys, weights = step.attention[1]
    assert torch.equal(keys, positions)
    assert torch.allclose(weights, eager, atol=1e-5)
    assert abs(weights.sum().item() - 1) < 1e-5


def _eager_last_row(decoder, x, positions, layer):
    """Mean-over-heads attention of the last token at ``layer`` with transformers' eager layers (causal by position)."""
    n = len(positions)
    mask = torch.zeros(1, 1, n, n)
    mask[0, 0][positions.view(1, -1) > positions.view(-1, 1)] = torch.finfo(torch.float32).min
    decoder.config._attn_implementation = 'eager'
    try:
        out = decoder(inputs_embeds=x, attention_mask=mask, position_ids=positions.view(1, -1), output_attentions=True)
    finally:
        decoder.config._attn_implementation = 'sdpa'
    return out.attentions[layer][0, :, -1].mean(0)


def test_cache_is_only_built_on_request_and_bad_decodes_are_refused():
    runner = PrunableDecoderRunner(make_decoder())
    x = torch.randn(1, N + 1, HIDDEN)
    with torch.no_grad():
        assert runner(x[:, :N], layout(N)).cache is None
        cache = runner(x[:, :N], layout(N), return_cache=True).cache
        with pytest.raises(PlanError, match='follow position'):
            runner.decode(x[:, N:], [N - 1], cache)
        with pytest.raises(PlanError, match='layer 9'):
            runner.decode(x[:, N:], [N], cache, attention_layers=[9])
        with pytest.raises(PlanError, match='positions'):
            runner.decode(x[:, N - 1:], [N], cache)
        runner.decode(x[:, N:], [N + 3], cache)          # gaps after the prefill are allowed
    assert cache.last_position == N + 3
