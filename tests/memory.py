"""Peak resident memory of this process, for tests that bound what a computation holds (Linux)."""

from __future__ import annotations

import ctypes
import gc
import os

HAS_PEAK_RSS = os.path.exists("/proc/self/clear_refs")


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_FROM_BYTES = 128 * 1024


def reset_peak_rss() -> int:
    """Free what can be freed, reset the peak (VmHWM) to now, and return the resident bytes.

    It also pins glibc's mmap threshold: by default glibc raises it to the size of each large
    block freed (up to 32 MiB), after which blocks of that size come from the heap, whose
    freed pages stay resident; the peak would then count buffers that were no longer alive
    at the same time. Pinned, every block of 128 KiB or more is mapped and unmapped."""
    gc.collect()
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_FROM_BYTES)
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM, the peak RSS
        f.write("5")
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident bytes since the last reset_peak_rss."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
