"""A pruned step never waits for the device: no host synchronisation inside the executor's step.

On CUDA, ``torch.cuda.set_sync_debug_mode('error')`` turns every synchronising call into an error. Where CUDA is
absent the same property is checked on the CPU by a guard that makes every call which would read a device value
on the host (``item``, ``cpu``, ``tolist``, ``numpy``, truth values, ``int`` / ``float``, ``nonzero``, building
tensors from host data) raise inside the step.
"""
import contextlib
import functools
import warnings

import numpy as np
import pytest
import torch

from cuda_testkit import cuda_or_skip
from pruning_testkit import make_context, make_embeddings, make_frames, make_layout, make_runner
from specprune_ros.core.executor import PrunableDecoderRunner
from specprune_ros.core.fixed_plan import FixedKeepSchedule
from specprune_ros.core.step_types import AttentionRequest
from specprune_ros.pruning import build_method
from specprune_ros.pruning import diversity as diversity_module
from specprune_ros.pruning import selection_graphs
from specprune_ros.pruning.deferred_counts import DeferredCounts
from specprune_ros.pruning.methods import specprune as specprune_module
from specprune_ros.pruning.registry import available_methods

TENSOR_READS = ('item', 'cpu', 'tolist', 'numpy', '__bool__', '__int__', '__float__', 'nonzero')
# methods whose kept count depends on the attention: with exact gather counts (SpecPrune's default on the CPU) the
# per-camera counts are read back once per static gather (the one read they make, through ``scoring.host_counts``);
# everything else stays on the device, or is read at a later step (``DeferredCounts``: see ``DeferredReads``)
COUNT_READS = {'specprune': 2, 'specprune_static': 2, 'specprune_static_layer': 2}
_TOLIST = torch.Tensor.tolist


@contextlib.contextmanager
def host_sync_guard():
    """Make every host read of a tensor value (and building a tensor from host data) raise AssertionError."""
    def refuse(name):
        def call(*args, **kwargs):
            raise AssertionError(f'host synchronisation inside the step: {name}')
        return call

    saved = {name: getattr(torch.Tensor, name) for name in TENSOR_READS}
    functions = {name: getattr(torch, name) for name in ('nonzero', 'tensor')}
    try:
        for name in TENSOR_READS:
            setattr(torch.Tensor, name, refuse(f'Tensor.{name}'))
        for name in functions:
            setattr(torch, name, refuse(f'torch.{name}'))
        yield
    finally:
        for name, value in saved.items():
            setattr(torch.Tensor, name, value)
        for name, value in functions.items():
            setattr(torch, name, value)


class DeferredReads:
    """``DeferredCounts`` readable under the guard, each value only in a step after the one that put it.

    On a GPU such a value was copied back while the step that put it ran, so reading it later costs no wait; the
    test loop sets ``step``; ``steps`` lists the steps that read one.
    """

    def __init__(self, monkeypatch) -> None:
        self.step = 0
        self.steps: list[int] = []
        put, get = DeferredCounts.put, DeferredCounts.get
        put_at: dict = {}

        def remembered_put(counts, key, values):
            put_at[id(counts), key] = self.step
            return put(counts, key, values)

        def read_later(counts, key):
            saved = torch.Tensor.tolist
            torch.Tensor.tolist = _TOLIST
            try:
                value = get(counts, key)
            finally:
                torch.Tensor.tolist = saved
            if value is not None:
                assert put_at[id(counts), key] < self.step, f'step {self.step} read the {key!r} it put itself'
                self.steps.append(self.step)
            return value
        monkeypatch.setattr(DeferredCounts, 'put', remembered_put)
        monkeypatch.setattr(DeferredCounts, 'get', read_later)


def fixed_plan(layout, device='cpu') -> FixedKeepSchedule:
    """Drops before layer 0 and after layer 1, and probes every kind of query row."""
    visual = layout.visual_indices().to(device)
    rows = ('text', 'action', 'text_action', 'prefill', 'last', 'all')
    return FixedKeepSchedule(keep_before=visual[::2], keep_after={1: visual[::4]},
                             attention=[AttentionRequest(layer % 4, r, name=r) for layer, r in enumerate(rows)])


