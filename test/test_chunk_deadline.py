"""The chunk deadline without ROS: when the robot runs out of actions, and the latency budget holding that deadline.

A robot executing action chunks misses a deadline when a control tick finds no action because the current chunk ran
out before the next one arrived. The simulated robot below runs the real ``ChunkScheduler`` and ``LatencyBudget`` on
a synthetic model whose step time follows its kept tokens, with noise, bursts and load steps.
"""
from types import SimpleNamespace

import numpy as np
import pytest

from specprune_ros.control.chunk_scheduler import ChunkScheduler, ChunkSettings, late_chunks
from specprune_ros.control.controller import PolicyController
from specprune_ros.control.latency_budget import NO_PRUNING, BudgetSettings, LatencyBudget
from specprune_ros.control.parameters import NodeParameters
from specprune_ros.policy.interface import ActionSpec
from specprune_ros.pruning.budget_knob import KeepRatioKnob

PERIOD_S = 0.1
CHUNK_STEPS = 8
SETTINGS = ChunkSettings(period_s=PERIOD_S, max_chunk_age_s=0.6)
FULL_FLOPS = 1e9


class FakeKeepRatio(KeepRatioKnob):
    """Stands for DivPrune: the plant turns its keep ratio into FLOPs."""

    name = 'divprune'

    def __init__(self):
        self.config = SimpleNamespace(keep_ratio=0.5)


def chunk(start):
    return np.zeros((CHUNK_STEPS, 7)), start


def test_time_left_is_the_earlier_of_the_last_step_and_the_age_limit():
    scheduler = ChunkScheduler(SETTINGS)
    assert scheduler.time_left(5.0) is None
    scheduler.accept(*chunk(10.0), now=10.05)
    assert scheduler.time_left(10.2) == pytest.approx(0.4)           # max_chunk_age_s 0.6 < 8 steps of 0.1 s
    assert scheduler.action_at(10.59).action is not None and scheduler.action_at(10.61).action is None
    scheduler.settings = ChunkSettings(period_s=PERIOD_S, max_chunk_age_s=5.0)
    assert scheduler.time_left(10.2) == pytest.approx(0.6)           # the last step ends at 10.8
    assert scheduler.action_at(10.79).action is not None and scheduler.action_at(10.81).action is None


def test_late_chunks_counts_the_time_the_robot_had_no_action():
    runs = [(0.0, 0.05, True), (0.5, 0.58, False),      # on time: the first chunk runs until 0.6
            (1.0, 1.15, False),                          # the chunk before ran out at 1.1: 0.05 s without action
            (1.5, 1.56, False),
            (9.0, 9.5, True)]                            # a new episode: no chunk before it to run out
    result = late_chunks(runs, CHUNK_STEPS, SETTINGS)
    assert (result.chunks, result.late) == (3, 1)
    assert result.late_s == pytest.approx(0.05)
    assert result.late_time_fraction == pytest.approx(0.05 / (1.56 - 0.05))
    assert np.isnan(late_chunks([], CHUNK_STEPS, SETTINGS).late_fraction)


class Plant:
    """Step time load * (fixed + rate * flops) with noise and short bursts; flops = (0.15 + 0.85 keep) of full."""

    def __init__(self, seed, fixed_s=0.008, full_decoder_s=0.046, noise=0.06, burst_every=40):
        self.rng = np.random.default_rng(seed)
        self.fixed_s, self.rate, self.noise, self.burst_every = fixed_s, full_decoder_s / FULL_FLOPS, noise, burst_every
        self.steps = 0

    def step(self, keep_ratio, load):
        self.steps += 1
        flops = FULL_FLOPS * (0.15 + 0.85 * (1.0 if keep_ratio is None else min(keep_ratio, 1.0)))
        factor = load * float(np.exp(self.rng.normal(0.0, self.noise)))
        if self.burst_every and self.rng.random() < 1.0 / self.burst_every:
            factor *= 1.3
        decoder = self.rate * flops * factor
        record = SimpleNamespace(flops=flops, flops_full=FULL_FLOPS, model_seconds=decoder, info={})
        return self.fixed_s * factor + decoder, record


def run_robot(loads, budget=None, replan_every_steps=5, seed=0, node_time_s=0.004):
    """One inference per load entry, started every ``replan_every_steps`` periods on a fresh frame.

    Returns (late_chunks result, per-inference methods, knobs). ``budget`` None: the unpruned model.
    """
    plant, scheduler = Plant(seed), ChunkScheduler(SETTINGS)
    rng = np.random.default_rng(seed + 100)
    now, chunks, methods, knobs = 0.0, [], [], []
    for index, load in enumerate(loads):
        decision = budget.decide(scheduler.time_left(now)) if budget is not None else None
        unpruned = decision is None or decision.method == NO_PRUNING
        latency, record = plant.step(None if unpruned else decision.knob, load)
        elapsed = latency + node_time_s * float(rng.uniform(0.5, 1.5))
        if budget is not None:
            budget.observe(decision, latency, record, 'n/a', elapsed)
        scheduler.accept(np.zeros((CHUNK_STEPS, 7)), now, now + elapsed)
        chunks.append((now, now + elapsed, index == 0))
        methods.append(NO_PRUNING if unpruned else decision.method)
        knobs.append(1.0 if unpruned else decision.knob)
        due = now + replan_every_steps * PERIOD_S
        now = max(due, PERIOD_S * np.ceil((now + elapsed) / PERIOD_S - 1e-9))   # the next frame after the chunk
    return late_chunks(chunks, CHUNK_STEPS, SETTINGS), methods, np.asarray(knobs)


