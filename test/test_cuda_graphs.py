"""CUDA graphs of the vision backbones and the decoder layers, and SDPA without cuDNN's per-length plans.

The CUDA tests are skipped where CUDA is absent (the reason is printed); on the CPU the same graph bookkeeping runs
with a stand-in graph whose replay recomputes the captured call into the captured output buffer (what a replay
does on the device), so the static buffers, the bucketing and the per-layer captures are checked here too.
"""
import copy
import dataclasses
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaModel

from specprune_ros.adapters.factory import load_adapter, read_options
from specprune_ros.adapters.published_shapes import build_published
from specprune_ros.adapters.tiny import write_tiny_checkpoint
from specprune_ros.core import cuda_graphs
from specprune_ros.core.cuda_graphs import LayerGraphs, ShapeGraphs
from specprune_ros.core.executor import PrunableDecoderRunner
from specprune_ros.core.layer_arithmetic import layer_arithmetic, layer_operands
from specprune_ros.core.weight_products import FusedProjections
from specprune_ros.pruning import build_method, diversity, selection_graphs
from specprune_ros.core.fixed_plan import FixedKeepSchedule
from specprune_ros.core.step_types import AttentionRequest
from cuda_testkit import cuda_or_skip
from pruning_testkit import make_embeddings
from test_executor import HIDDEN, N, make_layout, reference_forward, two_stage_case, two_stage_drop
from test_executor_sync import decode_loop, greedy_case


_cuda_or_skip = functools.partial(cuda_or_skip,
                                  'the graph bookkeeping runs on the CPU with a recomputing stand-in below')


@pytest.fixture(autouse=True)
def selection_graphs_restored(monkeypatch):
    """An adapter's use_cuda_graphs() turns the selection graphs on for the process: off again after."""
    monkeypatch.setattr(selection_graphs, 'ENABLED', selection_graphs.ENABLED)


@pytest.fixture
def graphs_on_the_cpu(monkeypatch):
    """Graph bookkeeping on the CPU: captures are recomputing stand-ins."""
    monkeypatch.setattr(cuda_graphs, 'capture', cuda_graphs.capture_recomputing)
    monkeypatch.setattr(PrunableDecoderRunner, '_graphs_on', lambda self, device: self.cuda_graph_layers)
    monkeypatch.setattr(ShapeGraphs, '_graphs_on', staticmethod(lambda device: True))


def check_graphed_layers(device: torch.device, causal: bool, fuse: bool | None = None) -> None:
    """``fuse`` False: the graphs read the layers' own projection weights (no fused copy is built)."""
    decoder, layout, x, method = two_stage_case(causal)       # drops after layers 0 and 2, text probe at layer 1
    on_cpu = copy.deepcopy(decoder)
    decoder = decoder.to(device)
    runner = PrunableDecoderRunner(decoder, cuda_graph_layers=True, bucket=64, fuse_projections=fuse)
    eager = PrunableDecoderRunner(decoder)
    first, second = two_stage_drop()
    with torch.no_grad():
        expected, expected_kept = reference_forward(on_cpu, x, layout, {1: first, 3: second})
        result = runner(x.to(device), layout, method)
        assert torch.equal(result.kept.cpu(), expected_kept)
        assert (result.hidden.cpu() - expected).abs().max().item() <= 1e-4
        # every kept set pads to 64 tokens: each layer captured once, layer 1 (probed) with its queries and keys
        assert result.record.attention_kernels == ['cuda graph'] * 4
        assert runner._graphs.captures == 4
        want = eager(x.to(device), layout, method)              # the probe read from the graph's queries and keys
        for layer, entries in want.record.attention.items():
            for name, (keys, weights) in entries.items():
                assert torch.equal(result.record.attention[layer][name][0], keys)
                assert (result.record.attention[layer][name][1] - weights).abs().max().item() <= 1e-5
        # other kept sets of the same bucket replay the same graphs, with their own tables and masks
        for seed in range(3):
            generator = torch.Generator().manual_seed(seed)
            keep = torch.randperm(32, generator=generator)[:12 + 5 * seed].sort().values
            other = FixedKeepSchedule(keep_after={1: keep}, attention=[AttentionRequest(2, 'text')])
            x = torch.randn(1, N, HIDDEN, generator=generator).to(device)
            got, want = runner(x, layout, other), eager(x, layout, other)
            assert torch.equal(got.kept, want.kept)
            assert (got.hidden - want.hidden).abs().max().item() <= 1e-4
            keys, weights = got.record.attention[2]['text']
            assert (weights - want.record.attention[2]['text'][1]).abs().max().item() <= 1e-5
        assert runner._graphs.captures == 4 + 2              # layer 1 unprobed, layer 2 probed: new graphs
    assert (runner._fused == {}) == (fuse is False)


