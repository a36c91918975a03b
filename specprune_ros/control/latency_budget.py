"""The latency budget: choose how much to prune so that a chosen percentile of the model step meets a deadline.

Three parts, all DDS-free:

* ``LatencyModel`` predicts a step's wall time from its decoder FLOPs (the executor's analytical FLOPs of the kept
  tokens per layer): ``latency = fixed + rate * flops``. ``fixed`` (vision encoder, action head, selection) and
  ``rate`` (seconds per decoder FLOP) are robust location estimates (medians) of the last few measured steps:
  ``fixed = latency - decoder seconds`` and ``rate = decoder seconds / flops`` of each step, so one step already
  identifies both, whatever the knob. Medians of the last five steps follow a change of load within three
  inferences, and a lone outlier moves no median. The percentile comes from the spread: the model's prediction
  times the ``percentile`` over the last ``history`` steps of each step against the median of its neighbours
  (so a change of load does not count as spread) or, where larger, of each step against the prediction made
  before it ran (load that comes in bursts of a few steps, which no median foresees), times a correction that
  tracks the percentile itself: every step above its predicted percentile raises it, every step below lowers
  it, in the proportion that balances at the percentile (a stochastic-approximation quantile tracker: it absorbs
  what the model gets wrong).
* ``KnobMap`` maps the method's budget knob to the decoder FLOPs it leads to (a line through recent
  (knob, FLOPs) pairs; FLOPs are exact counts, so plain least squares), per method and controller mode (SpecPrune
  keeps more tokens in fine mode at the same knob).
* ``LatencyBudget`` picks, before every inference, the largest knob whose predicted percentile latency meets the
  budget, between ``min_keep_ratio`` and keeping everything; it holds the knob inside a dead band against
  jitter. For the unpruned method a fallback method takes over when even the full model cannot meet the budget.

The chunk deadline: a robot misses a deadline when a control tick finds no action because the current chunk ran
out before the next one arrived (``ChunkScheduler.time_left``), or when the inference outlasts
``inference_deadline_s`` (its chunk is dropped). With the budget on, every step meets both limits: the latency
budget at its percentile and the chunk deadline at ``deadline_percentile`` (p98: a deadline is missed at most every
fiftieth inference). The deadline bounds the whole inference (request to chunk), so the node's own time around the
model step (its p98 over recent steps) and a guard for publishing the command come off it first.

Knobs: the keep ratio of VLA-Pruner, FastV, DivPrune and random; SpecPrune's scale of K (its action-aware
controller still picks coarse or fine K, the budget scales both), expressed so that the smallest knob keeps
``min_keep_ratio`` of a camera in coarse mode (SpecPrune: before its layer-level drops, which take up to 10 % per
drop layer) and the largest keeps every patch (SpecPrune: without layer-level drops).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Optional

import numpy as np

from specprune_ros.control.runtime_stats import RollingWindow
from specprune_ros.pruning.budget_knob import BudgetKnob
from specprune_ros.pruning.methods.specprune import SpecPrune
from specprune_ros.pruning.registry import build_method

NO_PRUNING = 'none'


@dataclass
class BudgetSettings:
    """The node parameters the budget reads (seconds, not ms)."""

    budget_s: float = 0.0                  # 0 = off
    percentile: float = 90.0
    min_keep_ratio: float = 0.1
    window: int = 100                      # steps in the deadline-miss window
    deadline_percentile: float = 98.0      # the percentile the chunk deadline is held at
    inference_deadline_s: float = float('inf')   # an inference that takes longer is dropped (a hard deadline)


@dataclass
class BudgetDecision:
    """What the budget chose for one inference and what it expected."""

    method: str                             # the method that runs this step (the fallback for 'none')
    knob: Optional[float]                   # None: the method's own setting (no model yet)
    predicted_s: Optional[float]            # predicted percentile latency at this knob
    budget_s: float
    unreachable: bool = False               # even the smallest knob is predicted to miss the budget or deadline
    mode: str = 'n/a'                       # controller mode the knob map of this step was read for
    deadline_s: Optional[float] = None      # the chunk deadline of this inference (request to chunk), if known
    missed_limit: str = ''                  # unreachable: the limit predicted to be missed ('latency budget' or
    # 'chunk deadline', the time the step may take once the node's own time is off it) ...
    missed_limit_s: Optional[float] = None          # ... that limit, seconds ...
    missed_percentile: Optional[float] = None       # ... the percentile it is held at ...
    missed_predicted_s: Optional[float] = None      # ... and the step's predicted latency at that percentile


class LatencyModel:
    """``latency = fixed + rate * flops``, from robust estimates over recent steps (see the module docstring)."""

    def __init__(self, estimate_steps: int = 5, history: int = 40, spread_half_width: int = 2,
                 default_margin: float = 1.15, tracking_gain: float = 0.03) -> None:
        self.estimate_steps = estimate_steps
        self.tracking_gain = tracking_gain
        self.corrections: dict[float, float] = {}      # percentile -> its quantile tracker's correction
        self._margins: dict[float, float] = {}         # percentile -> margin, until the next step or correction
        self.spread_half_width = spread_half_width
        self.default_margin = default_margin
        self.samples: deque[tuple[float, float, float]] = deque(maxlen=history)   # (latency, decoder s, flops)
        self.ahead: deque[float] = deque(maxlen=history)       # measured / median predicted before the step
        self._estimate: Optional[tuple[float, float]] = None    # (fixed, rate) of the current samples
        self._estimates: deque[tuple[float, float]] = deque(maxlen=4)   # (fixed, rate) after each of the last steps

    @property
    def ready(self) -> bool:
        return len(self.samples) > 0

    def fixed_and_rate(self) -> tuple[float, float]:
        if self._estimate is None:
            self._estimate = _fixed_and_rate(list(self.samples)[-self.estimate_steps:])
        return self._estimate

    def predict(self, flops: float) -> float:
        """Typical (median) latency of a step of ``flops`` decoder FLOPs."""
        fixed, rate = self.fixed_and_rate()
        return fixed + rate * flops

    def margin(self, percentile: float) -> float:
        """The ``percentile`` of each recent step against the median of its neighbours (kept until the next step).

        A level change moves the neighbours with it, so only the spread counts; drawn towards the prior
        (``prior_margin``) while few steps back it.
        """
        key = float(percentile)
        if key not in self._margins:
            self._margins[key] = self._margin(percentile)
        return self._margins[key]

    def _margin(self, percentile: float) -> float:
        if len(self.samples) < 3:
            return self.prior_margin(percentile)
        fixed, rate = self.fixed_and_rate()
        data = np.asarray(self.samples)
        level = data[:, 0] / np.maximum(fixed + rate * data[:, 2], 1e-12)     # the knob's effect divided out
        width = self.spread_half_width
        padded = np.pad(level, width, mode='edge')                # the end steps stand in beyond the ends
        local = np.median(np.lib.stride_tricks.sliding_window_view(padded, 2 * width + 1), axis=1)
        ratios = level / np.maximum(local, 1e-12)
        weight = len(ratios) / (len(ratios) + 5.0)
        measured = float(np.percentile(ratios, percentile))
        if len(self.ahead) >= 20:           # load that comes in bursts of a few steps: the prediction's own error
            measured = max(measured, float(np.percentile(np.fromiter(self.ahead, float), percentile)))
        spread = weight * measured + (1.0 - weight) * self.prior_margin(percentile)
        return float(np.clip(spread * self.correction(percentile), 0.8, 3.0))

    def prior_margin(self, percentile: float) -> float:
        """``default_margin`` at p90, scaled to ``percentile`` (p98: 1.25 from 1.15)."""
        z = NormalDist().inv_cdf(min(max(percentile, 50.0), 99.9) / 100.0) / NormalDist().inv_cdf(0.9)
        return float(self.default_margin ** z)

    def correction(self, percentile: float) -> float:
        return self.corrections.get(float(percentile), 1.0)

    def keep_percentiles(self, percentiles: tuple[float, ...]) -> None:
        """Forget the corrections of every other percentile (settings changed: they are no longer tracked)."""
        wanted = {float(p) for p in percentiles}
        self.corrections = {p: c for p, c in self.corrections.items() if p in wanted}
        self._margins.clear()

    def track_percentile(self, exceeded: bool, percentile: float) -> None:
        """One step measured against its predicted ``percentile`` latency: nudge that percentile's correction."""
        step = self.tracking_gain * (float(exceeded) - (1.0 - percentile / 100.0))
        self.corrections[float(percentile)] = float(np.clip(self.correction(percentile) * np.exp(step), 0.8, 2.0))
        self._margins.clear()

    def predict_percentile(self, flops: float, percentile: float) -> float:
        return self.predict(flops) * self.margin(percentile)

    def forget_level(self) -> None:
        """Drop the measured steps but keep what was learnt about the spread.

        The method did not run for a while: its level is stale, the load may have changed since.
        """
        self.samples.clear()
        self._estimate = None
        self._margins.clear()
        self._estimates.clear()

    def observe(self, latency_s: float, decoder_s: float, flops: float) -> None:
        """Add one measured step."""
        if not (np.isfinite(latency_s) and np.isfinite(decoder_s) and np.isfinite(flops)) or latency_s <= 0:
            return
        if len(self.samples) >= self.estimate_steps:    # a level from fewer steps errs more than one ever will
            self.ahead.append(latency_s / max(self.predict(flops), 1e-12))
        self.samples.append((float(latency_s), float(min(decoder_s, latency_s)), float(flops)))
        self._estimate = None
        self._margins.clear()
        self._estimates.append(self.fixed_and_rate())
        if len(self._estimates) == self._estimates.maxlen:
            (old_fixed, old_rate), (fixed, rate) = self._estimates[0], self._estimates[-1]
            change = (fixed + rate * flops) / max(old_fixed + old_rate * flops, 1e-12)
            if not 1 / 1.3 < change < 1.3:       # the medians moved: a lasting change of load, not spread
                for _ in range(min(3, len(self.ahead))):
                    self.ahead.pop()             # the steps that revealed it are no measure of the spread
                self._estimates.clear()


