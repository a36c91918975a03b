"""The latency budget in the real node over DDS (ROS_DOMAIN_ID 85).

The reference VLA, unpruned ('none' with DivPrune as the fallback), under injected CPU load (a busy process beside the
node).

The budget is set at run time to 1/1.3 of the unbudgeted median first measured (a budget derived from the
measurement keeps the check meaningful on a shared machine whose speed varies; when the load drifts so that the
unpruned node meets it after all, it is derived again from the unpruned blocks), then switched on and off in
interleaved blocks so that both see the same load: the unpruned p90 exceeds the budget by at least 30 %, the
budgeted p90 stays within +10 % of it (the p90 of 36 inferences moves with the load: a miss is measured again once,
in fresh interleaved blocks), and switching the budget off restores the unpruned model. When the shared
2-core machine gets so loaded that even min_keep_ratio cannot meet the budget, the node must say so (diagnostics:
budget unreachable steps) and its median latency must still be at most 0.85 of the unpruned median under the same
load (the reference VLA is small enough that per-operation costs, which the load inflates, dominate at the floor).

Then the chunk deadline: a new inference every 5 steps with chunks held 0.6 s leaves each inference about 100 ms;
with the budget at the chunk horizon (600 ms) only that deadline binds, and the chunks must arrive in time.
"""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip('rclpy', reason='ROS 2 (rclpy) is not installed: scripts/setup_env.sh installs the wheels; '
                    'the budget logic itself is covered without ROS by test_latency_budget.py')

from rcl_interfaces.msg import Parameter as ParameterMsg  # noqa: E402
from rcl_interfaces.msg import ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402

from ros_harness import Probe, start_camera, start_node  # noqa: E402

from specprune_ros.control.chunk_scheduler import ChunkSettings, late_chunks  # noqa: E402

DOMAIN = 85
STARTUP_S = 120.0
BLOCKS, BLOCK, SETTLE = 3, 12, 8    # interleaved blocks of inferences with and without the budget
CALIBRATIONS = 3                    # budgets derived from the measured unpruned latency before the check gives up
MEASUREMENTS = 2                    # interleaved measurements of the budgeted p90 before the check fails
FLOOR_SHARE = 0.85                  # at the floor (min_keep_ratio), the budgeted median against the unpruned one
CAMERAS = ('--camera', 'agentview=camera/agentview/image_raw:raw', '--camera', 'wrist=camera/wrist/image_raw:raw',
           '--instruction', 'pick up the red cube')


def set_parameters(probe: Probe, **values) -> None:
    """Set node parameters at run time (ints as integers, everything else as doubles)."""
    parameters = []
    for name, number in values.items():
        value = ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=number) if isinstance(number, int) \
            else ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=float(number))
        parameters.append(ParameterMsg(name=name, value=value))
    results = probe.call(SetParameters, '/specprune_node/set_parameters',
                         SetParameters.Request(parameters=parameters)).results
    assert all(result.successful for result in results), [result.reason for result in results]


def set_budget(probe: Probe, milliseconds: float) -> None:
    set_parameters(probe, latency_budget_ms=float(milliseconds))


def collect(probe: Probe, count: int, accept=lambda record: True, skip: int = 0, timeout: float = 60.0) -> list:
    """The next ``count`` inference records that satisfy ``accept``, after ``skip`` of them."""
    start = time.monotonic()
    wanted = skip + count
    probe.wait_for(lambda: len([r for r in probe.since(probe.inferences, start) if accept(r)]) >= wanted, timeout)
    records = [r for r in probe.since(probe.inferences, start) if accept(r)]
    assert len(records) >= wanted, f'only {len(records)} of {wanted} inferences in {timeout} s'
    return records[skip:wanted]


def interleaved_blocks(probe: Probe, budget_ms: float) -> tuple[list, list]:
    """Inference records with the budget off and on, in alternating blocks so that both see the same load."""
    unpruned, budgeted = [], []
    for _ in range(BLOCKS):
        set_budget(probe, budget_ms)
        budgeted += collect(probe, BLOCK, accept=lambda r: 'budget_method' in r, skip=SETTLE)
        set_budget(probe, 0.0)
        unpruned += collect(probe, BLOCK, accept=lambda r: 'budget_method' not in r, skip=2)
    return unpruned, budgeted


def latencies(records: list) -> np.ndarray:
    return np.array([float(r['model_latency_ms']) for r in records])


@pytest.fixture(scope='module')
def loaded_node():
    busy = subprocess.Popen([sys.executable, '-c', 'while True: pass'])     # the injected CPU load
    node = start_node(DOMAIN, {'model': 'reference', 'method': 'none', 'method_config': '{}'},
                      {'replan_every_steps': 1, 'inference_deadline_s': 2.0, 'max_chunk_age_s': 3.0})
    camera = start_camera(DOMAIN, *CAMERAS, rate=20.0)
    probe = Probe(DOMAIN)
    try:
        values = probe.wait_diagnostics(lambda message, v: message == 'active: commanding', STARTUP_S)
        assert values.get('hold reason') == 'none (commanding)', f'node never commanded; log:\n{node.output()[-3000:]}'
        yield {'probe': probe, 'node': node}
    finally:
        probe.close()
        camera.interrupt()
        node.interrupt()
        busy.kill()
        busy.wait()


