"""Fixtures of the tracking tests: a real MLflow tracking server (mlflow_server.py), started
once per session when a test asks for it and stopped at the end."""

from __future__ import annotations

import pytest
from mlflow_server import start_mlflow_server, stop_mlflow_server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """Tracking URI (http://127.0.0.1:<port>) of an `mlflow server` with a SQLite backend and
    its artifacts in a local folder."""
    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield uri
    stop_mlflow_server(proc)