@pytest.mark.parametrize('causal', [False, True])
def test_pruned_step_reads_nothing_back_from_the_device(causal):
    layout = make_layout(causal=causal)
    x = make_embeddings(layout)
    checked_on_host = make_runner()
    checked_on_device = PrunableDecoderRunner(checked_on_host.decoder, validate_on_host=False)
    with torch.inference_mode():
        expected = checked_on_host(x, layout, fixed_plan(layout))
        checked_on_device(x, layout, fixed_plan(layout))          # warm: fused weights and tables built
        with host_sync_guard():
            result = checked_on_device(x, layout, fixed_plan(layout))
            unpruned = checked_on_device(x, layout, build_method('none', {'attention': [[0, 'text'], [-1, 'action']]}))
    assert torch.equal(result.kept, expected.kept)
    assert torch.equal(result.hidden, expected.hidden)
    assert [len(k) for k in result.record.kept_per_layer] == [len(k) for k in expected.record.kept_per_layer]
    for layer, summaries in expected.record.attention.items():
        for name, (keys, weights) in summaries.items():
            assert torch.equal(result.record.attention[layer][name][1], weights)
    assert len(unpruned.kept) == layout.num_tokens and set(unpruned.record.attention) == {0, 5}


@pytest.mark.parametrize('name', available_methods())
def test_methods_selecting_on_the_device_read_nothing_back(name, monkeypatch):
    # every step after the first (which builds the per-layout tables) runs under the guard and keeps what the
    # same method keeps in an unguarded, host-checked run; the last steps are past every method's warm-up
    reads = []

    def counted_host_counts(mask, num_cameras):
        reads.append(num_cameras)
        return _TOLIST(mask.reshape(num_cameras, -1).sum(dim=1))

    monkeypatch.setattr(specprune_module, 'host_counts', counted_host_counts)
    deferred = DeferredReads(monkeypatch)
    # the guard stands in for an accelerator: the diversity steps run as device operations there, not in NumPy
    monkeypatch.setattr(diversity_module, 'CPU_STEPS_IN_NUMPY', False)
    layout = make_layout()
    checked_on_host = make_runner()
    checked_on_device = PrunableDecoderRunner(checked_on_host.decoder, validate_on_host=False)
    guarded, reference = build_method(name), build_method(name)
    reused = []
    with torch.inference_mode():
        for step in range(6):
            deferred.step = step
            x = make_embeddings(layout, step)
            context = make_context(layout, step, x, make_frames(step), np.zeros((8, 7)),
                                   num_layers=checked_on_host.num_layers)
            expected = checked_on_host(x, layout, reference, context)
            reads.clear()
            with host_sync_guard() if step else contextlib.nullcontext():
                result = checked_on_device(x, layout, guarded, context)
            assert len(reads) <= COUNT_READS.get(name, 0), f'step {step}: {len(reads)} reads of the kept counts'
            assert [k.tolist() for k in result.record.kept_per_layer] == \
                [k.tolist() for k in expected.record.kept_per_layer], f'step {step}'
            served = [None if r.reused is None else r.reused.tolist() for r in (result.record, expected.record)]
            assert served[0] == served[1], f'step {step}: reused {served}'
            reused.append(served[0] or [])
    assert len(result.record.kept_per_layer[-1]) < layout.num_tokens or name == 'none'
    if name == 'vla_cache':             # it served tokens from the cache, knowing how many from earlier steps
        assert any(reused) and set(deferred.steps) == set(range(1, 6))


def test_specprune_with_previous_step_counts_reads_nothing_back_once_it_has_a_count(monkeypatch):
    # 'previous_step' gather counts: the union's sizes are counted on the device and read at the next step; from
    # the third step (a reference frame and a previous count) a step reads nothing back, and it keeps what the
    # same configuration keeps in an unguarded, host-checked run
    reads = []

    def counted_host_counts(mask, num_cameras):
        reads.append(num_cameras)
        return _TOLIST(mask.reshape(num_cameras, -1).sum(dim=1))

    monkeypatch.setattr(specprune_module, 'host_counts', counted_host_counts)
    deferred = DeferredReads(monkeypatch)
    config = {'gather_counts': 'previous_step'}
    layout = make_layout()
    checked_on_host = make_runner()
    checked_on_device = PrunableDecoderRunner(checked_on_host.decoder, validate_on_host=False)
    guarded, reference = build_method('specprune', config), build_method('specprune', config)
    sources = []
    with torch.inference_mode():
        for step in range(6):
            deferred.step = step
            x = make_embeddings(layout, step)
            context = make_context(layout, step, x, make_frames(step), np.zeros((8, 7)),
                                   num_layers=checked_on_host.num_layers)
            expected = checked_on_host(x, layout, reference, context)
            reads.clear()
            steady = step >= 2
            with host_sync_guard() if steady else contextlib.nullcontext():
                result = checked_on_device(x, layout, guarded, context)
            sources.append(result.record.info['gather_counts'])
            assert len(reads) == (2 if step == 1 else 0), f'step {step}: {len(reads)} reads'
            assert [k.tolist() for k in result.record.kept_per_layer] == \
                [k.tolist() for k in expected.record.kept_per_layer], f'step {step}'
    assert sources == ['exact (no reference frame)', 'exact (no previous count)'] + ['previous step'] * 4
    assert set(deferred.steps) == {2, 3, 4, 5}
    assert len(result.record.kept_per_layer[-1]) < layout.num_tokens


