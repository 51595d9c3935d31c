"""The resolved config as a tracker's parameters: `section.key` -> value.

The config holds no credentials (storage.py, config.py refuse them), so what is logged is
what `config.yaml` in the run folder holds, nothing from the environment.
"""

from __future__ import annotations

from ssl_dist import config as config_lib

MAX_VALUE = 6000  # MLflow's longest parameter value


def flat_params(cfg) -> dict[str, str]:
    """{"data.batch_size": "256", ...}: every key of the resolved config, as MLflow stores it
    (strings; a value longer than MLflow allows is cut, marked with "...")."""
    params = {}
    for section, values in config_lib.to_dict(cfg).items():
        for key, value in values.items():
            text = str(value)
            params[f"{section}.{key}"] = text if len(text) <= MAX_VALUE else text[:MAX_VALUE - 3] + "..."
    return params


def nested_config(cfg) -> dict:
    """{"data": {"batch_size": 256, ...}, ...}: the resolved config with its types (W&B's config)."""
    return config_lib.to_dict(cfg)
