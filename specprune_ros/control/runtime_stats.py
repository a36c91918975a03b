"""What the node reports on /diagnostics: latency percentiles over a window, counters and current reasons."""
from __future__ import annotations

from collections import Counter, deque
from typing import Optional

import numpy as np

OK, WARN, ERROR = 0, 1, 2


class RollingWindow:
    """The last ``size`` samples of one quantity."""

    def __init__(self, size: int) -> None:
        self.samples: deque[float] = deque(maxlen=max(1, size))

    def add(self, value: float) -> None:
        if np.isfinite(value):
            self.samples.append(float(value))

    def percentile(self, q: float) -> Optional[float]:
        return float(np.percentile(np.fromiter(self.samples, float), q)) if self.samples else None

    def mean(self) -> Optional[float]:
        return float(np.mean(np.fromiter(self.samples, float))) if self.samples else None

    def __len__(self) -> int:
        return len(self.samples)


def kept_token_ratio(record: object) -> Optional[float]:
    """Mean fraction of visual tokens that entered each decoder layer (None without a StepRecord)."""
    try:
        return float(record.mean_visual_kept / max(record.layout.num_visual, 1))
    except (AttributeError, TypeError, ZeroDivisionError):
        return None


def controller_mode(output_info: dict, record_info: dict) -> str:
    """The pruning controller's mode when the method reports one (SpecPrune: coarse / fine)."""
    for info in (record_info or {}, output_info or {}):
        for key in ('mode', 'controller_mode'):
            if info.get(key):
                return str(info[key])
    return 'n/a'


def _ms(value: Optional[float]) -> str:
    return 'n/a' if value is None else f'{value * 1e3:.2f}'


class RuntimeStats:
    """Counters and rolling windows; not thread-safe on its own (the controller holds the lock)."""

    def __init__(self, window: int = 100) -> None:
        self.model_latency = RollingWindow(window)       # Policy.predict wall time
        self.inference_latency = RollingWindow(window)   # observation taken -> chunk accepted
        self.stamp_to_chunk = RollingWindow(window)      # newest camera stamp -> chunk accepted
        self.kept_ratio = RollingWindow(window)
        self.input_errors: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.controller_mode = 'n/a'
        self.hold_reason = 'not active'
        self.waiting_for = ''                            # the hold is for an input that is missing or stale
        self.last_input_error = ''
        self.last_inference_error = ''
        self.last_reset_reason = ''

    def count_input_error(self, kind: str, message: str) -> None:
        self.input_errors[kind] += 1
        self.last_input_error = f'{kind}: {message}'

    def level(self) -> int:
        if self.last_inference_error and self.hold_reason:
            return ERROR
        return WARN if self.hold_reason else OK

    def key_values(self) -> list[tuple[str, str]]:
        """Ordered (key, value) strings for a diagnostic_msgs/DiagnosticStatus."""
        rows = [
            ('hold reason', self.hold_reason or 'none (commanding)'),
            ('model latency p50 ms', _ms(self.model_latency.percentile(50))),
            ('model latency p95 ms', _ms(self.model_latency.percentile(95))),
            ('inference latency p50 ms', _ms(self.inference_latency.percentile(50))),
            ('inference latency p95 ms', _ms(self.inference_latency.percentile(95))),
            ('camera stamp to chunk p50 ms', _ms(self.stamp_to_chunk.percentile(50))),
            ('camera stamp to chunk p95 ms', _ms(self.stamp_to_chunk.percentile(95))),
            ('kept visual token ratio', 'n/a' if not len(self.kept_ratio) else f'{self.kept_ratio.mean():.4f}'),
            ('controller mode', self.controller_mode),
            ('input errors', str(sum(self.input_errors.values()))),
            ('last input error', self.last_input_error or 'none'),
            ('last inference error', self.last_inference_error or 'none'),
            ('last temporal reset', self.last_reset_reason or 'none'),
        ]
        rows += [(f'input errors: {kind}', str(n)) for kind, n in sorted(self.input_errors.items())]
        rows += [(name.replace('_', ' '), str(n)) for name, n in sorted(self.events.items())]
        return rows
