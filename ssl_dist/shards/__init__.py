"""Write, index and check WebDataset shards and their manifest.

A dataset is a folder URL (local path, ``s3://``, ``gs://``) holding:

- ``shard-000000.tar``, ...: tar files in WebDataset layout. Each sample is a run of adjacent
  members ``KEY.EXT`` sharing one KEY (`samples`); shards made here hold ``KEY.cls`` (with
  classes), ``KEY.<image ext>`` and ``KEY.txt`` (with captions) (`make`, `source`), as GNU tar
  without PAX headers (`tar`).
- ``shard-000000.idx``, one sidecar per shard: little-endian uint64, one per sample, the byte
  offset in the tar of the header of the sample's FIRST member (`manifest`).
- ``index.json``, the manifest, written last::

    {"format": "ssl_dist.shards/1",
     "shards": [{"url": "shard-000000.tar", "num_samples": 5000, "size": 12697600,
                 "index": "shard-000000.idx",            # url and index inside the folder, each once
                 "sha256": "…", "index_sha256": "…"},    # of the tar's and the sidecar's bytes;
                ...],                                    #   absent in older manifests
     "num_samples": 50000,
     "fields": ["cls", "jpg"],                           # member extensions; absent in older ones
     "classes": ["airplane", ...],                       # absent when unknown (index_shards)
     "dropped": {"link_outside": {"count": 2, "examples": [...]}},  # what make left out, by reason
     "created": "2025-01-01T00:00:00Z"}

A manifest whose names leave the folder, that lists a file twice, or whose counts and sizes
are impossible is refused (`manifest.validate_manifest`).

Modules: `manifest` (the manifest and the one sidecar reader), `tar` (tar headers, read and
written), `samples` (members grouped into samples, sample byte ranges, the stream's batch
parser), `make` (``ssl-dist shards make``), `source` (what make packs: images, classes and
captions, checked before writing), `captions` (caption files and caption checks), `digest`
(sha256 of bytes as they are read), `index`
(``ssl-dist shards index``), `check` (``ssl-dist shards check``), `errors` (ShardError).

Callers: ``ssl_dist.cli`` (``ssl-dist shards make|index|check``) and the data stream
(``read_manifest``, ``read_offsets``, ``sample_ranges``, ``parse_samples``; ``parse_members`` and
``group_samples`` for one sample at a time). Importing this package reads nothing and starts
nothing.
"""

from ssl_dist.shards.check import check_shards
from ssl_dist.shards.errors import ShardError
from ssl_dist.shards.index import index_shards
from ssl_dist.shards.make import make_shards
from ssl_dist.shards.manifest import FORMAT, MANIFEST, read_manifest, read_offsets
from ssl_dist.shards.samples import group_samples, parse_samples, sample_ranges
from ssl_dist.shards.tar import parse_members

__all__ = ["FORMAT", "MANIFEST", "ShardError", "check_shards", "group_samples", "index_shards", "make_shards",
           "parse_members", "parse_samples", "read_manifest", "read_offsets", "sample_ranges"]
