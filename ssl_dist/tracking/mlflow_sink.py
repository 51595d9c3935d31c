"""One attempt's MLflow run, nested under the driver's parent run: rank 0's metric rows with
step = optimizer step.

Rows are queued by `log` and sent by a thread of the sink's own, one `log_batch` request per
`flush` (MetricsLog.flush: every train.log_every steps, and after an evaluation), so a slow
or unreachable server never stalls a step: at worst the thread gives up with one warning.
The run is created by that thread too, so even the first request costs the loop nothing.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from ssl_dist.environ import environment
from ssl_dist.tracking import warning

TAG_RUN_URL = "ssl_dist.run_url"  # finds a run's parent again when its folder is resumed
TAG_RUN_NAME = "ssl_dist.run_name"
TAG_DRIVER_ATTEMPT = "ssl_dist.driver_attempt"  # the driver's lease attempt, which its checkpoints carry
TAG_ATTEMPT = "ssl_dist.attempt"  # the attempt's metrics CSV, metrics/<name>.csv
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own: the UI shows the run under its parent

SEND = {"timeout": 10, "retries": 1}  # a worker's requests: the thread waits on them, the loop never
CLOSE_WAIT_S = 30.0  # how long an attempt's end waits for its last metrics to go
MAX_BATCH = 1000  # metrics in one log_batch request (MLflow's limit)


@contextmanager
def http_limits(*, timeout: float, retries: int):
    """MLflow's request timeout and retries for the calls inside (restored after).

    MLflow's REST client reads both from the environment at every request
    (MLFLOW_HTTP_REQUEST_TIMEOUT, MLFLOW_HTTP_REQUEST_MAX_RETRIES; `MlflowClient` takes
    neither), and its defaults, 120 s and 7 retries with backoff, wait minutes on a server
    that is gone. So they are set around ssl-dist's own calls only, in the one thread of the
    process that talks to MLflow (the driver's main thread, rank 0's sender). Its "View run
    ... at" lines on stdout at every run's end are off too: the driver says the run's link once.
    """
    wanted = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
              "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    with environment(wanted):
        yield


class MlflowSink:
    """Rank 0's MLflow run of one attempt (see the module's docstring). Made by
    `tracking.attempt_sinks` from what the driver put in the loop config."""

    def __init__(self, *, uri: str, experiment_id: str, parent_run_id: str, driver_attempt: str, attempt: str,
                 run_url: str):
        self.name = f"MLflow at {uri}"
        self.uri, self.run_url = uri, run_url
        self.run_id: str | None = None
        self._pending: list[tuple[str, float, int, int]] = []  # (key, value, ms, step) not yet sent
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._failed = False
        tags = {TAG_PARENT: parent_run_id, TAG_ATTEMPT: attempt, TAG_DRIVER_ATTEMPT: driver_attempt,
                TAG_RUN_URL: run_url}
        self._thread = threading.Thread(target=self._send, args=(experiment_id, attempt, tags),
                                        name="ssl-dist-mlflow", daemon=True)
        self._thread.start()

    def log(self, step: int, values: dict[str, float]) -> None:
        """Queue one row's numbers at `step` (sent at the next flush)."""
        if self._failed:
            return
        ms = int(time.time() * 1000)
        with self._lock:
            self._pending.extend((key, float(value), ms, step) for key, value in values.items())

    def flush(self) -> None:
        """Have the thread send what is queued (returns at once)."""
        self._wake.set()

    def close(self) -> None:
        """Send what is left, end the run FINISHED; waits at most CLOSE_WAIT_S."""
        self._closing = True
        self._wake.set()
        self._thread.join(CLOSE_WAIT_S)
        if self._thread.is_alive():
            self._failed = True
            warning(self.name, f"its last metrics were not sent within {CLOSE_WAIT_S:.0f} s", self.run_url)

    def _send(self, experiment_id: str, attempt: str, tags: dict) -> None:
        try:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.uri)
            with http_limits(**SEND):
                self.run_id = client.create_run(experiment_id, run_name=attempt, tags=tags).info.run_id
            while True:
                self._wake.wait()
                self._wake.clear()
                closing = self._closing  # read before taking the queue: what close() adds after is sent next round
                with self._lock:
                    batch, self._pending = self._pending, []
                metrics = [Metric(key, value, ms, step) for key, value, ms, step in batch]
                with http_limits(**SEND):
                    for start in range(0, len(metrics), MAX_BATCH):
                        client.log_batch(self.run_id, metrics=metrics[start:start + MAX_BATCH])
                    if closing:
                        client.set_terminated(self.run_id, "FINISHED")
                        return
        except Exception as err:  # noqa: BLE001 (a tracker never fails a run)
            self._failed = True
            warning(self.name, err, self.run_url)