@pytest.mark.parametrize('causal, fuse', [(False, None), (True, None), (False, False)])
def test_graphed_layers_match_the_reference_and_replay(causal, fuse):
    check_graphed_layers(_cuda_or_skip(), causal, fuse)


@pytest.mark.parametrize('causal, fuse', [(False, None), (True, None), (False, False), (True, False)])
def test_graph_bookkeeping_with_a_recomputing_stand_in_on_the_cpu(causal, fuse, graphs_on_the_cpu):
    check_graphed_layers(torch.device('cpu'), causal, fuse)


def eight_layers(device: torch.device) -> LlamaModel:
    torch.manual_seed(1)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=8, max_position_embeddings=256)
    return LlamaModel(config).eval().to(device)


def check_graph_spans(device: torch.device, causal: bool) -> None:
    """The layers between two points where a method reads or decides replay as one graph, as eager layers run."""
    decoder = eight_layers(device)
    layout = make_layout(causal)
    eager = PrunableDecoderRunner(decoder)
    spans = PrunableDecoderRunner(decoder, cuda_graph_layers=True, bucket=64)
    layers = PrunableDecoderRunner(decoder, cuda_graph_layers=True, bucket=64, cuda_graph_spans=False)
    generator = torch.Generator().manual_seed(5)

    def plan() -> FixedKeepSchedule:            # drop after layer 2, the text rows' attention read at layer 5
        keep = torch.randperm(32, generator=generator)[:14].sort().values
        return FixedKeepSchedule(keep_after={2: keep}, attention=[AttentionRequest(5, 'text')])

    with torch.no_grad():
        x = torch.randn(1, N, HIDDEN, generator=generator).to(device)
        got, want = spans(x, layout), eager(x, layout)
        assert (got.hidden - want.hidden).abs().max().item() <= 1e-4
        assert got.record.attention_kernels == ['cuda graph'] * 8 and spans._graphs.captures == 1   # one span
        for step in range(3):
            x = torch.randn(1, N, HIDDEN, generator=generator).to(device)
            method = plan()
            got, by_layer, want = spans(x, layout, method), layers(x, layout, method), eager(x, layout, method)
            for result in (got, by_layer):
                assert [k.tolist() for k in result.record.kept_per_layer] == \
                    [k.tolist() for k in want.record.kept_per_layer]
                assert (result.hidden - want.hidden).abs().max().item() <= 1e-4
                keys, weights = result.record.attention[5]['text']
                assert torch.equal(keys, want.record.attention[5]['text'][0])
                assert (weights - want.record.attention[5]['text'][1]).abs().max().item() <= 1e-5
            # layers 0-2 (the hook after 2), 3-5 (probed at 5), 6-7: three graphs, captured at the first step only
            assert spans._graphs.captures == 1 + 3, step
            assert layers._graphs.captures == 8, step
        # a pass that hands its keys and values to a decoder: every layer's from the same spans, graphs of their own
        method = plan()
        got, want = spans(x, layout, method, return_cache=True), eager(x, layout, method, return_cache=True)
        assert len(got.cache) == len(want.cache) == 8
        for mine, theirs in ((got.cache.keys, want.cache.keys), (got.cache.values, want.cache.values)):
            assert all(a.shape == b.shape and (a - b).abs().max().item() <= 1e-4 for a, b in zip(mine, theirs))
        assert all(torch.equal(a, b) for a, b in zip(got.cache.positions, want.cache.positions))
        assert (got.hidden - want.hidden).abs().max().item() <= 1e-4
        assert spans._graphs.captures == 1 + 3 + 3


@pytest.mark.parametrize('causal', [False, True])
def test_graph_spans_on_the_cpu_stand_in(causal, graphs_on_the_cpu):
    check_graph_spans(torch.device('cpu'), causal)


