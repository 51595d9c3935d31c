"""ssl_dist: contrastive self-supervised pretraining with Ray Train, DeepSpeed and WebDataset shards.

Importing this package starts nothing: no Ray, no process group, no I/O.
"""

__version__ = "0.1.0"
