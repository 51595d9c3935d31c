"""Where a training step's time goes: wall time per phase, summed between reads.

On a CPU every op is synchronous, so the wall time between two marks is the time of the
ops in between. On a GPU kernels run ahead of the host; `sync=True` waits for the device
at every mark (a cost, so it is a profiling switch, `train.profile`).
"""

from __future__ import annotations

import time
from collections import defaultdict

PHASES = ("data", "augment", "forward", "loss", "backward", "optimizer", "checkpoint", "log")


class PhaseTimer:
    """`mark(phase)` charges the time since the previous mark to `phase`."""

    def __init__(self, *, sync: bool = False):
        self.sync = sync
        self.totals: dict[str, float] = defaultdict(float)
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        if self.sync:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[phase] += now - self._last
        self._last = now

    def take(self) -> dict[str, float]:
        """Seconds per phase since the previous take, as `time_<phase>` columns; resets."""
        out = {f"time_{p}": self.totals.get(p, 0.0) for p in PHASES}
        self.totals.clear()
        return out
