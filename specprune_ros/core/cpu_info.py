"""What the machine reports about its processor (``/proc/cpuinfo``) and free memory, for choices and reports."""
from __future__ import annotations

import functools
from typing import Optional


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


def available_memory_bytes() -> Optional[int]:
    """Memory available to new allocations without swapping (psutil's ``available``); None where unknown."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except (ImportError, OSError, AttributeError):
        return None