@pytest.mark.parametrize('causal', [False, True])
def test_graph_spans_on_cuda(causal):
    check_graph_spans(_cuda_or_skip(), causal)


def test_a_span_that_cannot_be_captured_runs_as_one_graph_per_layer(graphs_on_the_cpu, monkeypatch, caplog):
    decoder, layout = eight_layers(torch.device('cpu')), make_layout(False)
    runner = PrunableDecoderRunner(decoder, cuda_graph_layers=True, bucket=64)
    eager = PrunableDecoderRunner(decoder)
    capture = LayerGraphs.run

    def refuse_spans(self, index, *args, **kwargs):
        if index[0] != index[1]:
            raise RuntimeError('operation not permitted when stream is capturing')
        return capture(self, index, *args, **kwargs)
    monkeypatch.setattr(LayerGraphs, 'run', refuse_spans)
    keep = torch.arange(0, 32, 3)
    method = FixedKeepSchedule(keep_after={2: keep}, attention=[AttentionRequest(5, 'text')])
    x = torch.randn(1, N, HIDDEN)
    with torch.no_grad():
        for _ in range(2):
            got, want = runner(x, layout, method), eager(x, layout, method)
            assert (got.hidden - want.hidden).abs().max().item() <= 1e-4
            assert torch.equal(got.record.attention[5]['text'][0], want.record.attention[5]['text'][0])
            assert (got.record.attention[5]['text'][1] - want.record.attention[5]['text'][1]).abs().max() <= 1e-5
    assert runner.cuda_graph_spans is False and runner._graphs.captures == 8     # each layer once
    assert sum('could not run as one CUDA graph' in r.getMessage() for r in caplog.records) == 1
    # refused while handing keys and values to a decoder: each layer's still reaches the cache
    runner = PrunableDecoderRunner(decoder, cuda_graph_layers=True, bucket=64)
    with torch.no_grad():
        got, want = runner(x, layout, method, return_cache=True), eager(x, layout, method, return_cache=True)
    assert runner.cuda_graph_spans is False and len(got.cache) == 8
    for mine, theirs in ((got.cache.keys, want.cache.keys), (got.cache.values, want.cache.values)):
        assert all(a.shape == b.shape and (a - b).abs().max().item() <= 1e-4 for a, b in zip(mine, theirs))


def test_layer_arithmetic_reads_fused_or_own_weights_alike():
    decoder = two_stage_case(False)[0]
    layer = decoder.layers[0]
    fused = FusedProjections.build(layer)
    x = torch.randn(1, 20, HIDDEN)
    rope = decoder.rotary_emb(x, torch.arange(20).view(1, -1))
    half = rope[1].shape[-1] // 2
    cos, sin = rope[0].unsqueeze(1), torch.cat([-rope[1][..., :half], rope[1][..., half:]], dim=-1).unsqueeze(1)
    with torch.no_grad():
        one = layer_arithmetic(x, cos, sin, None, False, *layer_operands(layer, fused))
        own = layer_arithmetic(x, cos, sin, None, False, *layer_operands(layer, None))
        reference = layer(x, position_embeddings=rope, attention_mask=None)
    for a, b in zip(one, own):
        assert (a - b).abs().max().item() <= 1e-5
    assert (own[0] - reference).abs().max().item() <= 1e-5


