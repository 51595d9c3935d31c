"""The data stream: an exactly-once, resumable, elastic stream of batches from WebDataset shards.

For a given (manifest, seed, epoch, global batch size) every rank gets the same number of
batches of the same size, and over an epoch every sample is delivered once across all ranks
and loader workers; the position is a small dict that resumes on any number of ranks and
loader workers. One concern per file:

- `plan`: which sample positions each rank and loader worker serves, and what a resume
  still owes (pure math, no I/O);
- `reader`: ranged reads of the shards, the sidecar cache, digests on first read (data.verify);
- `retry`: the one retry policy (jittered backoff, a deadline per read; what is transient);
- `stream`: what runs in the loader workers (decode, augment, fill skipped slots, collate);
- `loader`: the training process's side (resume state, counts, skip limit, lookahead) and
  `make_loader`, the entry point.

What a good sample is lives in `ssl_dist.decode`; its names are re-exported here. Importing
this package starts nothing (no I/O, no Ray, no loader workers).
"""

from ssl_dist.data.loader import PROBLEMS_KEPT, Loader, make_loader
from ssl_dist.data.plan import Layout, Plan, consumed_positions, replan, runs_of, worker_slice
from ssl_dist.data.reader import (READ_THROUGH_GAP, SIDECAR_CACHE_BYTES, WHOLE_SIDECAR_BYTES, ShardSet,
                                  ShardUnreadable, Skip)
from ssl_dist.data.stream import FILL_SCAN_SAMPLES, FILL_SCAN_SHARDS, ShardStream, collate, sample_seed
from ssl_dist.decode import (IMAGE_EXTS, IMAGE_FORMATS, JPEG_EXTS, DataError, DecodeError, decode_image, decode_sample,
                             decode_samples, jpeg_decoder, sample_problems, to_pil)

__all__ = [
    # loader: the entry point
    "make_loader", "Loader", "PROBLEMS_KEPT",
    # plan
    "Layout", "Plan", "worker_slice", "consumed_positions", "replan", "runs_of",
    # reader
    "ShardSet", "Skip", "ShardUnreadable", "SIDECAR_CACHE_BYTES", "WHOLE_SIDECAR_BYTES", "READ_THROUGH_GAP",
    # stream
    "ShardStream", "collate", "sample_seed", "FILL_SCAN_SAMPLES", "FILL_SCAN_SHARDS",
    # decode (re-exported)
    "DataError", "DecodeError", "IMAGE_EXTS", "IMAGE_FORMATS", "JPEG_EXTS", "decode_image", "decode_sample",
    "decode_samples", "jpeg_decoder", "sample_problems", "to_pil",
]
