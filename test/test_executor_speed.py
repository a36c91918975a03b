"""Smoke run of benchmarks/executor_speed.py at a tiny shape: every runner it compares is timed and reported."""
import re

import torch

from benchmark_scripts import load_benchmark_script


def test_executor_speed_reports_every_runner_against_the_plain_one(capsys):
    module = load_benchmark_script('executor_speed')
    threads = torch.get_num_threads()
    try:
        module.main(['--hidden', '128', '--layers', '2', '--head-dim', '64', '--mlp-ratio', '2', '--steps', '2',
                     '--threads', '2', '--budgets', '1', '0.125', '--two-products', '--mkl-packed', '--defaults'])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    sections = re.findall(r'^projections: (.+)$', out, flags=re.MULTILINE)
    assert sections == ['fused (plain BLAS product, SDPA)', 'mkl-packed', 'two-products', 'defaults']
    rows = re.findall(r'^\| (100\.0|12\.5)% \| (\d+) \| [\d.]+ \(', out, flags=re.MULTILINE)
    assert len(rows) == 8                                   # two budgets per runner
    assert {tokens for budget, tokens in rows if budget == '12.5'} == {'141'}    # 64 of 512 patches + 77 others


def test_executor_speed_times_the_shared_probe_against_a_separate_one(capsys):
    module = load_benchmark_script('executor_speed')
    threads = torch.get_num_threads()
    try:
        module.main(['--hidden', '128', '--layers', '3', '--head-dim', '64', '--mlp-ratio', '2', '--steps', '2',
                     '--threads', '2', '--budgets', '1', '0.25', '--probe-layer', '1'])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    sections = re.findall(r'^projections: (.+)$', out, flags=re.MULTILINE)
    assert sections == ['fused (plain BLAS product, SDPA)', 'defaults', 'separate probe']
    rows = re.findall(r'^\| (100\.0|25\.0)% \| (\d+) \| [\d.]+ \(', out, flags=re.MULTILINE)
    assert {tokens for budget, tokens in rows if budget == '25.0'} == {'205'}    # 128 of 512 patches after layer 1


def test_executor_speed_times_the_matrix_products_alone(capsys):
    module = load_benchmark_script('executor_speed')
    threads = torch.get_num_threads()
    try:
        module.main(['--hidden', '128', '--layers', '2', '--head-dim', '64', '--mlp-ratio', '2', '--steps', '2',
                     '--threads', '2', '--budgets', '1', '0.125', '--products-only'])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    table = out.split('matrix products alone')[1]
    rows = re.findall(r'^\| (100\.0|12\.5)% \| (\d+) \| [\d.]+ \([\d-]+\) \| ([\d.]+)x \| ([\d.]+)x \|', table,
                      flags=re.MULTILINE)
    assert [(budget, tokens) for budget, tokens, _, _ in rows] == [('100.0', '589'), ('12.5', '141')]
    assert rows[0][2] == '1.00' and rows[1][3] == '4.18'    # 589 / 141 tokens