def check_graphed_adapter(device: torch.device) -> None:
    """An OFT adapter with vision, layers and selections graphed gives the actions and kept tokens of the eager one."""
    torch.manual_seed(0)
    eager = build_published('openvla-oft', width=64, layers=4, vision_scale=1 / 64, proprio_dim=8, device=str(device),
                            dtype='float32')
    graphed = copy.deepcopy(eager)
    graphed.use_cuda_graphs()
    rng = np.random.default_rng(0)
    proprio = np.linspace(-0.5, 0.5, 8)
    configs = (('none', None), ('random', {'keep_ratio': 0.25}), ('specprune', None),
               ('vla_pruner', {'keep_ratio': 0.25}), ('coverage_ranked', {'warmup_steps': 1, 'refine_layer': 1}))
    methods = {name: (build_method(name, config), build_method(name, config)) for name, config in configs}
    with torch.no_grad():
        for step in range(5):
            frames = [rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8) for _ in range(2)]
            for name, (mine, theirs) in methods.items():
                selection_graphs.ENABLED = True               # as the graphed adapter's use_cuda_graphs() set it
                got = graphed.step(frames, 'pick up the cube', proprio=proprio, method=mine, step_index=step)
                selection_graphs.ENABLED = False              # the eager adapter's selections run eagerly too
                want = eager.step(frames, 'pick up the cube', proprio=proprio, method=theirs, step_index=step)
                assert [k.tolist() for k in got.result.record.kept_per_layer] == \
                    [k.tolist() for k in want.result.record.kept_per_layer], (name, step)
                np.testing.assert_allclose(got.normalized, want.normalized, atol=1e-4, err_msg=f'{name} {step}')
    assert graphed._vision_graphs.captures == 1                  # one camera count, one graph, replayed
    assert graphed.runner._graphs.captures >= 1                  # at least the unpruned pass's one span
    # coverage_ranked's cuts and rank updates: one graph per kind (one budget each here), replayed at later steps
    graphs = methods['coverage_ranked'][0]._graphs
    assert sorted(key[0] for key in graphs.keys()) == ['early cut', 'rank update', 'refine cut']
    assert all(graphs.captures(key) == 1 for key in graphs.keys())
    # VLA-Pruner's Combine-then-Filter once its window is full (steps 3 and 4): one graph, replayed
    graphs = methods['vla_pruner'][0]._graphs
    assert [key[0] for key in graphs.keys()] == ['combine then filter']
    assert graphs.captures(graphs.keys()[0]) == 1
    # SpecPrune's layer drop (one drop layer at this depth, every step): one graph, replayed
    graphs = methods['specprune'][0]._graphs
    assert [key[0] for key in graphs.keys()] == ['layer drop'] and graphs.captures(graphs.keys()[0]) == 1


def test_graphed_adapter_on_the_cpu_stand_in(graphs_on_the_cpu):
    check_graphed_adapter(torch.device('cpu'))


def test_graphed_adapter_on_cuda():
    check_graphed_adapter(_cuda_or_skip())


def check_graphed_decoding(device: torch.device) -> None:
    """The action tokens of OpenVLA decoded as one graph replay per token equal the eager loop's.

    So does the attention a method reads from the decoded tokens.
    """
    torch.manual_seed(0)
    eager = build_published('openvla', width=64, layers=4, vision_scale=1 / 64, device=str(device), dtype='float32')
    graphed = copy.deepcopy(eager)
    graphed.use_cuda_graphs()
    rng = np.random.default_rng(1)
    methods = {name: (build_method(name, config), build_method(name, config))
               for name, config in (('none', None), ('vla_pruner', {'keep_ratio': 0.25}), ('specprune', None))}
    with torch.no_grad():
        for step in range(4):
            frames = [rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)]
            for name, (mine, theirs) in methods.items():
                got = graphed.step(frames, 'pick up the cube', method=mine, step_index=step)
                want = eager.step(frames, 'pick up the cube', method=theirs, step_index=step)
                assert got.info['action_token_ids'] == want.info['action_token_ids'], (name, step)
                assert got.result.record.attention_kernels == ['cuda graph'] * 4     # the prefill too
                np.testing.assert_allclose(got.normalized, want.normalized, atol=1e-6, err_msg=f'{name} {step}')
                assert [k.tolist() for k in got.result.record.kept_per_layer] == \
                    [k.tolist() for k in want.result.record.kept_per_layer], (name, step)
                for layer, entries in want.result.record.attention.items():
                    for request, (keys, weights) in entries.items():
                        mine_keys, mine_weights = got.result.record.attention[layer][request]
                        assert torch.equal(mine_keys, keys)
                        assert (mine_weights - weights).abs().max().item() <= 1e-5, (name, step, layer, request)
    # one capture per key/value capacity and set of probed layers, replayed for every token after it
    states = graphed.runner._decode_graphs._states
    assert 0 < graphed.runner._decode_graphs.captures == len(states) <= 3
    assert any(state.attention for state in states.values())        # VLA-Pruner's action rows, read in the graph


