"""What checkpoints cost and how long a killed worker takes to come back, on this machine.

    python benchmarks/checkpoint.py [--steps 120] [--every 50] [--workers 2] [--batch 16]

Starts what the tests start (moto's S3 server on 127.0.0.1, a local Ray cluster with
`ray start --head`), makes shards of a CIFAR-10 slice in the bucket, then runs
`ssl-dist pretrain` (resnet18 at 32 px, DeepSpeed ZeRO-1 on CPU, checkpoints into S3):

1. no checkpoint but the final one                         -> throughput baseline
2. a checkpoint every --every steps, async upload (default) -> throughput, local write, stall
3. the same with synchronous upload                        -> upload time (the report blocks on it)
4. a worker killed by SIGKILL right after the first registered checkpoint -> recovery time
5. that checkpoint resumed on one worker (resharding)       -> the same split, with the conversion

Throughput is measured from the metrics CSV between the 5th logged step and the last one
(the final checkpoint comes after the last row, so only interval checkpoints are inside);
the ratio is against run 1 of the same invocation. Recovery is split with the attempt
record the workers write (`attempts/*.json`): kill -> worker loop entered (Ray restart),
-> engine built (DeepSpeed initialise), -> checkpoint restored (download, conversion,
load), -> first batch (data seek: first step minus the second step's duration) -> first step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from cifar import cifar_slice  # noqa: E402
from runs import registered_checkpoint, train_workers  # noqa: E402
from services import TEST_ACCESS_KEY, TEST_SECRET_KEY, free_port, start_moto  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="steps of each run (default: %(default)s)")
    parser.add_argument("--every", type=int, default=50,
                        help="checkpoint interval in steps; 50 is train.checkpoint_every's default")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="per-worker batch (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=100, help="CIFAR-10 train images per class")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs 1 and 2 alternate this many times (the host's load drifts; medians are shown)")
    parser.add_argument("--skip-reshard", action="store_true", help="skip run 5")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ssl-dist-bench-ckpt-"))
    moto, endpoint = start_moto()
    os.environ.update({"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
                       "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                       "RAY_AUTH_MODE": "disabled"})
    cluster = Cluster(work / "ray", cpus=args.workers + 2)
    try:
        run_all(args, work, cluster)
    finally:
        cluster.stop()
        moto.terminate()
        shutil.rmtree(work, ignore_errors=True)


class Cluster:
    """A local Ray cluster of this benchmark's own. Started again if something outside stops
    it (`ray stop --force` elsewhere on a shared host stops every cluster), and stopped by
    killing its own processes only (those whose command line names its temp dir)."""

    def __init__(self, temp: Path, cpus: int):
        self.temp, self.cpus = temp, cpus
        self.start()

    def start(self) -> None:
        ray = shutil.which("ray", path=str(Path(sys.executable).parent))
        self.port = free_port()
        subprocess.run([ray, "start", "--head", f"--port={self.port}", f"--num-cpus={self.cpus}", "--num-gpus=0",
                        "--include-dashboard=true", f"--dashboard-port={free_port()}", f"--temp-dir={self.temp}",
                        "--disable-usage-stats"], check=True, stdout=subprocess.DEVNULL)
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{self.port}"

    def processes(self) -> list:
        import psutil

        mine = []
        for proc in psutil.process_iter(["cmdline"]):
            if any(str(self.temp) in arg for arg in proc.info["cmdline"] or []):
                mine.append(proc)
        return mine

    def alive(self) -> bool:
        return any(p.info["cmdline"] and "gcs_server" in p.info["cmdline"][0] for p in self.processes())

    def stop(self) -> None:
        import psutil

        procs = self.processes()
        for proc in procs:
            proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            proc.kill()


def run_all(args, work: Path, cluster: Cluster) -> None:
    import boto3

    from ssl_dist import checkpoint, metrics, storage
    from ssl_dist.shards import make_shards

    boto3.client("s3").create_bucket(Bucket="bench")
    make_shards(str(cifar_slice(work / "train", per_class=args.per_class)), "s3://bench/train",
                samples_per_shard=250, workers=2)
    common = ["data.train_url=s3://bench/train", "run.storage_path=s3://bench/runs", f"data.batch_size={args.batch}",
              "data.loader_workers=1", "model.cifar_stem=false", "train.zero_stage=1", "train.log_every=1",
              f"run.num_workers={args.workers}", "run.cpus_per_worker=1", f"train.max_steps={args.steps}",
              "run.max_failures=2"]

    def pretrain(name, *extra, kill_after_checkpoint=False, tries=3):
        for attempt in range(tries):
            try:
                return pretrain_once(f"{name}" if attempt == 0 else f"{name}-retry{attempt}", *extra,
                                     kill_after_checkpoint=kill_after_checkpoint)
            except RuntimeError as err:
                if cluster.alive() or attempt == tries - 1:
                    raise SystemExit(str(err)) from None
                print(f"  the Ray cluster was stopped from outside during {name}: starting it again", file=sys.stderr)
                cluster.stop()
                cluster.start()

    def pretrain_once(name, *extra, kill_after_checkpoint=False):
        started = time.time()
        driver = subprocess.Popen([sys.executable, "-m", "ssl_dist.cli", "pretrain", f"run.name={name}", *common,
                                   *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        killed_at = None
        if kill_after_checkpoint:
            url = f"s3://bench/runs/{name}"
            while registered_checkpoint(url) is None:
                if driver.poll() is not None:
                    raise RuntimeError(driver.stdout.read()[-3000:])
                time.sleep(0.1)
            victim = max(train_workers(os.environ["RAY_ADDRESS"]), key=lambda p: p.create_time())
            killed_at = time.time()
            os.kill(victim.pid, signal.SIGKILL)
        output, _ = driver.communicate()
        if driver.returncode != 0:
            raise RuntimeError(f"run {name} failed:\n{output[-3000:]}")
        print(f"  ran {name} in {time.time() - started:.0f} s", file=sys.stderr)
        return f"s3://bench/runs/{name}", killed_at

    def throughput(url) -> float:
        rows = metrics.read_history(url)[-1]
        rows = rows[4:]
        samples = float(rows[-1]["samples_seen"]) - float(rows[0]["samples_seen"])
        return samples / (float(rows[-1]["time"]) - float(rows[0]["time"]))

    def step_time(url) -> float:
        """Median wall time between consecutive logged steps (one step each: log_every=1)."""
        times = [float(r["time"]) for r in metrics.read_history(url)[-1][4:]]
        return statistics.median(b - a for a, b in zip(times, times[1:]))

    def attempt_records(url) -> list[dict]:
        fs, path = storage.filesystem(storage.join(url, "attempts"))
        fs.invalidate_cache()
        names = sorted(fs.ls(path, detail=False), key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0]))
        return [json.loads(fs.cat_file(p)) for p in names]

    def checkpoint_bytes(url) -> int:
        info = checkpoint.newest_complete(url)
        return sum(size for part in info.parts for size in part.values())

    none_urls, async_urls = [], []
    for i in range(args.repeats):  # alternated, so that a drift of the host's load hits both alike
        none_urls.append(pretrain(f"none-{i}", "train.checkpoint_every=0")[0])
        async_urls.append(pretrain(f"async-{i}", f"train.checkpoint_every={args.every}")[0])
    async_url = async_urls[-1]
    sync_url, _ = pretrain("sync", f"train.checkpoint_every={args.every}", "train.async_upload=false")

    bases, asyncs = [throughput(u) for u in none_urls], [throughput(u) for u in async_urls]
    base, t_async, t_sync = statistics.median(bases), statistics.median(asyncs), throughput(sync_url)
    # Interval checkpoints only: the final one happens after training, outside the throughput window.
    a_ckpts = [c for u in async_urls for c in attempt_records(u)[-1]["checkpoints"] if c["step"] < args.steps]
    s_ckpts = [c for c in attempt_records(sync_url)[-1]["checkpoints"] if c["step"] < args.steps]
    size = checkpoint_bytes(async_url)

    def med(values):
        return statistics.median(values) if values else float("nan")

    print()
    print(f"checkpoint: {size / 2**20:.0f} MiB in all ({args.workers} workers, resnet18 + AdamW, ZeRO-1), "
          f"every {args.every} steps, {args.steps} steps per run, S3 = moto on 127.0.0.1")
    print()
    print(f"{'':44s} {'value':>10s}")
    print(f"{'local write (all ranks, median), s':44s} {med([c['write_s'] for c in a_ckpts]):10.2f}")
    print(f"{'report, async upload (training waits), s':44s} {med([c['report_s'] for c in a_ckpts]):10.2f}")
    print(f"{'report, sync upload (= upload), s':44s} {med([c['report_s'] for c in s_ckpts]):10.2f}")
    print()
    print(f"{'throughput (median of runs)':44s} {'samples/s':>10s} {'ratio':>8s}")
    print(f"{f'no checkpoint ({len(bases)} runs: ' + ', '.join(f'{b:.1f}' for b in bases) + ')':44s} "
          f"{base:10.1f} {1.0:8.3f}")
    print(f"{f'every {args.every} steps, async ({len(asyncs)} runs: ' + ', '.join(f'{a:.1f}' for a in asyncs) + ')':44s} "
          f"{t_async:10.1f} {t_async / base:8.3f}")
    print(f"{f'every {args.every} steps, sync upload (1 run)':44s} {t_sync:10.1f} {t_sync / base:8.3f}")
    # The same cost from inside one run, immune to the host's load drifting between runs: the
    # time the loop is held per checkpoint against the steps between two checkpoints.
    held = med([c["write_s"] + c["report_s"] for c in a_ckpts])
    step = statistics.median(step_time(u) for u in async_urls)
    print(f"{'in-run: loop held per checkpoint, s':44s} {held:10.2f}")
    print(f"{'in-run: median step, s':44s} {step:10.3f}")
    print(f"{f'in-run: throughput lost at every {args.every} steps':44s} "
          f"{100 * held / (args.every * step + held):9.2f}%")

    sys.stdout.flush()  # the figures so far survive a failure of the runs below
    killed_url, killed_at = pretrain("killed", f"train.checkpoint_every={args.every}", "train.async_upload=true",
                                     kill_after_checkpoint=True)
    records = attempt_records(killed_url)
    rec = records[-1]
    print_recovery(f"recovery from a killed worker (SIGKILL at {time.strftime('%H:%M:%S', time.localtime(killed_at))},"
                   f" resumed from {rec['resumed_from']})", rec, killed_at)

    if not args.skip_reshard:
        # The killed run's newest checkpoint, resumed by one worker: a universal-checkpoint conversion.
        info = checkpoint.newest_complete(killed_url)
        fs, _ = storage.filesystem(killed_url)
        fs.copy(f"{killed_url[5:]}/{info.name}", f"bench/runs/reshard/{info.name}", recursive=True)
        asked = time.time()
        pretrain("reshard", f"train.checkpoint_every={args.every}", "run.num_workers=1",
                 f"train.max_steps={info.step + 3}", "--resume", tries=1)
        print_recovery(f"resume of a {args.workers}-worker checkpoint on 1 worker (job start at "
                       f"{time.strftime('%H:%M:%S', time.localtime(asked))})", attempt_records("s3://bench/runs/reshard")[-1],
                       asked)


def print_recovery(title: str, rec: dict, t0: float) -> None:
    tl, restore = rec["timeline"], rec["restore"]
    step_s = tl["second_step"] - tl["first_step"] if "second_step" in tl else 0.0
    seek = max(0.0, tl["first_step"] - tl["restored"] - step_s)
    rows = [("Ray restart (to the worker loop)", tl["start"] - t0),
            ("  choosing the checkpoint (listing, checks)", tl["decided"] - tl["start"]),
            ("DeepSpeed initialise", tl["engine"] - tl["decided"]),
            ("checkpoint load", tl["restored"] - tl["engine"]),
            ("  download", restore.get("download_s", 0.0)),
            ("  universal conversion", restore.get("convert_s", 0.0)),
            ("  DeepSpeed load", restore.get("load_s", 0.0)),
            ("data seek (to the first batch)", seek),
            ("first step", step_s),
            ("total: to the first completed step", tl["first_step"] - t0)]
    print()
    print(title)
    print(f"{'phase':44s} {'s':>10s}")
    for label, value in rows:
        print(f"{label:44s} {value:10.2f}")


if __name__ == "__main__":
    main()
