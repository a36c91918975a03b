"""The executor's attention kernel: fused SDPA, or two products where they measured faster on the CPU."""
import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from specprune_ros.core.attention_kernels import share_probabilities, two_product_attention, use_two_products
from specprune_ros.core.executor import PrunableDecoderRunner
from specprune_ros.core.fixed_plan import FixedKeepSchedule
from specprune_ros.core.step_types import AttentionRequest
from specprune_ros.core.token_layout import TokenLayout

PATCHES = 64


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def decoder(head_dim: int = 64, kv_heads: int = 2) -> LlamaModel:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2 * head_dim, intermediate_size=4 * head_dim, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=8,
                         max_position_embeddings=512)
    config._attn_implementation = 'sdpa'
    return LlamaModel(config).eval()


def layout(causal: bool) -> TokenLayout:
    # [2 cameras x 64 patches][12 text][1 proprio][27 action]: 168 tokens
    visual = 2 * PATCHES
    return TokenLayout(num_tokens=visual + 40, camera_spans=((0, PATCHES), (PATCHES, visual)), grid_shape=(8, 8),
                       text_span=(visual, visual + 12), proprio_span=(visual + 12, visual + 13),
                       action_span=(visual + 13, visual + 40), causal=causal)


def run(runner: PrunableDecoderRunner, causal: bool, attention: tuple = ()):
    # every token through layer 0 (168), 80 patches after it (120 tokens), 40 after layer 2 (80 tokens)
    plan = FixedKeepSchedule(keep_after={0: torch.cat([torch.arange(0, 40), torch.arange(PATCHES, PATCHES + 40)]),
                                         2: torch.cat([torch.arange(0, 20), torch.arange(PATCHES, PATCHES + 20)])},
                             attention=list(attention))
    x = torch.randn(1, layout(causal).num_tokens, generator=torch.Generator().manual_seed(1)).unsqueeze(-1)
    x = x.expand(-1, -1, runner.hidden_size).contiguous() * torch.linspace(-1, 1, runner.hidden_size)
    with torch.inference_mode():
        return runner(x, layout(causal), plan)


@pytest.mark.parametrize('queries, head_dim, threads, masked, grouped, dtype, choice, expected', [
    (144, 64, 2, False, False, torch.float32, None, True),
    (96, 128, 4, False, False, torch.float32, None, True),
    (191, 64, 2, False, False, torch.float32, None, True),
    (95, 64, 2, False, False, torch.float32, None, False),       # the fused kernel is faster below
    (192, 64, 2, False, False, torch.float32, None, False),      # 64-row query blocks from 192 on
    (144, 32, 2, False, False, torch.float32, None, False),      # small heads: fused faster
    (144, 64, 1, False, False, torch.float32, None, False),      # one thread: fused faster
    (144, 64, 2, True, False, torch.float32, None, False),       # masked (causal) layers keep SDPA
    (144, 64, 2, False, True, torch.float32, None, False),       # grouped key heads keep SDPA
    (144, 64, 2, False, False, torch.bfloat16, None, False),     # measured in fp32 only
    (144, 64, 2, False, False, torch.float32, 'sdpa', False),
    (40, 32, 1, False, False, torch.bfloat16, 'products', True),
    (40, 32, 1, True, False, torch.float32, 'products', False),
])
def test_the_rule_picks_two_products_only_where_they_measured_faster(queries, head_dim, threads, masked, grouped,
                                                                     dtype, choice, expected):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        like = torch.zeros(1, dtype=dtype)
        assert use_two_products(queries, queries, head_dim, like, masked, grouped, choice) is expected
    finally:
        torch.set_num_threads(before)


def test_keys_beyond_the_queries_and_accelerators_keep_sdpa_by_default(two_threads):
    assert not use_two_products(144, 200, 64, torch.zeros(1), False, False)   # reused keys: a shape not measured
    assert not use_two_products(144, 144, 64, torch.zeros(1, device='meta'), False, False)   # not the CPU