def check_graphed_greedy_decoding(device: torch.device) -> None:
    """The decoder's greedy loop as graph replays equals one ``decode`` call per token.

    With grouped key/value heads, and layers that hold different numbers of keys (a drop after layer 1).
    """
    runner, layout, embed, head = greedy_case()
    runner.decoder.to(device)
    embed, head = embed.to(device), head.to(device)
    runner.cuda_graph_layers = True
    visual = layout.visual_indices().to(device)
    with torch.no_grad():
        for seed, keep in enumerate((visual[::2], visual[::3], visual[1::2])):
            x = make_embeddings(layout, seed).to(device)
            plan = FixedKeepSchedule(keep_after={1: keep})
            prefill = runner(x, layout, plan, return_cache=True)
            assert len({k.shape[2] for k in prefill.cache.keys}) == 2
            first = head(prefill.hidden[:, -1]).argmax(-1)
            ids, results = runner.decode_greedy(first, 4, prefill.cache, embed, head, attention_layers=[0, 3])
            again = runner(x, layout, plan, return_cache=True)
            tokens, expected = decode_loop(runner, again.cache, int(first), 4, embed, head, [0, 3])
            assert ids.tolist() == tokens, seed
            for got, want in zip(results, expected):
                assert got.hidden is None and got.key_counts == want.key_counts
                for layer in (0, 3):
                    assert torch.equal(got.attention[layer][0], want.attention[layer][0])
                    assert (got.attention[layer][1] - want.attention[layer][1]).abs().max().item() <= 1e-5
    assert runner._decode_graphs.captures == 1          # every prefill fits the same capacity: one graph


def test_graphed_greedy_decoding_on_the_cpu_stand_in(graphs_on_the_cpu):
    check_graphed_greedy_decoding(torch.device('cpu'))


def test_graphed_greedy_decoding_on_cuda():
    check_graphed_greedy_decoding(_cuda_or_skip())


def test_graphed_decoding_on_the_cpu_stand_in(graphs_on_the_cpu):
    check_graphed_decoding(torch.device('cpu'))


def test_graphed_decoding_on_cuda():
    check_graphed_decoding(_cuda_or_skip())


def check_graphed_diversity_steps(device: torch.device, monkeypatch) -> None:
    """The greedy max-min steps (DivPrune, VLA-Pruner's filter) replayed as a graph pick what NumPy picks."""
    monkeypatch.setattr(diversity, 'CPU_STEPS_IN_NUMPY', False)
    monkeypatch.setattr(selection_graphs, 'ENABLED', True)            # as an adapter's use_cuda_graphs() sets it
    monkeypatch.setattr(diversity, '_STEP_GRAPHS', selection_graphs.SelectionGraphs())
    generator = torch.Generator().manual_seed(0)
    for trial in range(3):
        features = torch.randn(2, 48, 16, generator=generator)
        candidates = torch.rand(2, 48, generator=generator) < 0.7
        candidates[:, :20] = True
        for m in (5, 12):
            monkeypatch.setattr(diversity, 'CPU_STEPS_IN_NUMPY', True)
            on_host = diversity.greedy_max_min_groups(features, m, candidates)
            monkeypatch.setattr(diversity, 'CPU_STEPS_IN_NUMPY', False)
            got = diversity.greedy_max_min_groups(features.to(device), m, candidates.to(device))
            assert torch.equal(got.cpu(), on_host), (trial, m)
        monkeypatch.setattr(diversity, 'CPU_STEPS_IN_NUMPY', True)
        on_host = diversity.greedy_max_min(features[0], 7)
        monkeypatch.setattr(diversity, 'CPU_STEPS_IN_NUMPY', False)
        assert diversity.greedy_max_min(features[0].to(device), 7).tolist() == on_host.tolist()
    # one graph per (step count, groups, size), replayed for every later call of the same
    keys = diversity._STEP_GRAPHS.keys()
    assert {key[1:4] for key in keys} == {(5, 2, 48), (12, 2, 48), (7, 1, 48)}
    assert all(diversity._STEP_GRAPHS.captures(key) == 1 for key in keys)


def test_graphed_diversity_steps_on_the_cpu_stand_in(graphs_on_the_cpu, monkeypatch):
    check_graphed_diversity_steps(torch.device('cpu'), monkeypatch)


def test_graphed_diversity_steps_on_cuda(monkeypatch):
    check_graphed_diversity_steps(_cuda_or_skip(), monkeypatch)


