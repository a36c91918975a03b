"""Smoke run of benchmarks/onednn_kernel_cache.py at a tiny shape: it builds and counts every kernel it reports."""

import pytest
import torch

from benchmark_scripts import load_benchmark_script


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason='this torch build has no oneDNN')
def test_kernel_cache_report_at_a_tiny_shape(capsys, monkeypatch):
    # the script raises oneDNN's cache size for its own process; here the variable stays in this test
    monkeypatch.setenv('ONEDNN_PRIMITIVE_CACHE_CAPACITY', '1024')
    module = load_benchmark_script('onednn_kernel_cache')
    report = module.main(['--width', '32', '--mlp', '64', '--tokens', '12', '--samples', '3', '--threads', '1'])
    assert report['kernels'] == 4 * 12 and report['build_all_s'] > 0
    assert report['resident_mb_after'] >= report['resident_mb_before'] > 0
    assert min(report['first_call_us_median'], report['cached_call_us_median'], report['mkl_call_us_median']) > 0
    assert 'kernels of every count 1-12 (48)' in capsys.readouterr().out
