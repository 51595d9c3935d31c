"""Entry point of a pretraining Ray job: what `ssl-dist submit` runs on the cluster, and what
`ray job submit` runs directly:

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/pretrain.py --config jobs/configs/cifar10.yaml run.num_workers=8 run.use_gpu=true

Same arguments as `ssl-dist pretrain` (it is that command: one config handling, one set of
error messages). It runs as the job's driver on the head node; Ray sets RAY_ADDRESS, so
the run goes to the cluster the job runs on.
"""

import sys
from pathlib import Path

# The job's working dir is the project folder; Ray puts it on PYTHONPATH, a plain
# `python jobs/pretrain.py` from a checkout needs it here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