def deadline_budget():
    """The unpruned model with DivPrune as the fallback; a budget as long as the chunk horizon never binds."""
    settings = BudgetSettings(budget_s=0.6, min_keep_ratio=0.1)
    return LatencyBudget(settings, {NO_PRUNING: None, 'divprune': FakeKeepRatio()}, NO_PRUNING)


LOADS = [1.0] * 150 + [1.8] * 150 + [1.0] * 100        # unpruned: ~54 ms, then ~97 ms against a 100 ms deadline


@pytest.mark.parametrize('seed', [0, 1])
def test_the_budget_holds_the_chunk_deadline_under_load_where_the_unpruned_model_misses(seed):
    unpruned, _, _ = run_robot(LOADS, seed=seed)
    assert unpruned.late_fraction > 0.15, f'the load must make the unpruned model late ({unpruned.late_fraction:.2f})'
    held, methods, knobs = run_robot(LOADS, deadline_budget(), seed=seed)
    assert held.late_fraction <= 0.02, f'{held.late} of {held.chunks} chunks late'
    assert methods[20:150].count(NO_PRUNING) > 100, 'without load the unpruned model fits the deadline'
    assert methods[170:300].count('divprune') > 120, 'under load the fallback takes over'
    assert 0.3 < np.median(knobs[170:300]) < 0.95, 'the fallback keeps as many tokens as the deadline allows'
    assert methods[330:].count(NO_PRUNING) > 60, 'the unpruned model comes back when the load goes'


def test_the_chunk_deadline_tightens_the_budget_only_when_it_is_the_shorter_limit():
    budget = deadline_budget()
    run_robot([1.0] * 40, budget)
    loose = budget.decide(time_left_s=0.4)
    assert loose.method == NO_PRUNING and loose.deadline_s == pytest.approx(0.4)
    tight = budget.decide(time_left_s=0.05)
    assert tight.method == 'divprune' and tight.knob < 0.9 and tight.deadline_s == pytest.approx(0.05)
    assert tight.predicted_s is not None, "the fallback's first step is predicted from the unpruned timing"
    assert dict(budget.key_values())['latency model'] != 'n/a'
    no_chunk = budget.decide(time_left_s=None)           # waiting for a first chunk: only the budget and
    assert no_chunk.deadline_s is None                   # inference_deadline_s (infinite here) bound it ...
    assert no_chunk.method == 'divprune', 'but the last known deadline keeps the method for that one step'
    rows = dict(budget.key_values())
    assert rows['chunk deadline ms'] == 'n/a'
    assert rows['chunk deadline misses in window'].endswith(' / 39')     # the first inference had no chunk before it


def test_a_frame_a_little_early_still_starts_the_next_inference_with_or_without_a_budget():
    """Inferences start on new frames: one a few ms before the replan time must not wait for the next frame.

    It would replan every 6 steps instead of 5 (frames arrive with jitter), and leave a chunk deadline no time.
    """
    spec = ActionSpec(chunk_size=CHUNK_STEPS)
    starts = {}
    for budget_ms in (0.0, 600.0):
        params = NodeParameters(method='none', camera_names=['front'], replan_every_steps=5,
                                latency_budget_ms=budget_ms)
        budget = LatencyBudget(BudgetSettings(budget_s=budget_ms * 1e-3), {NO_PRUNING: None}, NO_PRUNING)
        controller = PolicyController(params, ('front',), spec, needs_proprio=False, budget=budget)
        controller.set_active(True)
        controller.put_instruction('pick up the cube')
        started = []
        for frame in range(12):                 # frames every period, each arriving 3 ms earlier than the last
            now = 10.0 + frame * PERIOD_S - 0.003 * frame
            controller.put_frame('front', np.zeros((8, 8, 3), np.uint8), now, now)
            request = controller.next_request(now)
            if request is not None:
                started.append(frame)
                controller.accept(request, SimpleNamespace(actions=np.zeros((CHUNK_STEPS, spec.action_dim)),
                                                           latency_s=0.01, record=None, info={}), now + 0.01)
        starts[budget_ms] = started
    assert starts[600.0] == [0, 5, 10], 'with the budget on, every fifth frame starts an inference'
    assert starts[0.0] == [0, 5, 10], 'with the budget off too'


def test_the_knob_drops_at_once_but_rises_step_by_step():
    """A lull in the load is often followed by the load again: tokens come back over a few inferences."""
    budget = deadline_budget()
    _, methods, knobs = run_robot([1.8] * 60 + [0.6] * 3 + [1.8] * 3 + [0.6] * 30, budget)
    fallback = [k for m, k in zip(methods, knobs) if m == 'divprune']
    rises = np.diff(fallback)
    assert rises.max() <= 0.2 * (1.0 - 0.1) + 1e-9, f'the knob jumped up by {rises.max():.2f}'
    assert rises.min() < -0.2, 'a load step must cut the knob at once'
    assert methods[-1] == NO_PRUNING, 'after a lasting lull the unpruned model comes back'
