"""Errors a restart cannot fix: which they are, and how a run ends on one.

A worker error that comes from the config, the method, the data (more bad samples than
data.max_skip_fraction allows) or the checkpoint the run must resume from is raised again, the
same, on every restart: Ray Train's retries (run.max_failures) would only repeat it, each after
a whole start-up. Such an error is *fatal*. The rank that hits it tells the others at the next
decision point (`collective.together`, `collective.iterate_together`), so every rank raises it
instead of waiting in a collective; the driver's Ray Train callback (`launch.stop_on_fatal`)
then ends the run with that message and no restart.

Not fatal, because a restart can fix them, so Ray Train retries them: the store (StorageError:
unreachable past its deadline), a lost worker or node, a collective that timed out, and a
checkpoint found incomplete (the restart falls back to the one before it).

No Ray, no torch: Ray Train's controller imports this module to judge the workers' errors.
"""

from __future__ import annotations

import sys

from ssl_dist.decode import DataError


class TooMuchBadData(DataError):
    """One rank skipped more of an epoch's samples than data.max_skip_fraction allows
    (`data.Loader`): the same shards are as bad after a restart."""


# The fatal kinds, by the module that defines each (as cli.USER_ERRORS). Only modules already
# imported are looked at: an error cannot exist before its module is imported (Ray imports it to
# unpickle a worker's error), and importing them all would load torch and DeepSpeed here.
FATAL = {"ssl_dist.config": ("ConfigError",), "ssl_dist.methods": ("MethodError",),
         "ssl_dist.checkpoint.layout": ("CheckpointError",), "ssl_dist.failures": ("TooMuchBadData",)}
NOT_FATAL = {"ssl_dist.checkpoint.layout": ("IncompleteCheckpoint",)}  # kinds of a fatal kind a restart fixes


def _kinds(table: dict) -> tuple[type, ...]:
    return tuple(getattr(sys.modules[module], name) for module, names in table.items() if module in sys.modules
                 for name in names)


def is_fatal(err: BaseException) -> bool:
    """`err` itself (not what it wraps) is an error a restart cannot fix."""
    return isinstance(err, _kinds(FATAL)) and not isinstance(err, _kinds(NOT_FATAL))


def fatal_cause(err: BaseException | None) -> BaseException | None:
    """The fatal error that `err` is or wraps (looking through Ray's wrappers: a worker group's
    `worker_failures`, a controller's `controller_failure`, causes), or None."""
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if is_fatal(e):
            return e
        for attr in ("worker_failures", "controller_failure", "__cause__", "__context__", "cause"):
            value = getattr(e, attr, None)
            if isinstance(value, dict):
                stack.extend(value[k] for k in sorted(value, reverse=True))  # lowest rank first off the stack
            elif isinstance(value, BaseException):
                stack.append(value)
    return None


def raise_fatal(worker_errors: dict[int, BaseException]) -> None:
    """Raise the fatal error of the lowest rank that has one ({world rank: error}, as Ray Train's
    controller sees them); return if none is fatal."""
    for rank in sorted(worker_errors):
        fatal = fatal_cause(worker_errors[rank])
        if fatal is not None:
            raise fatal