def test_two_products_in_the_layers_where_the_rule_applies_with_the_fused_kernels_numbers(two_threads):
    model = decoder()
    auto = run(PrunableDecoderRunner(model), causal=False)
    fused = run(PrunableDecoderRunner(model, attention_kernel='sdpa'), causal=False)
    # 168 tokens through layer 0, 120 through layers 1-2, 80 through layer 3
    assert auto.record.attention_kernels == ['products', 'products', 'products', 'sdpa']
    assert fused.record.attention_kernels == ['sdpa'] * 4
    assert torch.equal(auto.kept, fused.kept)
    torch.testing.assert_close(auto.hidden, fused.hidden, rtol=1e-5, atol=1e-5)
    forced = run(PrunableDecoderRunner(model, attention_kernel='products'), causal=False)
    assert forced.record.attention_kernels == ['products'] * 4
    torch.testing.assert_close(forced.hidden, fused.hidden, rtol=1e-5, atol=1e-5)


def test_masked_and_grouped_layers_always_run_sdpa(two_threads):
    causal = run(PrunableDecoderRunner(decoder(), attention_kernel='products'), causal=True)
    assert causal.record.attention_kernels == ['sdpa'] * 4
    grouped = run(PrunableDecoderRunner(decoder(kv_heads=1), attention_kernel='products'), causal=False)
    assert grouped.record.attention_kernels == ['sdpa'] * 4


def test_an_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match='attention_kernel'):
        PrunableDecoderRunner(decoder(), attention_kernel='flash')


def test_forced_products_in_bfloat16_stay_close_to_sdpa():
    generator = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 40, 64, generator=generator).to(torch.bfloat16).unbind(0)
    out = two_product_attention(q, k, v, 64 ** -0.5)
    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=64 ** -0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('rows, queries, grouped, choice, expected', [
    (141, 168, False, None, True),       # prefill rows: most of the layer
    (126, 168, False, None, True),       # exactly three quarters
    (125, 168, False, None, False),
    (12, 168, False, None, False),       # instruction rows: the queued probe is cheaper
    (141, 168, True, None, False),       # grouped key heads keep SDPA and the probe
    (141, 168, False, 'sdpa', False),    # SDPA forced everywhere
    (141, 168, False, 'products', True),
])
def test_a_probe_over_most_rows_reads_the_layers_own_probabilities(rows, queries, grouped, choice, expected):
    assert share_probabilities(rows, queries, grouped, choice) is expected


@pytest.mark.parametrize('causal', [False, True])
def test_shared_probabilities_give_the_probes_and_outputs_of_sdpa_and_a_separate_probe(causal):
    model = decoder()
    asked = (AttentionRequest(0, 'prefill', 'semantic'), AttentionRequest(0, 'text', 'task'),
             AttentionRequest(1, 'text', 'task'), AttentionRequest(2, 'prefill', 'semantic'),
             AttentionRequest(3, 'prefill', 'semantic'))
    shared = run(PrunableDecoderRunner(model), causal, asked)
    apart = run(PrunableDecoderRunner(model, attention_kernel='sdpa'), causal, asked)
    # prefill rows: 141 of 168 at layer 0 and 93 of 120 at layer 2, but 53 of 80 at layer 3; layer 1 is asked
    # for 12 instruction rows only
    assert [kernel == 'shared' for kernel in shared.record.attention_kernels] == [True, False, True, False]
    assert apart.record.attention_kernels == ['sdpa'] * 4
    assert torch.equal(shared.kept, apart.kept)
    torch.testing.assert_close(shared.hidden, apart.hidden, rtol=1e-5, atol=1e-5)
    for layer, summaries in apart.record.attention.items():
        for key, (keys, weights) in summaries.items():
            got_keys, got = shared.record.attention[layer][key]
            assert torch.equal(got_keys, keys)
            assert got.shape == weights.shape
            torch.testing.assert_close(got, weights, rtol=1e-5, atol=1e-7)
    # a probe sums to one over the keys (every row is a distribution)
    assert float(shared.record.attention[0]['semantic'][1].sum()) == pytest.approx(1.0, abs=1e-5)
