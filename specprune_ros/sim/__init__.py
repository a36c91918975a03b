"""ROS-free simulated tabletop tasks, a scripted expert and the demonstration dataset.

Quick use::

    from specprune_ros.sim import TabletopEnv, ScriptedExpert
    env = TabletopEnv(family='pick', seed=123, image_size=96)
    obs = env.reset()                      # SimObservation(images, proprio, instruction)
    expert = ScriptedExpert(env)
    obs, done, success = env.step(expert.act(obs))

Rendering uses EGL unless ``MUJOCO_GL`` is already set; import this package before ``mujoco``.
"""
import os

os.environ.setdefault('MUJOCO_GL', 'egl')

from specprune_ros.sim.env import (ACTION_DIM, CAMERA_NAMES, CONTROL_PERIOD_S, PROPRIO_DIM,  # noqa: E402
                                   PROPRIO_LAYOUT, ROTATION_SCALE_RAD, TRANSLATION_SCALE_M, WORKSPACE_HIGH,
                                   WORKSPACE_LOW, SimObservation, TabletopEnv, make_env)
from specprune_ros.sim.expert import ScriptedExpert, run_expert_episode  # noqa: E402
from specprune_ros.sim.tasks import (EVAL_SEED_START, MAX_STEPS, TASK_FAMILIES, TRAIN_SEED_START,  # noqa: E402
                                     SimState, TaskSpec, check_success, sample_task)
from specprune_ros.sim.vocab import VOCABULARY  # noqa: E402

__all__ = [
    'ACTION_DIM', 'CAMERA_NAMES', 'CONTROL_PERIOD_S', 'EVAL_SEED_START', 'MAX_STEPS', 'PROPRIO_DIM',
    'PROPRIO_LAYOUT', 'ROTATION_SCALE_RAD', 'ScriptedExpert', 'SimObservation', 'SimState', 'TASK_FAMILIES',
    'TRAIN_SEED_START', 'TRANSLATION_SCALE_M', 'TabletopEnv', 'TaskSpec', 'VOCABULARY', 'WORKSPACE_HIGH',
    'WORKSPACE_LOW', 'check_success', 'make_env', 'run_expert_episode', 'sample_task',
]
