"""The policy node's brain without ROS: inputs in, inference requests and per-tick commands out.

Three threads call it: subscription callbacks (``put_*``), the inference worker (``next_request`` /
``accept`` / ``inference_failed``) and the control timer (``tick``). Every public method takes the one lock;
model inference itself runs outside it, so callbacks and ticks never wait for the model.

Temporal token state: the controller decides when the policy must be reset (instruction change,
``request_reset``, a gap between observations longer than ``reset_after_gap_s``) and hands the reason to
the worker with the next request; chunks computed before a reset are discarded.

Bad input: a rejected message (undecodable frame, NaN pose, missing finger joints, a joint state lacking a state
joint or with a non-finite one, an unstamped state, a stamp too far in the future, a camera stamp stale on arrival
or going back, an unexpected frame id, an empty, huge or non-UTF-8 instruction) puts its source at fault;
the robot holds from the next tick, with that message as the hold reason, until the same source delivers a valid
message again.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from specprune_ros.codecs.proprio import ProprioAssembler, StateError, check_pose, joint_positions_by_name
from specprune_ros.control.chunk_scheduler import ChunkScheduler, ChunkSettings
from specprune_ros.control.input_sync import InputSynchronizer, RejectedInput, StaleInput, SyncLimits
from specprune_ros.control.joint_command import JointCommandFilter, command_order, merged_joint_limits
from specprune_ros.control.latency_budget import BudgetDecision, BudgetSettings, LatencyBudget, replan_slack_s
from specprune_ros.control.parameters import NodeParameters
from specprune_ros.control.runtime_stats import RuntimeStats, controller_mode, kept_token_ratio
from specprune_ros.control.safety_filter import ActionUnits, FilteredCommand, SafetyFilter, SafetyLimits
from specprune_ros.policy.interface import ActionSpec, Observation, PolicyOutput


class Rejection(str):
    """Why a message was rejected (its text), with the diagnostics counter it went to (``kind``)."""

    kind: str

    def __new__(cls, message: str, kind: str) -> 'Rejection':
        rejection = super().__new__(cls, message)
        rejection.kind = kind
        return rejection


@dataclass
class InferenceRequest:
    """One observation for the worker to run through the policy."""

    observation: Observation
    started: float              # node clock when the request was made (inference latency counts from here)
    observed: float             # when the observation was taken: its oldest camera stamp (the chunk's step 0)
    source_stamp: float         # newest camera header.stamp in it
    epoch: int                  # temporal-state epoch; a reset in between voids the result
    reset_reason: str = ''      # reset the policy's temporal state first, for this reason
    budget: Optional[BudgetDecision] = None   # the latency budget's method and knob for this step (None: off)


@dataclass
class AcceptedChunk:
    """A chunk that became the current plan, with what the node publishes about it."""

    actions: np.ndarray
    chunk_id: int
    source_stamp: float
    started: float                          # request time
    observed: float                         # the observation's oldest camera stamp: the chunk's step 0
    skipped_steps: int
    model_latency_s: float
    inference_latency_s: float
    kept_ratio: Optional[float]
    controller_mode: str
    steps_since_reset: int
    reset_reason: str = ''                  # the temporal state was reset right before this inference
    policy_info: dict = field(default_factory=dict)
    record: Any = None
    images: dict = field(default_factory=dict)
    budget: Optional[BudgetDecision] = None


def sync_limits(params: NodeParameters) -> SyncLimits:
    return SyncLimits(max_image_age_s=params.max_image_age_s, max_camera_skew_s=params.max_camera_skew_s,
                      max_future_stamp_s=params.max_future_stamp_s, max_state_age_s=params.max_state_age_s)


def chunk_settings(params: NodeParameters, spec: ActionSpec) -> ChunkSettings:
    return ChunkSettings(period_s=spec.control_period_s, mode=params.chunk_mode,
                         blend_old_weight=params.blend_old_weight, blend_decay=params.blend_decay,
                         max_chunk_age_s=params.max_chunk_age_s)


def action_units(params: NodeParameters, spec: ActionSpec) -> ActionUnits:
    return ActionUnits(translation_scale_m=spec.translation_scale_m, rotation_scale_rad=spec.rotation_scale_rad,
                       period_s=spec.control_period_s, action_scale=params.action_scale)


def budget_settings(params: NodeParameters) -> BudgetSettings:
    return BudgetSettings(budget_s=params.latency_budget_ms * 1e-3, percentile=params.latency_budget_percentile,
                          min_keep_ratio=params.min_keep_ratio, window=params.stats_window,
                          inference_deadline_s=params.inference_deadline_s)


def joint_command_filter(params: NodeParameters, spec: ActionSpec) -> JointCommandFilter:
    """The joint command filter of a joint-space policy (raises ``JointOrderError`` when the joints do not fit)."""
    joints = command_order(spec.action_names, params.command_joint_names())
    limits = merged_joint_limits(params.robot_description, params.joint_limits, joints)
    return JointCommandFilter(spec.action_names, joints, limits, period_s=1.0 / params.control_rate_hz)


def safety_limits(params: NodeParameters) -> SafetyLimits:
    return SafetyLimits(max_linear_speed=params.max_linear_speed, max_angular_speed=params.max_angular_speed,
                        max_linear_accel=params.max_linear_accel, max_angular_accel=params.max_angular_accel,
                        gripper_binarize=params.gripper_binarize, gripper_open_value=params.gripper_open_value,
                        gripper_closed_value=params.gripper_closed_value)


class PolicyController:
    """Thread-safe state of one configured policy node (see the module docstring)."""

    def __init__(self, params: NodeParameters, camera_names: tuple[str, ...], spec: ActionSpec,
                 needs_proprio: bool, clock: Callable[[], float] = time.monotonic,
                 budget: Optional[LatencyBudget] = None, state_joints: Sequence[str] = ()) -> None:
        self.spec = spec
        self.params = params
        self.lock = threading.RLock()
        self.sync = InputSynchronizer(camera_names, sync_limits(params), needs_proprio, clock)
        self._proprio = ProprioAssembler(params.pose_layout)
        self._state_stamps: dict[str, tuple[float, float]] = {}   # source -> (stamp, node clock) stored
        self.faults: dict[str, str] = {}         # source -> why its latest message was rejected
        self.scheduler = ChunkScheduler(chunk_settings(params, spec))
        self.joint_space = spec.action_space == 'joint'
        self.safety = joint_command_filter(params, spec) if self.joint_space else SafetyFilter(
            action_units(params, spec), safety_limits(params))
        self.state_joints = tuple(state_joints)  # the JointState joints of the state vector (joint_state proprio)
        self.stats = RuntimeStats(params.stats_window)
        self.budget = budget                     # the latency budget (its settings follow the parameters)
        if budget is not None:
            budget.settings = budget_settings(params)
        self.enabled = params.enabled
        self.active = False
        self.epoch = 0
        self.steps_since_reset = 0
        self._pending_reset = 'first observation'
        self._failure = ''                       # why the robot holds until the next good chunk
        self._in_flight = False
        self._last_request_time: Optional[float] = None
        self._last_source_stamp: Optional[float] = None
        self._executed: list[np.ndarray] = []    # commands executed since the last request (normalised)
        self._last_executed_key: Optional[tuple[int, int]] = None
        self._last_executed_time = -np.inf
        self._last_executed_window: Optional[float] = None   # start of the last chunk row's step window
        self._hold: Optional[tuple[float, np.ndarray, int]] = None   # the running hold: start, action, rows so far
        self._last_tick: Optional[float] = None

    # --- settings -----------------------------------------------------------------------------------------
    def update_parameters(self, params: NodeParameters) -> None:
        """Apply run-time changeable parameters (the configure-time ones are ignored)."""
        with self.lock:
            self.params = params
            self.sync.limits = sync_limits(params)
            self.scheduler.settings = chunk_settings(params, self.spec)
            if not self.joint_space:
                self.safety.units = action_units(params, self.spec)
                self.safety.limits = safety_limits(params)
            if self.budget is not None:
                was_on = self.budget.enabled
                self.budget.settings = budget_settings(params)
                if was_on and not self.budget.enabled:
                    self.budget.reset_knobs()

    def set_active(self, active: bool) -> None:
        """Start or stop commanding.

        Either way every stored input but the instruction is forgotten, the temporal token state is reset before
        the next inference and a chunk still being computed is void: the first motion after a restart comes from
        what the robot sees then.
        """
        with self.lock:
            self.active = active
            self._reset_locked(self._pending_reset or ('activated' if active else 'deactivated'))
            self._clear_inputs_locked()
            self.stats.hold_reason = 'not active' if not active else 'waiting for the first action chunk'

    def set_enabled(self, enabled: bool) -> None:
        """Enable or disable commanding; a change voids the plan and any chunk being computed (as ``set_active``)."""
        with self.lock:
            if enabled != self.enabled:
                self._reset_locked(self._pending_reset or ('enabled' if enabled else 'disabled'))
            self.enabled = enabled

    # --- inputs (subscription callbacks) ------------------------------------------------------------------
    def reject(self, source: str, kind: str, message: str) -> 'Rejection':
        """Count a rejected message of ``source`` and hold from the next tick until that source recovers."""
        with self.lock:
            self.stats.count_input_error(kind, message)
            self.faults.pop(source, None)
            self.faults[source] = message        # the newest fault is the hold reason
            return Rejection(message, kind)

    def _recovered(self, source: str) -> None:
        self.faults.pop(source, None)

    def _frame_id_error(self, what: str, frame_id: Optional[str], expected: str) -> str:
        if frame_id is None or not expected or frame_id == expected:
            return ''
        return f'{what} header.frame_id is {frame_id!r}, expected {expected!r}'

    def put_frame(self, camera: str, image: np.ndarray, stamp: float, now: float,
                  frame_id: Optional[str] = None) -> str:
        """Store a decoded frame; '' when stored, else the (already counted) reason it was rejected."""
        with self.lock:
            expected = dict(zip(self.params.camera_names, self.params.camera_frames)).get(camera, '')
            error = self._frame_id_error(f'camera {camera!r} frame', frame_id, expected)
            if error:
                return self.reject(camera, 'frame_id_mismatch', error + ' (camera_frames)')
            try:
                self.sync.put_frame(camera, image, stamp, now)
            except RejectedInput as rejected:
                return self.reject(camera, rejected.kind, str(rejected))
            self._recovered(camera)
            return ''

    def put_pose(self, position: Sequence[float], quaternion_xyzw: Sequence[float], stamp: float, now: float,
                 frame_id: Optional[str] = None) -> str:
        """Store the end-effector pose; '' when stored (or ignored as slightly older), else the counted reason."""
        def check() -> None:
            if stamp <= 0.0:
                raise StateError('header.stamp is zero: poses must be stamped')
            error = self._frame_id_error('ee_pose', frame_id, self.params.ee_pose_frame)
            if error:
                raise RejectedInput('frame_id_mismatch', error + ' (ee_pose_frame)')
            check_pose(position, quaternion_xyzw)
            self.sync.check_stamp('ee_pose', stamp, now, 'state_future_stamp')

        with self.lock:
            refused = self._state_refused('ee_pose', stamp, now, check)
            if refused is not None:
                return refused
            self._proprio.put_pose(position, quaternion_xyzw, stamp, self.sync.clock())
            self._recovered('ee_pose')
            return self._store_proprio_locked()

    def put_gripper(self, finger_gap: float, stamp: float, now: float) -> str:
        """Store the finger gap (metres); '' when stored (or ignored as slightly older), else the counted reason.

        A zero ``stamp`` is refused unless the node clock reads zero too: a gap without a header is stamped with the
        node clock, which is zero under ``use_sim_time`` until the first ``/clock`` message.
        """
        def check() -> None:
            if stamp <= 0.0 < now:
                raise StateError('header.stamp is zero: gripper joint states must be stamped')
            if not np.isfinite(finger_gap):
                raise StateError('finger gap is not finite')
            self.sync.check_stamp('gripper_state', stamp, now, 'state_future_stamp')

        with self.lock:
            refused = self._state_refused('gripper_state', stamp, now, check)
            if refused is not None:
                return refused
            self._proprio.put_gripper(finger_gap, stamp, self.sync.clock())
            self._recovered('gripper_state')
            return self._store_proprio_locked()

    def put_joint_state(self, names: Sequence[str], positions: Sequence[float], stamp: float, now: float) -> str:
        """Store the state joints' positions of a JointState (matched by name) as the proprio vector.

        '' when stored (or ignored as slightly older), else the counted reason it was rejected; the measured
        positions also start the joint commands' velocity limit.
        """
        state: list[np.ndarray] = []

        def check() -> None:
            if stamp <= 0.0:
                raise StateError('header.stamp is zero: joint states must be stamped')
            state.append(joint_positions_by_name(names, positions, self.state_joints))
            if self.joint_space:
                problem = self.safety.measured_problem(dict(zip(names, positions)))
                if problem:
                    raise StateError(problem)
            self.sync.check_stamp('joint_state', stamp, now, 'state_future_stamp')

        with self.lock:
            refused = self._state_refused('joint_state', stamp, now, check)
            if refused is not None:
                return refused
            if self.joint_space:
                self.safety.set_measured(dict(zip(names, positions)))
            self.sync.put_proprio(state[0], stamp)
            self._recovered('joint_state')
            return ''

    def _state_refused(self, source: str, stamp: float, now: float, check: Callable[[], None]) -> Optional[str]:
        """None when a robot-state message is to be stored (its stamp then remembered), else what ``put_*`` returns.

        That is the counted reason for a message ``check`` refuses, or stale on arrival or stamped back
        (``InputSynchronizer.in_order``), and '' for one only slightly older than the stored one (ignored).
        """
        params = self.params
        in_order: list[bool] = []

        def checks() -> None:
            check()
            in_order.append(self.sync.in_order(source, stamp, now, self._state_stamps.get(source),
                                               ('max_state_age_s', params.max_state_age_s),
                                               ('max_future_stamp_s', params.max_future_stamp_s), 'state'))
        rejected = self._state_rejection(source, checks)
        if rejected or not in_order[0]:
            return rejected
        self._state_stamps[source] = (stamp, now)
        return None

    def _state_rejection(self, source: str, check: Callable[[], None]) -> str:
        """Run ``check`` of a robot-state message; '' when it passes, else the reason, counted for ``source``."""
        try:
            check()
        except StateError as invalid:
            return self.reject(source, 'state_invalid', f'{source}: {invalid}')
        except RejectedInput as rejected:
            return self.reject(source, rejected.kind, str(rejected))
        return ''

    def _store_proprio_locked(self) -> str:
        try:
            latest = self._proprio.latest()
        except StateError as invalid:
            return self.reject('robot state', 'state_invalid', str(invalid))
        self._recovered('robot state')
        if latest is not None:
            self.sync.put_proprio(*latest, arrived=self._proprio.arrived())
        return ''

    def put_instruction(self, text: str) -> bool:
        """Store a validated instruction; a change resets the temporal state (returns True then).

        A rejected instruction (``reject('instruction', ...)``) holds the robot until this is called again.
        """
        with self.lock:
            self._recovered('instruction')
            changed = self.sync.put_instruction(text)
            if changed:
                self._reset_locked(f'instruction changed to {text[:80]!r}')
            return changed

    def put_proprio(self, vector: np.ndarray, stamp: float) -> None:
        """Store an already assembled proprio vector (arrival: now)."""
        with self.lock:
            self.sync.put_proprio(vector, stamp)

    def count_input_error(self, kind: str, message: str) -> None:
        with self.lock:
            self.stats.count_input_error(kind, message)

    def request_reset(self, reason: str) -> None:
        """Reset the temporal token state before the next inference and drop the current plan.

        Every stored input but the instruction is forgotten: the next observation is made of fresh messages only.
        """
        with self.lock:
            self._reset_locked(reason)
            self._clear_inputs_locked()

    def _clear_inputs_locked(self) -> None:
        self.sync.clear(keep_instruction=True)
        self._proprio = ProprioAssembler(self.params.pose_layout)
        self._state_stamps.clear()
        self.safety.restart()                    # the next command starts from what the robot reports then
        self.faults.clear()

    def _reset_locked(self, reason: str) -> None:
        self._pending_reset = reason
        self.epoch += 1
        self.scheduler.clear()                   # no plan: the robot holds until the first chunk after the reset
        self._in_flight = False
        self._failure = self.stats.last_inference_error = ''     # a failure of the old episode is not this one's

    # --- inference worker ---------------------------------------------------------------------------------
    def next_request(self, now: float) -> Optional[InferenceRequest]:
        """An observation to run now, or None (inactive, disabled, not due, no new frame, stale input)."""
        with self.lock:
            if not (self.active and self.enabled) or self._in_flight or self.faults \
                    or not self.sync.has_new_frames():
                return None
            replan_period = self.params.replan_every_steps * self.spec.control_period_s
            slack = replan_slack_s(self.spec.control_period_s)
            due = (self.scheduler.current is None or self._last_request_time is None
                   or now - self._last_request_time >= replan_period - slack)
            if not due:
                return None
            try:
                snapshot = self.sync.snapshot(now)
            except StaleInput:
                return None
            gap = None if self._last_source_stamp is None else snapshot.oldest_stamp - self._last_source_stamp
            if gap is not None and gap > self.params.reset_after_gap_s and not self._pending_reset:
                self._reset_locked(f'input gap of {gap:.2f} s (reset_after_gap_s {self.params.reset_after_gap_s})')
            reset_reason, self._pending_reset = self._pending_reset, ''
            if reset_reason:
                self.steps_since_reset = 0
                self._executed.clear()
                self._last_executed_window = None
                self._hold = None
                self.stats.events['temporal_resets'] += 1
                self.stats.last_reset_reason = reset_reason
            self._settle_hold(now)
            # the row of a step window still running stays: a new chunk may yet replace it (see _record_executed)
            running = self._last_executed_window is not None and \
                now < self._last_executed_window + self.spec.control_period_s - 1e-6
            handed, self._executed = (self._executed[:-1], self._executed[-1:]) if running and self._executed \
                else (self._executed, [])
            executed = np.stack(handed).astype(np.float32) if handed else None
            self._in_flight = True
            self._last_request_time = now
            self._last_source_stamp = snapshot.newest_stamp
            observation = Observation(images=snapshot.images, instruction=snapshot.instruction,
                                      proprio=snapshot.proprio, executed_actions=executed)
            budget = self.budget.decide(self.scheduler.time_left(now)) if self.budget is not None else None
            return InferenceRequest(observation, now, min(now, snapshot.oldest_stamp), snapshot.newest_stamp,
                                    self.epoch, reset_reason, budget)

    def accept(self, request: InferenceRequest, output: PolicyOutput, now: float) -> Optional[AcceptedChunk]:
        """Make the policy's chunk the current plan; None when it is void (reset since), late or malformed."""
        with self.lock:
            if request.epoch != self.epoch:
                self.stats.events['chunks_discarded_after_reset'] += 1
                return None
            if not (self.active and self.enabled):
                self._in_flight = False
                self.stats.events['chunks_discarded_inactive'] += 1
                return None
            self._in_flight = False
            self.stats.events['inferences'] += 1
            elapsed = now - request.started
            self.stats.model_latency.add(output.latency_s)
            self.stats.inference_latency.add(elapsed)
            self.stats.stamp_to_chunk.add(now - request.source_stamp)
            if request.budget is not None and self.budget is not None:   # late steps teach the budget most
                self.budget.observe(request.budget, float(output.latency_s), output.record,
                                    controller_mode(output.info, getattr(output.record, 'info', {})), elapsed)
            actions = np.asarray(output.actions, dtype=np.float64)
            expected = (self.spec.chunk_size, self.spec.action_dim)
            if elapsed > self.params.inference_deadline_s:
                self.stats.events['inference_deadline_misses'] += 1
                return self._fail_locked(f'inference missed its deadline: {elapsed:.3f} s > inference_deadline_s '
                                         f'{self.params.inference_deadline_s}')
            if actions.ndim != 2 or actions.shape[1] != expected[1] or len(actions) == 0:
                self.stats.events['inference_failures'] += 1
                return self._fail_locked(f'policy returned a chunk of shape {actions.shape}, expected {expected}')
            if not np.isfinite(actions).all():
                self.stats.events['non_finite_chunks'] += 1
                return self._fail_locked('policy returned a chunk with NaN or Inf')
            skipped = self.scheduler.accept(actions, request.observed, now)
            self._failure = ''
            self.stats.last_inference_error = ''
            self.steps_since_reset += 1
            record = output.record
            ratio = kept_token_ratio(record)
            if ratio is not None:
                self.stats.kept_ratio.add(ratio)
            mode = controller_mode(output.info, getattr(record, 'info', {}))
            self.stats.controller_mode = mode
            self.stats.events['steps_skipped_during_inference'] += skipped
            return AcceptedChunk(actions=actions, chunk_id=self.scheduler.current.chunk_id,
                                 source_stamp=request.source_stamp, started=request.started,
                                 observed=request.observed, skipped_steps=skipped,
                                 model_latency_s=float(output.latency_s), inference_latency_s=elapsed,
                                 kept_ratio=ratio, controller_mode=mode, steps_since_reset=self.steps_since_reset,
                                 reset_reason=request.reset_reason, policy_info=dict(output.info or {}),
                                 record=record, images=request.observation.images, budget=request.budget)

    def inference_failed(self, request: InferenceRequest, error: str) -> bool:
        """The policy raised: hold until a later inference succeeds; False for a step voided by a reset since.

        A voided step's failure belongs to the old episode: counted apart, not blamed on the new one.
        """
        with self.lock:
            if request.epoch != self.epoch:
                self.stats.events['failures_discarded_after_reset'] += 1
                return False
            self._in_flight = False
            self.stats.events['inference_failures'] += 1
            self._fail_locked(f'inference failed: {error}')
            return True

    def _fail_locked(self, reason: str) -> None:
        self._failure = reason
        self.stats.last_inference_error = reason
        self.scheduler.clear()
        return None

    # --- control timer ------------------------------------------------------------------------------------
    def tick(self, now: float) -> FilteredCommand:
        """The command for this control tick: the scheduled action through the safety filter, or a hold.

        End-effector policies: a bounded twist and gripper value (zero twist on hold). Joint-space policies: the
        joint command (``joints``; None on hold: nothing new is commanded).
        """
        with self.lock:
            self._follow_clock_locked(now)
            reason = ''
            scheduled = None
            if not self.active:
                reason = 'not active'
            elif not self.enabled:
                reason = 'disabled (~/enable or the enabled parameter)'
            else:
                reason = self._fault_reason() or self.sync.staleness(now)
                self.stats.waiting_for = reason
                if reason:
                    self.scheduler.clear()
                elif self._failure:
                    reason = self._failure
                else:
                    scheduled = self.scheduler.action_at(now)
                    reason = scheduled.reason
            if reason:
                command = self.safety.hold(reason, now)
                self.stats.events['hold_ticks'] += 1
                key, window = None, None
            else:
                command = self.safety.command(scheduled.action, now)
                key = (scheduled.chunk_id, scheduled.step)
                window = self.scheduler.current.start + scheduled.step * self.scheduler.settings.period_s
                self.stats.events['hold_ticks' if command.holding else 'command_ticks'] += 1
            self.stats.hold_reason = command.hold_reason
            self._record_executed(command, key, now, window)
            return command

    def _follow_clock_locked(self, now: float) -> None:
        """After the clock jumped back (a simulator reset under ``use_sim_time``) start over from fresh inputs.

        Stored frames and states would otherwise lie in the future of the new clock and every new message would
        be dropped as older than them. A step back within ``max_future_stamp_s`` (clock adjustment) is ignored.
        """
        last, self._last_tick = self._last_tick, now
        if last is None or now >= last - self.params.max_future_stamp_s:
            return
        self.stats.events['clock_jumps_back'] += 1
        self._reset_locked(f'the clock jumped back by {last - now:.3f} s')
        self._clear_inputs_locked()
        self._last_request_time = self._last_source_stamp = None
        self._last_executed_time, self._last_executed_window, self._hold = -np.inf, None, None

    def _fault_reason(self) -> str:
        if not self.faults:
            return ''
        return f'invalid input: {next(reversed(self.faults.values()))}'

    def _record_executed(self, command: FilteredCommand, key: Optional[tuple[int, int]], now: float,
                         window: Optional[float] = None) -> None:
        """One executed action per policy step: a new chunk step, or a hold once it has lasted a period.

        A hold counts once per full period it lasted (from the end of the last commanded step's window): a chunk's
        first command published at the tick of the hold (a step-synchronous simulator applies only that one)
        supersedes it. Likewise a new chunk's
        step for the step window (``window``: its start) an older chunk's step was commanded in replaces that row.
        """
        self._settle_hold(now)
        if key is None:
            if self._hold is None:      # from the end of the last commanded step's window, if within two periods
                window, period = self._last_executed_window, self.spec.control_period_s
                start = window + period if window is not None and now < window + 3 * period else now
                self._hold = (start, command.executed, 0)
            return
        self._hold = None
        if key == self._last_executed_key:
            return
        last_key, last_window = self._last_executed_key, self._last_executed_window
        if self._executed and last_key is not None and key[0] != last_key[0] and window is not None \
                and last_window is not None and abs(window - last_window) < 0.5 * self.spec.control_period_s:
            self._executed[-1] = command.executed
            self._last_executed_key = key
            return
        self._append_executed(command.executed, key, now, window)

    def _settle_hold(self, now: float) -> None:
        """Record one executed (hold) action for every full control period the running hold has lasted by ``now``.

        Counted by time, not by ticks: a tick that comes early or late neither loses nor adds a period.
        """
        if self._hold is None:
            return
        start, executed, counted = self._hold
        period = self.spec.control_period_s
        due = int(math.floor((now - start) / period + 1e-6))
        for index in range(counted, due):
            self._append_executed(executed, None, start + index * period)
        self._hold = (start, executed, max(counted, due))

    def _append_executed(self, executed: np.ndarray, key: Optional[tuple[int, int]], when: float,
                         window: Optional[float] = None) -> None:
        self._executed.append(executed)
        del self._executed[:-4 * self.spec.chunk_size]
        self._last_executed_key, self._last_executed_time, self._last_executed_window = key, when, window

    # --- diagnostics --------------------------------------------------------------------------------------
    def diagnostics(self) -> tuple[int, list[tuple[str, str]]]:
        """(level, key-values) of the current state (see ``RuntimeStats``)."""
        with self.lock:
            stats = self.stats
            rows = stats.key_values()
            rows += [(f'safety: {name.replace("_", " ")}', str(n)) for name, n in self.safety.counts.items()]
            if self.budget is not None:
                rows += self.budget.key_values()
            rows += [('frames received', str(self.sync.frames_received)),
                     ('frames dropped (superseded before use)', str(self.sync.frames_dropped)),
                     ('steps since temporal reset', str(self.steps_since_reset)),
                     ('enabled', str(self.enabled).lower()),
                     ('instruction', self.sync.instruction[:120] or 'none')]
            return stats.level(), rows
