"""Smoke run of benchmarks/onednn_kernel_cache.py at a tiny shape: it builds and counts every kernel it reports."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'onednn_kernel_cache.py'


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason='this torch build has no oneDNN')
def test_kernel_cache_report_at_a_tiny_shape(capsys, monkeypatch):
    # the script raises oneDNN's cache size for its own process; here the variable stays in this test
    monkeypatch.setenv('ONEDNN_PRIMITIVE_CACHE_CAPACITY', '1024')
    spec = importlib.util.spec_from_file_location('onednn_kernel_cache', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    report = module.main(['--width', '32', '--mlp', '64', '--tokens', '12', '--samples', '3', '--threads', '1'])
    assert report['kernels'] == 4 * 12 and report['build_all_s'] > 0
    assert report['resident_mb_after'] >= report['resident_mb_before'] > 0
    assert min(report['first_call_us_median'], report['cached_call_us_median'], report['mkl_call_us_median']) > 0
    assert 'kernels of every count 1-12 (48)' in capsys.readouterr().out