def test_passes_on_cuda_run_sdpa_without_cudnn(monkeypatch):
    device = _cuda_or_skip()
    decoder, layout, x, method = two_stage_case(False)
    decoder = decoder.to(device, torch.bfloat16)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', spy)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with torch.no_grad():
        PrunableDecoderRunner(decoder)(x.to(device, torch.bfloat16), layout, method)
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before       # the setting is the caller's again


def test_selection_work_whose_capture_fails_runs_eagerly(graphs_on_the_cpu, monkeypatch, caplog):
    # a capture CUDA refuses must not stop the robot: that work is logged once and runs eagerly from then on
    monkeypatch.setattr(selection_graphs, 'ENABLED', True)

    def refuse(call, device, owner):
        raise RuntimeError('operation not permitted when stream is capturing')

    monkeypatch.setattr(cuda_graphs, 'capture', refuse)
    graphs = selection_graphs.SelectionGraphs()
    x = torch.arange(6.0)
    with caplog.at_level('WARNING'):
        for shift in range(3):
            assert torch.equal(graphs.run(('double',), lambda t: t * 2, x + shift), (x + shift) * 2)
    assert graphs.captures(('double',)) == 0
    assert sum('runs eagerly' in record.getMessage() for record in caplog.records) == 1


def test_selection_graphs_replay_each_key_with_new_inputs(graphs_on_the_cpu, monkeypatch):
    monkeypatch.setattr(selection_graphs, 'ENABLED', True)
    graphs = selection_graphs.SelectionGraphs(max_entries=2)
    x = torch.arange(6.0)
    for shift in range(3):
        total, doubled = graphs.run(('sum and double',), lambda t: (t.sum(), t * 2), x + shift)
        assert total.item() == (x + shift).sum().item() and torch.equal(doubled, (x + shift) * 2)
    assert graphs.captures(('sum and double',)) == 1
    graphs.run(('negate',), torch.neg, x)
    graphs.run(('halve',), lambda t: t / 2, x)              # the least recently used key makes room
    assert graphs.keys() == [('negate',), ('halve',)]
    monkeypatch.setattr(selection_graphs, 'ENABLED', False)
    assert torch.equal(graphs.run(('triple',), lambda t: t * 3, x), x * 3) and ('triple',) not in graphs.keys()


def test_an_owner_stops_capturing_new_keys_after_its_limit(graphs_on_the_cpu, monkeypatch, caplog):
    # a budget that keeps moving must not capture (wait for the device, run twice) at every new value
    monkeypatch.setattr(selection_graphs, 'ENABLED', True)
    graphs = selection_graphs.SelectionGraphs(max_entries=2, max_captures=3)
    x = torch.arange(6.0)
    with caplog.at_level('WARNING'):
        for budget in range(6):
            assert torch.equal(graphs.run(('cut', budget), lambda t, b=budget: t[:b + 1], x), x[:budget + 1])
        assert [key[1] for key in graphs.keys()] == [1, 2]       # 0 made room for 2; 3, 4 and 5 ran eagerly
        assert torch.equal(graphs.run(('cut', 0), lambda t: t[:1], x), x[:1])   # evicted: not captured again
    assert [key[1] for key in graphs.keys()] == [1, 2] and graphs.captures(('cut', 2)) == 1
    assert sum('run eagerly' in record.getMessage() for record in caplog.records) == 1


def test_a_pool_is_not_reused_once_all_its_graphs_are_released(graphs_on_the_cpu):
    # capturing into a pool whose graphs are all gone fails inside CUDA's allocator: a new pool is started then
    graphs = LayerGraphs(max_sizes=2)
    pools = []

    def run(size: int) -> None:
        hidden = torch.randn(1, size - 3, 8)
        tables = torch.randn(2, 1, size, 4)
        graphs.run(0, hidden, size, tables, None, object(), lambda x, rope, mask: x * 2)
        pools.append(graphs.pool)

    run(32)
    run(64)                                      # two sizes alive: one pool
    assert pools[0] is pools[1]
    run(96)                                      # the oldest size released, the other still holds the pool
    assert pools[2] is pools[0]
    graphs.clear()
    run(32)                                      # every graph gone: a new pool
    assert pools[3] is not pools[0]
    one = LayerGraphs(max_sizes=1)
    graphs = one
    run(32)
    run(64)                                      # the only size evicted before the next capture: a new pool
    assert pools[5] is not pools[4]