def greedy_case():
    """A causal layout through the test decoder with a small vocabulary: (runner, layout, embed, head)."""
    runner = PrunableDecoderRunner(make_runner().decoder, validate_on_host=False)
    torch.manual_seed(1)
    embed = torch.nn.Embedding(40, runner.hidden_size)
    head = torch.nn.Linear(runner.hidden_size, 40)
    return runner, make_layout(causal=True), embed, head


def decode_loop(runner, cache, first: int, steps: int, embed, head, layers):
    """Greedy decoding as one :meth:`decode` call per token with host ids (the reference)."""
    tokens, results = [first], []
    for i in range(steps):
        ids = torch.tensor([[tokens[-1]]], device=embed.weight.device)
        result = runner.decode(embed(ids), [cache.last_position + 1], cache, layers)
        tokens.append(int(head(result.hidden[:, -1]).argmax(-1)[0]))
        results.append(result)
    return tokens, results


def test_greedy_decoding_reads_nothing_back():
    runner, layout, embed, head = greedy_case()
    x = make_embeddings(layout)
    with torch.inference_mode():
        prefill = runner(x, layout, None, return_cache=True)
        first = head(prefill.hidden[:, -1]).argmax(-1)
        with host_sync_guard():
            ids, results = runner.decode_greedy(first, 5, prefill.cache, embed, head, attention_layers=[1])
        again = runner(x, layout, None, return_cache=True)
        tokens, expected = decode_loop(runner, again.cache, int(first), 5, embed, head, [1])
    assert ids.tolist() == tokens
    for got, want in zip(results, expected):
        assert got.key_counts == want.key_counts
        assert torch.equal(got.attention[1][0], want.attention[1][0])
        assert torch.equal(got.attention[1][1], want.attention[1][1])


def test_the_guard_catches_host_checks():
    # host validation reads values back (a message per fault): the guard must notice
    layout = make_layout()
    runner = make_runner()
    with torch.inference_mode(), host_sync_guard(), pytest.raises(AssertionError, match='host synchronisation'):
        runner(make_embeddings(layout), layout, fixed_plan(layout))


@pytest.mark.parametrize('keep, message', [(torch.tensor([0, 1, 90]), 'not kept visual'),
                                           (torch.tensor([-1, 5, 6]), 'not kept visual'),
                                           (torch.tensor([0, 1, 75]), 'not kept visual'),
                                           (torch.tensor([3, 3, 4]), 'repeats')])
def test_device_side_checks_refuse_bad_keep_sets(keep, message):
    layout = make_layout()
    runner = PrunableDecoderRunner(make_runner().decoder, validate_on_host=False)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=message):
        runner(make_embeddings(layout), layout, FixedKeepSchedule(keep_before=keep))


_cuda_or_skip = functools.partial(cuda_or_skip, 'the CPU guard tests above cover the executor instead')


# synchronisations a step may make on CUDA: the per-camera kept counts (COUNT_READS), and a deferred read (VLA-Cache's
# servable tokens) that waits because the steps here end without reading anything back, so the previous one may still
# run on the device (a real step's action read rules that out)
CUDA_SYNCS_ALLOWED = {**COUNT_READS, 'vla_cache': 1}


@pytest.mark.parametrize('name', ('fixed', *available_methods()))
def test_cuda_pruned_steps_do_not_synchronise(name):
    check_steps_do_not_synchronise(name, _cuda_or_skip())


