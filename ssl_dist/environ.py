"""Environment variables set for the length of a block and put back after it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def environment(values: dict[str, str | None]) -> Iterator[None]:
    """Inside: each `values` name set to its value, or unset where the value is None. On the
    way out (an error included) every name is back as it was, set or unset. Any process;
    os.environ is process-wide, so only a block that one thread runs at a time should use it."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            _put(name, value)
        yield
    finally:
        for name, value in saved.items():
            _put(name, value)


def _put(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
