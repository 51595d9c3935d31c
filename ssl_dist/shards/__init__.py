"""Write, index and check WebDataset shards and their manifest (being split out of make.py)."""

from ssl_dist.shards.make import (MANIFEST, ShardError, check_shards, group_samples, index_shards,  # noqa: F401
                                  make_shards, parse_members, parse_samples, read_manifest, read_offsets,
                                  sample_ranges)
