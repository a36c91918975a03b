"""Real-time mode over real DDS (ROS_DOMAIN_ID 71).

The simulator steps every 0.1 s of wall-clock time without waiting for the policy node, and reports motion and
staleness.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip('rclpy', reason='ROS 2 (rclpy) is not installed: scripts/setup_env.sh installs the wheels')

from specprune_ros.ros.sim_runner import SimRun, run_simulation  # noqa: E402

DOMAIN = 71


def test_realtime_mode_keeps_stepping_and_reports_motion(tmp_path):
    run = SimRun(arguments={'model': 'tiny-random', 'method': 'none', 'mode': 'realtime', 'families': 'pick',
                            'max_steps': '15'}, domain_id=DOMAIN, log_dir=tmp_path / 'logs', timeout_s=300)
    result = run_simulation(run)
    assert result['returncode'] == 0 and result['summary'] is not None, json.dumps(result['outputs'], indent=1)
    episode, = result['summary']['summary']['episodes']
    assert episode['steps'] == 15 and episode['inferences'] >= 1
    assert 0.0 <= episode['stale_fraction'] <= 1.0 and np.isfinite(episode['mean_abs_jerk'])
    # the wall clock paced it: 15 periods of 0.1 s
    assert episode['wall_time_s'] >= 1.4 and abs(episode['sim_time_s'] - 1.5) < 1e-9