@pytest.mark.parametrize('name', ('coverage_ranked', 'divprune', 'vla_pruner', 'specprune'))
def test_cuda_steps_with_graphed_selections_do_not_synchronise(name, monkeypatch):
    # the methods whose selection work replays as CUDA graphs: the first pass captures every graph (a capture waits
    # for the device), the counted one only replays them
    device = _cuda_or_skip()
    monkeypatch.setattr(selection_graphs, 'ENABLED', True)
    monkeypatch.setattr(diversity_module, '_STEP_GRAPHS', selection_graphs.SelectionGraphs())
    method = check_steps_do_not_synchronise(name, device)
    owner = diversity_module._STEP_GRAPHS if name == 'divprune' else method._graphs
    assert owner.keys() and all(owner.captures(key) == 1 for key in owner.keys())
    print(f'{name}: graphs {owner.keys()}')


def check_steps_do_not_synchronise(name: str, device: torch.device):
    """Steps of a method on ``device`` make no more synchronising calls than it is allowed; returns the method.

    A first pass over the steps runs unguarded (any error fails the test; it builds the tables and the fused
    weights, and captures any graph); after a reset the same steps run again, each under torch's sync debug mode on
    'warn', and every synchronising call is counted. One call per step, so every method is past its warm-up (a step
    index that does not advance would restart the episode).
    """
    layout = make_layout()
    runner = make_runner().to(device)
    method = fixed_plan(layout, device) if name == 'fixed' else build_method(name)

    def steps():
        for step in range(8):
            x = make_embeddings(layout, step).to(device)
            context = make_context(layout, step, x, make_frames(step), np.zeros((8, 7)), num_layers=runner.num_layers)
            context.visual_embeddings = x[0, layout.visual_indices().to(device)]
            yield step, x, context

    counts = []
    with torch.inference_mode():
        for _, x, context in steps():
            runner(x, layout, method, context)
        if hasattr(method, 'reset'):
            method.reset()
        torch.cuda.synchronize()
        for step, x, context in steps():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                torch.cuda.set_sync_debug_mode('warn')
                try:
                    runner(x, layout, method, context)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            syncs = [w for w in caught if 'called a synchronizing CUDA operation' in str(w.message)]
            counts.append(len(syncs))
            where = '; '.join(f'{w.filename}:{w.lineno}' for w in syncs)
            assert len(syncs) <= CUDA_SYNCS_ALLOWED.get(name, 0), f'step {step}: {len(syncs)} syncs at {where}'
    print(f'{name}: synchronising calls per step {counts}')
    return method


@pytest.mark.parametrize('config', [None, {'gather_counts': 'previous_step'}])
def test_cuda_specprune_with_previous_step_counts_does_not_synchronise(config):
    # the default ('auto') is 'previous_step' on CUDA. Each step runs twice (an unguarded warm-up, then counted),
    # so the method has a previous count from the second call on: the first counted call reads the exact counts
    # (2 synchronisations), the later ones none
    device = _cuda_or_skip()
    layout = make_layout()
    runner = make_runner().to(device)
    method = build_method('specprune', config)
    counts, sources = [], []
    with torch.inference_mode():
        for step in range(5):
            x = make_embeddings(layout, step).to(device)
            context = make_context(layout, step, x, make_frames(step), np.zeros((8, 7)), num_layers=runner.num_layers)
            context.visual_embeddings = x[0, layout.visual_indices().to(device)]
            runner(x, layout, method, context)
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                torch.cuda.set_sync_debug_mode('warn')
                try:
                    result = runner(x, layout, method, context)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            syncs = [w for w in caught if 'called a synchronizing CUDA operation' in str(w.message)]
            counts.append(len(syncs))
            sources.append(result.record.info['gather_counts'])
    print(f'specprune {config or "defaults"}: synchronising calls per step {counts} ({sources})')
    assert sources[1:] == ['previous step'] * 4
    assert counts[1:] == [0] * 4


def test_device_side_checks_refuse_a_pruned_token_coming_back():
    layout = make_layout()
    visual = layout.visual_indices()
    runner = PrunableDecoderRunner(make_runner().decoder, validate_on_host=False)
    plan = FixedKeepSchedule(keep_before=visual[::2], keep_after={1: visual[1:4]})   # visual[1] left at layer 0
    with torch.inference_mode(), pytest.raises(RuntimeError, match='not kept visual'):
        runner(make_embeddings(layout), layout, plan)
