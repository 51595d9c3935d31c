"""Members grouped into samples by webdataset's rules."""

from __future__ import annotations

import pytest

from ssl_dist import shards
from ssl_dist.shards import ShardError


def test_group_samples_follows_webdataset_rules():
    members = [("x/a.b.JPG", b"1"), ("x/a.b.cls", b"2"), ("noext", b""), ("__meta__", b""), ("x/c.jpg", b"3")]
    assert shards.group_samples(members) == [("x/a", {"b.jpg": b"1", "b.cls": b"2"}), ("x/c", {"jpg": b"3"})]
    with pytest.raises(ShardError, match="appears twice"):
        shards.group_samples([("k.jpg", b""), ("k.jpg", b"")])
