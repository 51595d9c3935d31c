"""Peak resident memory of this process, for tests that bound what a computation holds (Linux)."""

from __future__ import annotations

import ctypes
import gc
import os

HAS_PEAK_RSS = os.path.exists("/proc/self/clear_refs")


def reset_peak_rss() -> int:
    """Free what can be freed, reset the peak (VmHWM) to now, and return the resident bytes."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM, the peak RSS
        f.write("5")
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident bytes since the last reset_peak_rss."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
