"""The executor on CUDA: layers replayed as CUDA graphs, and SDPA without cuDNN's per-length plans.

The CUDA tests are skipped where CUDA is absent (the reason is printed); on the CPU the same graph bookkeeping runs
with a stand-in graph whose replay recomputes the captured call into the captured output buffer (what a replay
does on the device), so the static buffers, the bucketing and the per-layer captures are checked here too.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from specprune_ros.core.executor import PrunableDecoderRunner
from specprune_ros.core.layer_graphs import LayerGraphs, _Captured
from specprune_ros.core.fixed_plan import FixedKeepSchedule
from specprune_ros.core.step_types import AttentionRequest
from test_executor import HIDDEN, N, reference_forward, two_stage_case, two_stage_drop


def _cuda_or_skip() -> torch.device:
    if not torch.cuda.is_available():
        reason = ('CUDA is not available on this machine; the graph bookkeeping runs on the CPU with a '
                  'recomputing stand-in below')
        print(reason)
        pytest.skip(reason)
    return torch.device('cuda')


class _RecomputingGraph:
    """A CUDA graph's replay on the CPU: the captured call, rerun on the static buffers into the captured output."""

    def __init__(self, call, out):
        self.call, self.out = call, out

    def replay(self):
        self.out.copy_(self.call())


def _capture_on_the_cpu(self, call, device):
    out = call()
    self.captures += 1
    return _Captured(_RecomputingGraph(call, out), out)


def check_graphed_layers(device: torch.device, causal: bool) -> None:
    decoder, layout, x, method = two_stage_case(causal)       # drops after layers 0 and 2, text probe at layer 1
    on_cpu = copy.deepcopy(decoder)
    decoder = decoder.to(device)
    runner = PrunableDecoderRunner(decoder, cuda_graph_layers=True, bucket=64)
    eager = PrunableDecoderRunner(decoder)
    first, second = two_stage_drop()
    with torch.no_grad():
        expected, expected_kept = reference_forward(on_cpu, x, layout, {1: first, 3: second})
        result = runner(x.to(device), layout, method)
        assert torch.equal(result.kept.cpu(), expected_kept)
        assert (result.hidden.cpu() - expected).abs().max().item() <= 1e-4
        # every kept set pads to 64 tokens: layers 0, 2 and 3 captured once; layer 1 (probed) runs eagerly, padded
        assert result.record.attention_kernels == ['cuda graph', 'padded', 'cuda graph', 'cuda graph']
        assert runner._graphs.captures == 3
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
        assert runner._graphs.captures == 3 + 1              # layer 1 met this bucket unprobed for the first time


@pytest.mark.parametrize('causal', [False, True])
def test_graphed_layers_match_the_reference_and_replay(causal):
    check_graphed_layers(_cuda_or_skip(), causal)


@pytest.mark.parametrize('causal', [False, True])
def test_graph_bookkeeping_with_a_recomputing_stand_in_on_the_cpu(causal, monkeypatch):
    monkeypatch.setattr(LayerGraphs, '_capture', _capture_on_the_cpu)
    monkeypatch.setattr(PrunableDecoderRunner, '_graphs_on', lambda self, device: self.cuda_graph_layers)
    check_graphed_layers(torch.device('cpu'), causal)


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
