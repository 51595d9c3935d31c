"""The shards package's one error: a problem with a shard source, shards or their manifest that a
user can fix (the message says how)."""

from __future__ import annotations


class ShardError(RuntimeError):
    """A user-facing problem with a shard source, shards or their manifest."""
