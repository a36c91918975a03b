"""Smoke run of benchmarks/attention_kernels.py at a tiny shape: both kernels timed, and they agree."""
import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'attention_kernels.py'


def test_attention_kernels_report_at_a_tiny_shape(capsys):
    spec = importlib.util.spec_from_file_location('attention_kernels', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    report = module.main(['--heads', '2', '--head-dim', '8', '--tokens', '5', '17', '--rounds', '2', '--calls', '2',
                          '--threads', '1'])
    assert [row['tokens'] for row in report['rows']] == [5, 17]
    for row in report['rows']:
        assert row['sdpa_us'] > 0 and row['products_us'] > 0
        assert row['max_abs_difference'] < 1e-5          # the same attention, summed in another order
    assert '| 17 |' in capsys.readouterr().out
