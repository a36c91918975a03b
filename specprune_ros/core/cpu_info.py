"""What the kernel reports about the processor (``/proc/cpuinfo``), for choices and reports that depend on it."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=8)
def cpu_info(field: str) -> str:
    """The first value of ``field`` in ``/proc/cpuinfo`` ('vendor_id', 'model name', ...; '' where unknown)."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as info:
            for line in info:
                key, _, value = line.partition(':')
                if key.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return ''