def _fixed_and_rate(samples: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Medians of (latency - decoder seconds) and (decoder seconds / FLOPs) over ``samples``."""
    data = np.asarray(samples)
    fixed = float(np.median(np.maximum(data[:, 0] - data[:, 1], 0.0)))
    rate = float(np.median(data[:, 1] / np.maximum(data[:, 2], 1.0)))
    return fixed, rate


class KnobMap:
    """Decoder FLOPs as a line in the knob, from the recent (knob, FLOPs) pairs of one method and mode."""

    def __init__(self, history: int = 20) -> None:
        self.samples: deque[tuple[float, float]] = deque(maxlen=history)

    def observe(self, knob: float, flops: float) -> None:
        self.samples.append((float(knob), float(flops)))

    def line(self) -> Optional[tuple[float, float]]:
        """(intercept, slope), or None without data; one distinct knob: a line through the origin."""
        if not self.samples:
            return None
        data = np.asarray(self.samples)
        knobs, flops = data[:, 0], data[:, 1]
        if np.ptp(knobs) > 1e-3:
            slope, intercept = np.polyfit(knobs, flops, 1)
            if slope > 0:
                return float(intercept), float(slope)
        knob = max(float(np.mean(knobs)), 1e-3)
        return 0.0, float(np.mean(flops)) / knob

    def knob_for(self, flops: float) -> Optional[float]:
        line = self.line()
        if line is None:
            return None
        intercept, slope = line
        return (flops - intercept) / slope

    def flops_at(self, knob: float) -> Optional[float]:
        line = self.line()
        return None if line is None else line[0] + line[1] * knob


def knob_range(method: Any, min_keep_ratio: float) -> Optional[tuple[float, float]]:
    """(smallest, largest) budget knob of ``method``; None when it has no knob (the unpruned method, VLA-Cache)."""
    if not isinstance(method, BudgetKnob):
        return None
    if isinstance(method, SpecPrune):
        coarse = method.config.controller.k_fraction('coarse')
        return min_keep_ratio / coarse, 1.0 / coarse
    return min_keep_ratio, 1.0


Limit = tuple[float, float]        # (seconds, percentile): the percentile of the model step must stay within


class LatencyBudget:
    """Chooses the method's knob before each inference and learns from the measured step after it.

    For the unpruned method it chooses whether the fallback runs. Not thread-safe on its own (the controller
    holds the lock).
    """

    def __init__(self, settings: BudgetSettings, methods: dict[str, Any], primary: str, device: str = 'cpu',
                 dead_band: float = 0.05, dead_band_abs: float = 0.03, recover_ratio: float = 0.9,
                 publish_guard_s: float = 0.005, max_rise: float = 0.2, border_misses: int = 3) -> None:
        self._settings = settings
        self.methods = methods                      # name -> pruning method object ('none' may map to None)
        self.primary = primary
        self.fallback = next((name for name in methods if name != primary), '')
        self.device = device
        self.dead_band = dead_band                  # relative knob change below which the knob stays ...
        self.dead_band_abs = dead_band_abs          # ... or absolute (3 % of the visual tokens)
        self.recover_ratio = recover_ratio          # back to unpruned when full is predicted below this x budget
        self.publish_guard_s = publish_guard_s      # the chunk must arrive this long before the old one runs out
        self.max_rise = max_rise                    # the knob rises by at most this share of its range per step
        self.border_misses = border_misses          # unpruned: predicted misses by < 10 % in a row before leaving
        self._border_misses = 0
        self.models: dict[str, LatencyModel] = {}
        self.maps: dict[tuple[str, str], KnobMap] = {}
        self.active = primary
        self.mode = 'n/a'
        self.flops_full: Optional[float] = None
        self.misses = RollingWindow(settings.window)
        self.deadline_misses = RollingWindow(settings.window)
        self.overheads: deque[float] = deque(maxlen=40)     # inference time minus model step, seconds
        self.unreachable_steps = 0
        self.last_decision: Optional[BudgetDecision] = None
        self.last_measured_s: Optional[float] = None
        self._knob: dict[str, float] = {}
        self._last_deadline: Optional[float] = None

    @property
    def settings(self) -> BudgetSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: BudgetSettings) -> None:
        """Take new run-time settings: the models track only the percentiles they now ask for."""
        self._settings = settings
        for model in self.models.values():
            model.keep_percentiles((settings.percentile, settings.deadline_percentile))

    @property
    def enabled(self) -> bool:
        return self.settings.budget_s > 0

    def model(self, method: str) -> LatencyModel:
        return self.models.setdefault(f'{method}@{self.device}', LatencyModel())

    def knob_map(self, method: str, mode: str) -> KnobMap:
        return self.maps.setdefault((method, mode), KnobMap())

    # --- before an inference ------------------------------------------------------------------------------
    def chunk_deadline(self, time_left_s: Optional[float]) -> Optional[float]:
        """The time the next inference may take: until the current chunk runs out, at most inference_deadline_s."""
        deadline = min(np.inf if time_left_s is None else float(time_left_s), self.settings.inference_deadline_s)
        return float(deadline) if np.isfinite(deadline) else None

    def overhead_s(self) -> float:
        """The node's time around the model step at the deadline percentile (recent steps), plus the guard."""
        if not self.overheads:
            return self.publish_guard_s
        return float(np.percentile(np.fromiter(self.overheads, float), self.settings.deadline_percentile)) \
            + self.publish_guard_s

    def _limits(self, deadline_s: Optional[float]) -> list[Limit]:
        limits = [(self.settings.budget_s, self.settings.percentile)]
        if deadline_s is not None:
            limits.append((max(deadline_s - self.overhead_s(), 1e-4), self.settings.deadline_percentile))
        return limits

    def decide(self, time_left_s: Optional[float] = None) -> Optional[BudgetDecision]:
        """The method and knob for the next inference (None when the budget is off).

        ``time_left_s``: how long until the current chunk runs out (None: no chunk, the robot already waits).
        """
        if not self.enabled:
            return None
        deadline = self.chunk_deadline(time_left_s)
        held = deadline
        if time_left_s is not None:
            self._last_deadline = deadline
        elif self._last_deadline is not None:
            # no chunk to run out (the first of an episode): the robot waits anyway, but the last known deadline
            # keeps the method from switching back and forth for one step
            held = min(self._last_deadline, np.inf if deadline is None else deadline)
        limits = self._limits(held)
        if self.active == NO_PRUNING:
            decision = self._decide_unpruned(limits)
            if decision is None:
                self._switch_to(self.fallback)
        if self.active != NO_PRUNING:
            decision = self._decide_knob(self.active, limits)
            model = self.model(self.active)
            if (self.primary == NO_PRUNING and decision.knob is not None and self.flops_full is not None
                    and model.ready and decision.knob >= self._range(self.active)[1] - 1e-9
                    and _fits(model, self.flops_full, limits, self.recover_ratio)):   # fits again, with room to spare
                predicted = _predicted(model, self.flops_full, limits)
                self._switch_to(NO_PRUNING)
                decision = BudgetDecision(NO_PRUNING, None, predicted, self.settings.budget_s, mode=self.mode)
        decision.deadline_s = deadline if time_left_s is not None else None   # no chunk before it: none to miss
        self.last_decision = decision
        return decision

    def _switch_to(self, method: str) -> None:
        """Run ``method`` from now on; its latency level is stale (the other method's fresh steps stand in)."""
        self.active = method
        self.model(method).forget_level()
        self._border_misses = 0

    def _decide_unpruned(self, limits: list[Limit]) -> Optional[BudgetDecision]:
        model, budget = self.model(NO_PRUNING), self.settings.budget_s
        if not model.ready or self.flops_full is None or not self.fallback:
            return BudgetDecision(NO_PRUNING, None, None, budget, mode=self.mode)
        # at the border (a predicted miss by less than 10 %) leave only after a few such steps in a row, and not
        # while few fresh steps back the level (just switched back, just started): one slowish step must not send
        # the robot to the fallback and back
        if _fits(model, self.flops_full, limits):
            self._border_misses = 0
        elif not _fits(model, self.flops_full, limits, 1.0 / self.recover_ratio):
            return None                                         # a clear miss: the fallback at once
        else:
            self._border_misses += 1
            settled = len(model.samples) >= model.estimate_steps
            if settled and self._border_misses >= self.border_misses:
                return None
        return BudgetDecision(NO_PRUNING, None, _predicted(model, self.flops_full, limits), budget, mode=self.mode)

    def _range(self, method: str) -> tuple[float, float]:
        return knob_range(self.methods[method], self.settings.min_keep_ratio) or (1.0, 1.0)

    def _decide_knob(self, method: str, limits: list[Limit]) -> BudgetDecision:
        low, high = self._range(method)
        budget = self.settings.budget_s
        model, knobs = self.model(method), self.knob_map(method, self.mode)
        if not knobs.samples:        # a mode not seen yet: another mode's map until this one has a step
            knobs = next((m for (name, _), m in self.maps.items() if name == method and m.samples), knobs)
        if not model.ready or not knobs.samples:
            if method != self.primary:                      # a fallback starts from the full model's line
                return self._first_fallback_step(method, limits, low, high)
            return BudgetDecision(method, None, None, budget, mode=self.mode)
        wanted = knobs.knob_for(_allowed_flops(model, limits))
        knob = float(np.clip(wanted if wanted is not None else high, low, high))
        previous = self._knob.get(method)
        at_bound = knob in (low, high)                     # a bound is always taken (full width, the floor)
        if previous is not None and not at_bound and \
                abs(knob - previous) <= max(self.dead_band * previous, self.dead_band_abs):
            knob = previous
        if previous is not None and knob > previous:      # down at once, up step by step: a lull in the load
            knob = min(knob, previous + self.max_rise * (high - low))   # is often followed by the load again
        flops = knobs.flops_at(knob)
        predicted = None if flops is None else _predicted(model, flops, limits)
        unreachable = knob <= low + 1e-12 and flops is not None and not _fits(model, flops, limits)
        self._knob[method] = knob
        decision = BudgetDecision(method, knob, predicted, budget, unreachable, mode=self.mode)
        return _name_missed_limit(decision, model, flops, limits) if unreachable else decision

    def _first_fallback_step(self, method: str, limits: list[Limit], low: float, high: float) -> BudgetDecision:
        """No data for the fallback yet: assume its FLOPs scale with the knob and reuse the unpruned timing."""
        unpruned = self.model(NO_PRUNING)
        predicted = None
        if not unpruned.ready or self.flops_full is None:
            knob = low
        else:
            knob = float(np.clip(_allowed_flops(unpruned, limits) / self.flops_full * high, low, high))
            predicted = _predicted(unpruned, self.flops_full * knob / high, limits)
        self._knob[method] = knob
        unreachable = predicted is not None and knob <= low + 1e-12 and \
            not _fits(unpruned, self.flops_full * knob / high, limits)
        decision = BudgetDecision(method, knob, predicted, self.settings.budget_s, unreachable, mode=self.mode)
        return _name_missed_limit(decision, unpruned, self.flops_full * knob / high, limits) if unreachable \
            else decision

    # --- after an inference -------------------------------------------------------------------------------
    def observe(self, decision: BudgetDecision, latency_s: float, record: Any, mode: str,
                inference_s: Optional[float] = None) -> None:
        """Learn from one measured step (``record``: the executor's StepRecord, or None).

        ``inference_s``: the whole inference (request to chunk), what the chunk deadline bounds.
        """
        self.last_measured_s = float(latency_s)
        self.misses.add(float(latency_s > decision.budget_s))
        if inference_s is not None and np.isfinite(inference_s):
            # an inference past inference_deadline_s was dropped; one that long is a stall or a step of the clock
            # (NTP, a bag seek), no measure of the node's own time: 40 inferences at min_keep_ratio otherwise
            if inference_s <= self.settings.inference_deadline_s:
                self.overheads.append(max(float(inference_s) - float(latency_s), 0.0))
            if decision.deadline_s is not None:
                self.deadline_misses.add(float(inference_s > decision.deadline_s))
        if decision.unreachable:
            self.unreachable_steps += 1
        self.mode = mode or 'n/a'
        flops = getattr(record, 'flops', None)
        if flops is None:
            return
        self.flops_full = float(getattr(record, 'flops_full', flops) or flops)
        decoder_s = float(getattr(record, 'model_seconds', 0.0) or 0.0)
        model = self.model(decision.method)
        if model.ready:                           # each held percentile against what the model said before the step
            for q in {self.settings.percentile, self.settings.deadline_percentile}:
                model.track_percentile(latency_s > model.predict_percentile(float(flops), q), q)
        model.observe(latency_s, decoder_s, float(flops))
        knob = decision.knob
        if knob is None and decision.method in self.methods:
            ranged = knob_range(self.methods[decision.method], self.settings.min_keep_ratio)
            knob = _configured_knob(self.methods[decision.method], ranged)
        if knob is not None:
            self.knob_map(decision.method, self.mode).observe(knob, float(flops))

    def reset_knobs(self) -> None:
        """Forget the chosen knobs (the budget was switched off): the methods run their own settings again."""
        self._knob.clear()
        self.active = self.primary

    # --- the policy (only ever from the thread that runs it) ---------------------------------------------------
    def apply(self, policy: Any, decision: Optional[BudgetDecision]) -> None:
        """Put the decided method and knob into ``policy``.

        None (budget off) restores the configured method with its own settings.
        """
        method = self.methods.get(decision.method if decision is not None else self.primary)
        if hasattr(policy, 'method') and method is not None and policy.method is not method:
            policy.method = method
        if decision is None:
            for other in self.methods.values():
                if isinstance(other, BudgetKnob) and other.budget_scale is not None:
                    other.set_budget(None)
        elif isinstance(method, BudgetKnob):
            method.set_budget(decision.knob)

    def reset_methods(self, policy: Any) -> None:
        """Reset the temporal state of the methods ``policy`` does not hold now (it resets its own)."""
        for method in self.methods.values():
            if method is not None and method is not getattr(policy, 'method', None):
                method.reset()

    # --- diagnostics --------------------------------------------------------------------------------------
    def key_values(self) -> list[tuple[str, str]]:
        settings = self.settings
        if not self.enabled:
            return [('latency budget ms', 'off')]
        decision = self.last_decision
        model = self.model(decision.method if decision else self.active)
        if not model.ready:               # a method just switched to: its first step leans on the unpruned timing
            model = self.model(NO_PRUNING)
        fixed_rate = 'n/a'
        if model.ready:
            fixed, rate = model.fixed_and_rate()
            full = 'n/a' if self.flops_full is None else f'{rate * self.flops_full * 1e3:.2f}'
            fixed_rate = f'fixed {fixed * 1e3:.2f} ms + decoder {full} ms at full width, ' \
                         f'p{settings.percentile:g} margin {model.margin(settings.percentile):.2f} ' \
                         f'(tracking correction {model.correction(settings.percentile):.2f}), ' \
                         f'p{settings.deadline_percentile:g} margin {model.margin(settings.deadline_percentile):.2f}'
        misses, late = self.misses.samples, self.deadline_misses.samples
        deadline = None if decision is None else decision.deadline_s
        return [
            ('latency budget ms', f'{settings.budget_s * 1e3:.1f}'),
            ('latency budget percentile', f'{settings.percentile:g}'),
            ('budget method', decision.method if decision else self.active),
            ('budget knob', 'n/a' if decision is None or decision.knob is None else f'{decision.knob:.4f}'),
            ('predicted latency ms', _ms(decision.predicted_s if decision else None)),
            ('measured latency ms', _ms(self.last_measured_s)),
            ('budget deadline misses in window', f'{int(sum(misses))} / {len(misses)}'),
            ('chunk deadline ms', _ms(deadline)),
            ('node time around the model ms (deadline percentile)', _ms(self.overhead_s() - self.publish_guard_s)),
            ('chunk deadline misses in window', f'{int(sum(late))} / {len(late)}'),
            ('budget unreachable steps', str(self.unreachable_steps)),
            ('latency model', fixed_rate),
        ]


def _fits(model: LatencyModel, flops: float, limits: list[Limit], ratio: float = 1.0) -> bool:
    """Whether every limit's percentile of a step of ``flops`` is predicted within ``ratio`` x the limit."""
    return all(model.predict_percentile(flops, q) <= ratio * seconds for seconds, q in limits)


def _name_missed_limit(decision: BudgetDecision, model: LatencyModel, flops: float,
                       limits: list[Limit]) -> BudgetDecision:
    """``decision`` with the first limit predicted to be missed at ``flops`` named (for the operator's warning)."""
    for index, (seconds, q) in enumerate(limits):
        predicted = model.predict_percentile(flops, q)
        if predicted > seconds:
            decision.missed_limit = 'latency budget' if index == 0 else 'chunk deadline'
            decision.missed_limit_s, decision.missed_percentile, decision.missed_predicted_s = seconds, q, predicted
            break
    return decision


def _predicted(model: LatencyModel, flops: float, limits: list[Limit]) -> float:
    """The predicted latency at the first limit's percentile (the latency budget's)."""
    return model.predict_percentile(flops, limits[0][1])


def _allowed_flops(model: LatencyModel, limits: list[Limit]) -> float:
    """The most decoder FLOPs whose predicted percentile meets every limit."""
    fixed, rate = model.fixed_and_rate()
    return min((seconds / model.margin(q) - fixed) / max(rate, 1e-18) for seconds, q in limits)


def _configured_knob(method: Any, ranged: Optional[tuple[float, float]]) -> Optional[float]:
    """The knob value the method's own configuration amounts to (for the first, unbudgeted step)."""
    if ranged is None:
        return None
    if isinstance(method, SpecPrune):
        return 1.0
    return float(getattr(method.config, 'keep_ratio', 1.0))


def _ms(seconds: Optional[float]) -> str:
    return 'n/a' if seconds is None else f'{seconds * 1e3:.2f}'


def unreachable_message(decision: BudgetDecision, min_keep_ratio: float, measured_s: float) -> str:
    """The operator's warning for an unreachable ``decision``: the limit missed, its prediction, what to change."""
    head = f'cannot be met even at min_keep_ratio {min_keep_ratio:g}'
    took = f'this step took {measured_s * 1e3:.1f} ms'
    q = decision.missed_percentile
    predicted = '' if decision.missed_predicted_s is None else \
        f'predicted p{q:g} {decision.missed_predicted_s * 1e3:.1f} ms, '
    if decision.missed_limit == 'chunk deadline':
        return (f'the chunk deadline (p{q:g}) {head}: the model step may take {decision.missed_limit_s * 1e3:.1f} '
                f'ms (the time left in the current chunk less the node\'s own time), {predicted}{took}; start '
                'inferences earlier (a smaller replan_every_steps) or allow more pruning (a lower min_keep_ratio)')
    return f'latency budget {decision.budget_s * 1e3:.1f} ms {head}: {predicted}{took}'


def replan_slack_s(period_s: float) -> float:
    """How much before ``replan_every_steps`` periods the next inference may start: half a period.

    Inferences start on new frames, and frames arrive with jitter: a frame that arrives a millisecond before the
    replan time would otherwise wait a whole period for the next one (a replan every 3 steps instead of 2, leaving
    a latency budget's chunk deadline no time).
    """
    return 0.5 * period_s


def budget_for_policy(settings: BudgetSettings, method: str, policy: Any, fallback: str, seed: int = 0,
                      device: str = 'cpu') -> LatencyBudget:
    """The budget of a loaded policy running ``method``; for 'none' the ``fallback`` method is built too."""
    methods = {method: getattr(policy, 'method', None)}
    if method == NO_PRUNING:
        methods[fallback] = build_method(fallback, seed=seed)
    return LatencyBudget(settings, methods, method, device=device)
