"""Smoke run of benchmarks/attention_kernels.py at a tiny shape: both kernels timed, and they agree."""

from benchmark_scripts import load_benchmark_script


def test_attention_kernels_report_at_a_tiny_shape(capsys):
    module = load_benchmark_script('attention_kernels')
    report = module.main(['--heads', '2', '--head-dim', '8', '--tokens', '5', '17', '--rounds', '2', '--calls', '2',
                          '--threads', '1'])
    assert [row['tokens'] for row in report['rows']] == [5, 17]
    for row in report['rows']:
        assert row['sdpa_us'] > 0 and row['products_us'] > 0
        assert row['max_abs_difference'] < 1e-5          # the same attention, summed in another order
    assert '| 17 |' in capsys.readouterr().out
