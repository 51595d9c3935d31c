"""launch.py without Ray running: what the driver decides before any worker starts."""

from __future__ import annotations

import pytest


def test_min_workers_makes_an_elastic_range_for_ray_train():
    import ray.train

    from ssl_dist import config, launch

    fixed = config.load(None, ["run.num_workers=3"])
    elastic = config.load(None, ["run.num_workers=3", "run.min_workers=1"])
    assert launch.worker_range(fixed) == 3 and launch.worker_range(elastic) == (1, 3)
    assert ray.train.ScalingConfig(num_workers=launch.worker_range(elastic)).elasticity_enabled
    with pytest.raises(config.ConfigError, match="run.min_workers=4"):
        config.load(None, ["run.num_workers=3", "run.min_workers=4"])