def test_the_cuda_graphs_option_reaches_the_adapter_and_is_inert_off_cuda(tmp_path):
    """``"cuda_graphs": true`` in specprune_adapter.json turns the graphs on; on the CPU the steps run as before."""
    directory = write_tiny_checkpoint(tmp_path / 'oft', 'openvla-oft', options={'cuda_graphs': True})
    graphed = load_adapter(directory, device='cpu', dtype='float32')
    plain = load_adapter(directory, device='cpu', dtype='float32',
                         options=dataclasses.replace(read_options(directory), cuda_graphs=False))
    assert graphed.cuda_graph_vision and graphed.runner.cuda_graph_layers
    assert not plain.cuda_graph_vision and not plain.runner.cuda_graph_layers
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8) for _ in range(2)]
    proprio = np.zeros(graphed.proprio_dim)
    half = {'keep_ratio': 0.5}
    with torch.no_grad():
        got = graphed.step(frames, 'open the drawer', proprio=proprio, method=build_method('random', half))
        want = plain.step(frames, 'open the drawer', proprio=proprio, method=build_method('random', half))
    assert np.array_equal(got.normalized, want.normalized)
    assert got.result.record.attention_kernels == want.result.record.attention_kernels     # nothing padded or graphed
    assert graphed._vision_graphs.captures == 0 and graphed.runner._graphs.captures == 0


GRAPHED_CONFIGS = [
    ('specprune', {'gather_counts': 'exact'}), ('specprune', {'gather_counts': 'previous_step'}),
    ('coverage_ranked', {'warmup_steps': 1}), ('coverage_ranked', {'warmup_steps': 1, 'use_action': False}),
    ('vla_pruner', {'keep_ratio': 0.25}), ('vla_pruner', {'keep_ratio': 0.25, 'combine': 'sum'}),
    ('vla_pruner', {'keep_ratio': 0.25, 'use_semantic': False}), ('vla_pruner', {'use_action': False}),
    ('vla_pruner', {'keep_ratio': 0.25, 'use_diversity': False}), ('divprune', {'keep_ratio': 0.25}),
]


def check_graphed_selections(name: str, config, device: torch.device, monkeypatch) -> None:
    """Selections replayed as graphs keep the eager selections' tokens.

    Every variant of the selection functions (optional inputs absent, other combine rules, both gather-count
    modes), in slow and fast motion (two budgets).
    """
    from pruning_testkit import FAST, SLOW, make_context, make_frames, make_layout, make_runner
    monkeypatch.setattr(diversity, 'CPU_STEPS_IN_NUMPY', False)       # the device steps, as on a GPU
    monkeypatch.setattr(diversity, '_STEP_GRAPHS', selection_graphs.SelectionGraphs())
    layout, runner = make_layout(), make_runner().to(device)
    graphed, eager = build_method(name, config), build_method(name, config)
    with torch.inference_mode():
        for step in range(8):
            x = make_embeddings(layout, step).to(device)
            actions = SLOW if step % 3 else FAST
            kept = []
            for method, on in ((graphed, True), (eager, False)):
                monkeypatch.setattr(selection_graphs, 'ENABLED', on)
                context = make_context(layout, step, x, make_frames(step), actions, num_layers=runner.num_layers)
                context.visual_embeddings = x[0, layout.visual_indices().to(device)]
                kept.append([k.tolist() for k in runner(x, layout, method, context).record.kept_per_layer])
            assert kept[0] == kept[1], (name, config, step)
    owners = [getattr(graphed, '_graphs', None), diversity._STEP_GRAPHS]
    assert any(owner.keys() for owner in owners if owner is not None), 'no selection work was graphed'


@pytest.mark.parametrize('name, config', GRAPHED_CONFIGS)
def test_graphed_selections_keep_what_eager_ones_keep(name, config, graphs_on_the_cpu, monkeypatch):
    check_graphed_selections(name, config, torch.device('cpu'), monkeypatch)


@pytest.mark.parametrize('name, config', GRAPHED_CONFIGS)
def test_graphed_selections_keep_what_eager_ones_keep_on_cuda(name, config, monkeypatch):
    check_graphed_selections(name, config, _cuda_or_skip(), monkeypatch)
