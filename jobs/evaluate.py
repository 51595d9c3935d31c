"""Entry point of an evaluation Ray job: kNN and linear-probe top-1 of a checkpoint.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/evaluate.py s3://BUCKET/runs/cifar10/checkpoint-00002000 \
        --train s3://BUCKET/cifar10/train --test s3://BUCKET/cifar10/test --json

Same arguments as `ssl-dist evaluate` (it is that command). It runs on the head node next
to the data, without a Ray Train run or a DeepSpeed engine.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
