"""Reports and logs as strict JSON: a value that was not measured or does not apply is ``null``, never ``NaN``.

Python's ``json`` writes a non-finite float as the bare word ``NaN`` / ``Infinity``, which is not JSON: ``jq``,
JavaScript, Go and most dashboards refuse the whole file. Every report of the package goes through
:func:`strict_json`, which turns non-finite floats into ``null`` and NumPy values into plain ones, and refuses (with
``allow_nan=False``) anything it missed instead of writing an invalid file. Readers of the reports treat ``null``
as "not available", like the ``NaN`` they see in memory.
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Optional

import numpy as np


def json_value(value: Any) -> Any:
    """``value`` with NumPy scalars and arrays as Python values and every non-finite float as None (recursively)."""
    if isinstance(value, dict):
        return {key: json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(item) for item in value]
    if isinstance(value, np.ndarray):
        return json_value(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def strict_json(document: Any, indent: Optional[int] = None, default: Optional[Callable[[Any], Any]] = None) -> str:
    """``document`` as standard JSON text (non-finite floats as ``null``); ``default`` as in :func:`json.dumps`."""
    return json.dumps(json_value(document), indent=indent, allow_nan=False,
                      default=None if default is None else lambda value: json_value(default(value)))


def is_missing(value: Any) -> bool:
    """True for a value that was not measured or does not apply: None (in a report read back) or NaN (in memory)."""
    return value is None or (isinstance(value, (float, np.floating)) and not math.isfinite(value))


def number_text(value: Any, spec: str = '.1f', scale: float = 1.0, missing: str = '-') -> str:
    """``value * scale`` formatted with ``spec``, or ``missing`` where the value is missing (:func:`is_missing`)."""
    return missing if is_missing(value) else format(value * scale, spec)