def test_budget_holds_p90_under_load_where_the_unpruned_node_misses_it(loaded_node):
    probe, node = loaded_node['probe'], loaded_node['node']
    first = collect(probe, 20, skip=3)
    assert all('budget_method' not in r for r in first), 'budget 0 must leave the inference record as it was'
    # the median of a short sample is steadier than its p90; the unpruned node's p90 lies well above this budget
    budget_ms = float(np.median(latencies(first))) / 1.3

    # The controller learns its latency model under this load once (its first knobs overshoot); then it must hold.
    # The load on a shared machine drifts: when the unpruned node measured in the interleaved blocks no longer misses
    # the budget (the first sample ran slower), the budget is derived again from those blocks and they are rerun.
    for attempt in range(CALIBRATIONS):
        set_budget(probe, budget_ms)
        collect(probe, 2 * SETTLE, accept=lambda r: 'budget_method' in r)
        unpruned, budgeted = interleaved_blocks(probe, budget_ms)
        p90_unpruned = float(np.percentile(latencies(unpruned), 90))
        if p90_unpruned >= 1.3 * budget_ms:
            break
        print(f'budget {budget_ms:.1f} ms no longer binds (unpruned p90 {p90_unpruned:.1f} ms); derived again')
        budget_ms = float(np.median(latencies(unpruned))) / 1.3
    p90_budgeted = float(np.percentile(latencies(budgeted), 90))
    methods = {r['budget_method'] for r in budgeted}
    knobs = [float(r['budget_knob']) for r in budgeted if r['budget_knob'] != 'n/a']
    report = (f'budget {budget_ms:.1f} ms: unpruned p90 {p90_unpruned:.1f} ms, budgeted p90 {p90_budgeted:.1f} ms, '
              f'methods {methods}, knobs {np.round(knobs, 3).tolist()}')
    print(report)
    assert methods == {'divprune'}, report
    assert knobs and all(0.1 - 1e-6 <= k <= 1.0 for k in knobs), report
    assert all(float(r['kept_ratio']) == 1.0 for r in unpruned), 'switching the budget off restores the model'
    assert p90_unpruned >= 1.3 * budget_ms, report

    for measurement in range(MEASUREMENTS):
        set_budget(probe, budget_ms)
        values = probe.wait_diagnostics(lambda m, v: v.get('budget method') == 'divprune', 10.0)
        # Held, or, when the shared machine got so loaded that even min_keep_ratio cannot meet the budget, at the
        # floor, saying so, and still far below the unpruned latency under the same load.
        # (medians there: at the floor under heavy load the p90s of both are the load's, not the model's)
        held = p90_budgeted <= 1.1 * budget_ms
        median_budgeted = float(np.median(latencies(budgeted)))
        median_unpruned = float(np.median(latencies(unpruned)))
        at_floor = (int(values.get('budget unreachable steps', '0')) > 0
                    and median_budgeted <= FLOOR_SHARE * median_unpruned)
        if held or at_floor or measurement == MEASUREMENTS - 1:
            break
        print(f'budgeted p90 {p90_budgeted:.1f} ms over budget {budget_ms:.1f} ms; measured again')
        unpruned, budgeted = interleaved_blocks(probe, budget_ms)
        p90_budgeted = float(np.percentile(latencies(budgeted), 90))
        report += f'; measured again: budgeted p90 {p90_budgeted:.1f} ms'
    assert held or at_floor, (report + f"; unreachable steps {values.get('budget unreachable steps')}; medians "
                              f'{median_budgeted:.1f} / {median_unpruned:.1f} ms')
    assert float(values['latency budget ms']) == pytest.approx(budget_ms, abs=0.1)
    for key in ('budget knob', 'predicted latency ms', 'measured latency ms', 'budget deadline misses in window',
                'latency model'):
        assert values.get(key, 'n/a') != 'n/a', f'{key} missing from /diagnostics: {values}'
    assert node.alive()


def test_the_node_holds_the_chunk_deadline_its_replan_timing_leaves(loaded_node):
    probe, node = loaded_node['probe'], loaded_node['node']
    set_parameters(probe, replan_every_steps=5, max_chunk_age_s=0.6, latency_budget_ms=600.0)
    try:
        records = collect(probe, 16, accept=lambda r: r.get('latency_budget_ms') == '600.000', skip=4, timeout=90.0)
        values = probe.wait_diagnostics(lambda m, v: v.get('chunk deadline ms', 'n/a') != 'n/a'
                                        and v.get('latency budget ms') == '600.0', 10.0)
    finally:
        set_parameters(probe, replan_every_steps=1, max_chunk_age_s=3.0, latency_budget_ms=0.0)
    deadline_ms = float(values['chunk deadline ms'])
    assert 40.0 <= deadline_ms <= 160.0, f'chunk deadline {deadline_ms} ms: 0.6 s of chunk less 0.5 s of replanning'
    assert float(values['node time around the model ms (deadline percentile)']) < deadline_ms
    chunks = [(float(r['observation_time']), float(r['accepted_time']), False) for r in records]
    late = late_chunks(chunks, 8, ChunkSettings(period_s=0.1, max_chunk_age_s=0.6))
    methods = [r['budget_method'] for r in records]
    report = (f'{late.late} of {late.chunks} chunks late ({late.late_s * 1e3:.0f} ms without action), deadline '
              f'{deadline_ms} ms, methods {methods}, model ms {[r["model_latency_ms"] for r in records]}')
    print(report)
    assert late.chunks == 15 and late.late <= 2, report        # p98: a late chunk is rare (loose: shared machine)
    assert node.alive()
