"""The run's curves as one PNG: loss, learning rate, throughput and kNN top-1 against step.

Drawn by the driver at the end of a run from the metrics CSVs in the run folder (every
attempt its own line, so a restart shows), and written next to them as `curves.png`. The
PNG carries the steps it plots in a text chunk (`ssl_dist`), so a reader can check what it
holds without looking at it.
"""

from __future__ import annotations

import io
import json

from ssl_dist import metrics, storage

PNG_NAME = "curves.png"
PANELS = [("loss", "loss"), ("lr", "learning rate"), ("samples_per_s", "samples/s"), ("knn_top1", "kNN top-1")]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    return [p[0] for p in points], [p[1] for p in points]


def render(history: list[list[dict]], *, title: str = "") -> tuple[bytes, dict]:
    """PNG bytes of the curves of `history` (as `metrics.read_history` returns it), and the
    summary embedded in it: {"steps": [...], "knn_steps": [...], "attempts": n}."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster's driver
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (key, label) in zip(axes.flat, PANELS):
        for number, rows in enumerate(history):
            steps, values = _series(rows, key)
            if steps:
                ax.plot(steps, values, marker="o" if key == "knn_top1" or len(steps) < 3 else None, markersize=3,
                        label=f"attempt {number + 1} (from step {steps[0]})")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        if not ax.lines:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in axes[1]:
        ax.set_xlabel("step")
    if len(history) > 1:
        axes[0, 0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    summary = {"steps": [int(r["step"]) for rows in history for r in rows if r.get("loss") not in (None, "")],
               "knn_steps": [int(r["step"]) for rows in history for r in rows if r.get("knn_top1") not in (None, "")],
               "attempts": len(history)}
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"ssl_dist": json.dumps(summary)})
    plt.close(fig)
    return buf.getvalue(), summary


def write_curves(run_url: str, storage_options: dict | None = None) -> str | None:
    """Draw the run's curves into `run_url/curves.png`; returns its URL (None: no metrics yet)."""
    history = metrics.read_history(run_url, storage_options)
    if not any(history):
        return None
    png, _ = render(history, title=run_url.rstrip("/").rsplit("/", 1)[-1])
    url = storage.join(run_url, PNG_NAME)
    fs, path = storage.filesystem(url, storage_options)
    with storage.translate_errors(url):
        fs.pipe_file(path, png)
    return url


def read_summary(png: bytes) -> dict:
    """The summary `render` embedded in a PNG."""
    from PIL import Image

    return json.loads(Image.open(io.BytesIO(png)).text["ssl_dist"])
