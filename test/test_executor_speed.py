"""Smoke run of benchmarks/executor_speed.py at a tiny shape: every runner it compares is timed and reported."""
import importlib.util
import re
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'executor_speed.py'


def test_executor_speed_reports_every_runner_against_the_plain_one(capsys):
    spec = importlib.util.spec_from_file_location('executor_speed', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
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
