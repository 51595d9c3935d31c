"""Forward + backward time and peak memory per rank of the contrastive losses, at 2 ranks.

    python benchmarks/loss.py [--sizes 256,1024,4096,32768] [--dim 128] [--chunk 1024]

Each local batch size runs in a freshly spawned group of ranks (gloo on 127.0.0.1, one
thread each) that measures its configurations interleaved: after a warm-up run of each, every
repetition runs every configuration once, so a change of load on the machine hits them all
alike. Time: the median over the repetitions of the slowest rank's forward + backward, and the
same in CPU time of the rank's process (time.process_time, all its threads), on which the
ratios are based: on a shared machine wall time also measures the neighbours' load. These
repetitions run back to back, as the steps of a training loop do, with the allocator's memory
kept from one to the next. Peak memory is measured apart, after them, in a quarter as many
runs (1 to 25), each from a trimmed heap: freed heap is
returned (malloc_trim), the peak RSS is reset (/proc/self/clear_refs), and the peak (VmHWM)
after the run minus the RSS before it is the run's; max over runs and ranks. Those runs' CPU
time is the column "cold cpu s": what a step costs when every buffer is a fresh page (earlier
versions of this benchmark timed only such runs). Repetitions: enough for about a second per
configuration at small sizes (--reps overrides); above 8192 rows per rank: one run, no warm-up.

Compared, on the same inputs: ssl_dist.loss (every row at once, chunked, and as a user gets it by
default, chunk_size=None, which picks the chunk from the sizes; SigLIP's ring), a
straightforward all-gather-then-full-global-matrix implementation written here, and the peers
as they ship, when installed (benchmark only, not project dependencies): lightly's
NTXentLoss(gather_distributed=True), open_clip's ClipLoss(local_loss=True,
gather_with_grad=True) and open_clip's SigLipLoss (its default bidirectional exchange). The
floor is the time of the loss's three matrix products alone (logits, and the two gradient
products), forward and backward, measured in the same run; the row "collectives only" is the
time of what ours sends and receives, with no arithmetic (see collectives_step), so that a
row of ours reads as floor + collectives + the rest. Configurations whose estimated
memory exceeds what this machine has are skipped with their estimate, not run into swap.
Every implementation's rank-0 loss and input gradients are compared with ours, unchunked
(or chunked where unchunked does not fit): column "agrees" is the largest relative
difference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

WORLD = 2
TAU = 0.1
CLIP_LOGIT_SCALE = math.log(1 / 0.07)
SIGLIP_LOGIT_SCALE, SIGLIP_LOGIT_BIAS = math.log(10.0), -10.0
GIB = 2**30


@dataclass(frozen=True)
class Impl:
    loss: str  # nt_xent | clip | siglip
    name: str  # ours | ours_chunked | ours_auto | straightforward | lightly | open_clip | floor | collectives
    label: str
    peer_module: str | None = None  # import needed, for peers


IMPLS = [
    Impl("nt_xent", "floor", "floor: matrix products only"),
    Impl("nt_xent", "collectives", "collectives only (what ours sends)"),
    Impl("nt_xent", "ours", "ssl_dist nt_xent, unchunked"),
    Impl("nt_xent", "ours_chunked", "ssl_dist nt_xent, chunk {chunk}"),
    Impl("nt_xent", "ours_auto", "ssl_dist nt_xent, default (auto chunk)"),
    Impl("nt_xent", "straightforward", "all-gather + full 2Nx2N"),
    Impl("nt_xent", "lightly", "lightly NTXentLoss", "lightly"),
    Impl("clip", "floor", "floor: matrix products only"),
    Impl("clip", "collectives", "collectives only (what ours sends)"),
    Impl("clip", "ours", "ssl_dist clip_loss, unchunked"),
    Impl("clip", "ours_chunked", "ssl_dist clip_loss, chunk {chunk}"),
    Impl("clip", "ours_auto", "ssl_dist clip_loss, default (auto chunk)"),
    Impl("clip", "straightforward", "all-gather + full NxN"),
    Impl("clip", "open_clip", "open_clip ClipLoss", "open_clip"),
    Impl("siglip", "floor", "floor: matrix products only"),
    Impl("siglip", "collectives", "collectives only (what ours sends)"),
    Impl("siglip", "ours", "ssl_dist siglip ring, unchunked"),
    Impl("siglip", "ours_chunked", "ssl_dist siglip ring, chunk {chunk}"),
    Impl("siglip", "ours_auto", "ssl_dist siglip ring, default (auto chunk)"),
    Impl("siglip", "straightforward", "all-gather + full NxN"),
    Impl("siglip", "open_clip", "open_clip SigLipLoss (bidir)", "open_clip"),
]
PEERS = {"nt_xent": ["lightly"], "clip": ["open_clip"], "siglip": ["open_clip"]}


# ---------------------------------------------------------------------------------------------
# memory estimates (bytes per rank), to skip what cannot fit instead of swapping
# ---------------------------------------------------------------------------------------------


def logit_shape(loss: str, n: int) -> tuple[int, int]:
    """(rows, columns) of one rank's logit matrix: anchors x global columns."""
    return (2 * n, 2 * n * WORLD) if loss == "nt_xent" else (n, n * WORLD)


def estimate_bytes(impl: Impl, n: int, d: int, chunk: int) -> float:
    from ssl_dist.loss.numerics import auto_chunk

    rows, cols = logit_shape(impl.loss, n)
    local = rows * cols * 4  # fp32 logit matrix of the rank
    full = cols * cols * 4  # the whole global matrix
    vectors = 12 * cols * d * 4  # embeddings, gathered copies, gradients
    per_impl = {
        "floor": min(rows, chunk) * cols * 4,
        "collectives": 0,
        "ours": 1.2 * local,
        "ours_chunked": 2.2 * min(rows, chunk) * cols * 4,
        "straightforward": 4.5 * full,  # logits, masked copy, softmax, its gradient
        "lightly": 5.0 * local,  # four blocks, their concatenation, softmax, gradient
        "open_clip": 6.0 * local,
    }
    per_impl["ours_auto"] = 2.2 * min(rows, auto_chunk(rows, cols, 4, "cpu")) * cols * 4
    if impl.loss == "siglip":  # ours: three (chunk x n) buffers
        per_impl["ours"] = 3.2 * n * n * 4
        per_impl["ours_chunked"] = 3.2 * min(n, chunk) * n * 4
        per_impl["ours_auto"] = 3.2 * min(n, auto_chunk(n, n, 4, "cpu")) * n * 4
        per_impl["floor"] = min(n, chunk) * cols * 4
    return per_impl[impl.name] + vectors


def available_bytes() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


# ---------------------------------------------------------------------------------------------
# implementations, run inside each rank
# ---------------------------------------------------------------------------------------------


def straightforward(loss: str, a, b, rank: int):
    """All-gather with gradient, then the full global matrix; this rank's anchors' mean."""
    import torch
    import torch.nn.functional as F

    from ssl_dist.loss import gather

    n = a.shape[0]
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    if loss == "nt_xent":
        z = gather(torch.cat([a, b]))  # rank q's rows: [a_q; b_q]
        s = (z @ z.T / TAU).masked_fill(torch.eye(z.shape[0], dtype=torch.bool), float("-inf"))
        idx = torch.arange(z.shape[0])
        labels = (idx // (2 * n)) * 2 * n + (idx % (2 * n) + n) % (2 * n)
        return F.cross_entropy(s, labels, reduction="none")[rank * 2 * n : (rank + 1) * 2 * n].mean()
    all_a, all_b = gather(a), gather(b)
    own = slice(rank * n, (rank + 1) * n)
    if loss == "clip":
        s = math.exp(CLIP_LOGIT_SCALE) * all_a @ all_b.T
        labels = torch.arange(s.shape[0])
        ce = F.cross_entropy(s, labels, reduction="none") + F.cross_entropy(s.T, labels, reduction="none")
        return ce[own].mean() / 2
    s = math.exp(SIGLIP_LOGIT_SCALE) * all_a @ all_b.T + SIGLIP_LOGIT_BIAS
    labels = 2 * torch.eye(s.shape[0]) - 1
    return -F.logsigmoid(labels * s)[own].sum() / n


def make_step(impl: Impl, a, b, rank: int, chunk: int):
    """A function computing this rank's loss (forward only; the caller runs backward)."""
    import torch
    import torch.nn.functional as F

    from ssl_dist import loss as L

    # ours: every row at once (a chunk as large as the rows); ours_auto: chunk_size=None, the default
    c = {"ours_chunked": chunk, "ours_auto": None}.get(impl.name, 2 * a.shape[0])
    if impl.name in ("ours", "ours_chunked", "ours_auto"):
        if impl.loss == "nt_xent":
            return lambda: L.nt_xent(a, b, TAU, chunk_size=c)
        if impl.loss == "clip":
            return lambda: L.clip_loss(a, b, torch.tensor(CLIP_LOGIT_SCALE), chunk_size=c)
        return lambda: L.siglip_loss(a, b, torch.tensor(SIGLIP_LOGIT_SCALE), torch.tensor(SIGLIP_LOGIT_BIAS),
                                     chunk_size=c)
    if impl.name == "straightforward":
        return lambda: straightforward(impl.loss, a, b, rank)
    if impl.name == "lightly":
        from lightly.loss import NTXentLoss

        fn = NTXentLoss(temperature=TAU, gather_distributed=True)
        return lambda: fn(a, b)
    if impl.name == "open_clip" and impl.loss == "clip":
        from open_clip.loss import ClipLoss

        fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD)
        scale = torch.tensor(math.exp(CLIP_LOGIT_SCALE))
        # open_clip's loss expects normalised features (its model normalises)
        return lambda: fn(F.normalize(a, dim=1), F.normalize(b, dim=1), scale)
    if impl.name == "open_clip" and impl.loss == "siglip":
        from open_clip.loss import SigLipLoss

        fn = SigLipLoss(rank=rank, world_size=WORLD)
        scale, bias = torch.tensor(math.exp(SIGLIP_LOGIT_SCALE)), torch.tensor(SIGLIP_LOGIT_BIAS)
        return lambda: fn(F.normalize(a, dim=1), F.normalize(b, dim=1), scale, bias)
    raise ValueError(impl)


def floor_step(impl: Impl, n: int, d: int, chunk: int):
    """The loss's matrix products alone: logits, then the two gradient products (per direction).

    Rows in chunks (the same products, in a matrix that fits), into one reused workspace.
    """
    import torch

    rows, cols = logit_shape(impl.loss, n)
    directions = 2 if impl.loss == "clip" else 1
    a, g = torch.randn(rows, d), torch.randn(cols, d)
    step = min(rows, chunk)

    def run():
        work = torch.empty(step, cols)
        for _ in range(directions):
            grad_cols_t = torch.zeros(d, cols)
            for i in range(0, rows, step):
                s = torch.mm(a[i : i + step], g.T, out=work[: min(step, rows - i)])
                s @ g
                grad_cols_t.addmm_(a[i : i + step].T, s)
        return torch.zeros(())

    return run


def collectives_step(impl: Impl, n: int, d: int):
    """What ssl_dist's loss sends and receives, alone: softmax.py's gather of the rank's
    (rows, F) block and, in backward, its reduce-scatter; sigmoid.py's W - 1 shifts of an
    (n, D) block and W - 1 of its gradient around the ring. The time the process group
    (gloo here, a CPU-side cost that NCCL moves to the device) adds to the matrix products."""
    import torch

    from ssl_dist.loss import gather
    from ssl_dist.loss.sigmoid import _shift_right, _wait_all

    if impl.loss == "siglip":
        block = torch.randn(n, d)

        def ring():
            for _ in range(2 * (WORLD - 1)):
                works, _received = _shift_right(block, None)
                _wait_all(works)
            return torch.zeros(())

        return ring
    rows, width = (2 * n, d) if impl.loss == "nt_xent" else (n, 2 * d)
    x = torch.randn(rows, width, requires_grad=True)
    return lambda: gather(x).sum()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_and_reset_peak() -> int:
    """Give freed heap back to the OS, reset the peak RSS (VmHWM); returns the RSS now."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (Linux >= 4.0)
        f.write("5")
    return rss_bytes()


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class Config:
    """One implementation at one size on this rank: its inputs and its step."""

    def __init__(self, impl: Impl, n: int, d: int, chunk: int, rank: int):
        import torch

        gen = torch.Generator().manual_seed(1000 * n + rank)  # the same inputs for every implementation
        self.impl, self.n = impl, n
        self.a = torch.randn(n, d, generator=gen).requires_grad_()
        self.b = torch.randn(n, d, generator=gen).requires_grad_()
        if impl.name == "floor":
            self.step = floor_step(impl, n, d, chunk)
        elif impl.name == "collectives":
            self.step = collectives_step(impl, n, d)
        else:
            self.step = make_step(impl, self.a, self.b, rank, chunk)
        self.times, self.cpu, self.cold_cpu, self.peak, self.loss = [], [], [], 0, float("nan")

    def run(self, measure_memory: bool) -> None:
        """One forward + backward: timed (steady heap), or measured for memory (trimmed heap)."""
        import torch.distributed as dist

        self.a.grad = self.b.grad = None
        base = release_and_reset_peak() if measure_memory else 0
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = self.step()
        if loss.requires_grad:
            loss.backward()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if measure_memory:
            self.peak = max(self.peak, peak_bytes() - base)
            self.cold_cpu.append(cpu)
        else:
            self.times.append(wall)
            self.cpu.append(cpu)
        self.loss = float(loss.detach())


def worker(rank: int, port: int, specs: list, d: int, chunk: int, reps: int, warmup: bool, tmp: str,
           world: int = WORLD):
    """One rank of a group of `world` that measures `specs` [(Impl, n)], interleaved: each
    repetition runs every configuration once, so a change of load on the machine hits all of
    them alike."""
    import warnings

    global WORLD
    WORLD = world  # this spawned rank's process only: the group size make_step and logit_shape read

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore")  # peers' deprecation warnings, once per call
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        configs = [Config(impl, n, d, chunk, rank) for impl, n in specs]
        if warmup:  # first calls pay one-time costs (lazy imports, gloo buffers)
            for c in configs:
                c.run(measure_memory=False)
                c.times.clear()
                c.cpu.clear()
        for _ in range(reps):
            for c in configs:
                c.run(measure_memory=False)
        for _ in range(memory_runs(reps)):
            for c in configs:
                c.run(measure_memory=True)
        for c in configs:
            mine = torch.tensor([statistics.median(c.times), statistics.median(c.cpu), c.peak,
                                 statistics.median(c.cold_cpu)], dtype=torch.float64)
            everyone = [torch.zeros_like(mine) for _ in range(WORLD)]
            dist.all_gather(everyone, mine)
            if rank == 0:
                out = Path(tmp) / f"{c.impl.loss}-{c.impl.name}-{c.n}"
                res = {"time": max(float(x[0]) for x in everyone), "cpu": max(float(x[1]) for x in everyone),
                       "peak": max(float(x[2]) for x in everyone), "cold_cpu": max(float(x[3]) for x in everyone),
                       "loss": c.loss}
                out.with_suffix(".json").write_text(json.dumps(res))
                if c.impl.name not in ("floor", "collectives"):
                    torch.save({"loss": c.loss, "ga": c.a.grad, "gb": c.b.grad}, out.with_suffix(".pt"))
                print(f"  {c.impl.loss:8s} {c.impl.label.format(chunk=chunk):36s} n={c.n:<6d} {res['time']:8.3f} s "
                      f"(cpu {res['cpu']:8.3f} s) {res['peak'] / GIB:6.2f} GiB", flush=True)
        dist.barrier()  # no rank tears the group down while another still talks (gloo aborts then)
    finally:
        dist.destroy_process_group()


def memory_runs(reps: int) -> int:
    """Runs from a trimmed heap for the peak memory and the cold CPU time: a quarter of the
    timed repetitions, at least 1 and at most 25."""
    return max(1, min(25, reps // 4))


def default_reps(n: int) -> int:
    """Timed repetitions at n rows per rank: about a second per configuration below 4096
    rows (a 256-row loss takes milliseconds, and one noisy run moves a median of 3), 3 up
    to 8192, 1 above."""
    if n > 8192:
        return 1
    return {256: 100, 512: 60, 1024: 30, 2048: 10}.get(n, 3 if n >= 4096 else max(3, 25600 // n))


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(specs: list, d: int, chunk: int, reps: int, warmup: bool, tmp: Path, world: int = WORLD) -> None:
    """Spawn `world` ranks (default 2) that measure `specs`; results in `tmp` (benchmarks/clip.py uses 1, 2, 4)."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(free_port(), specs, d, chunk, reps, warmup, str(tmp), world), nprocs=world, join=True)


def agreement(ref: Path, other: Path) -> float:
    """Largest relative difference of loss and input gradients (rank 0) between two runs."""
    import torch

    x, y = torch.load(ref), torch.load(other)
    errs = [abs(x["loss"] - y["loss"]) / abs(x["loss"])]
    for k in ("ga", "gb"):
        errs.append(float((x[k] - y[k]).abs().max() / x[k].abs().max()))
    return max(errs)


def installed(module: str | None) -> bool:
    if module is None:
        return True
    import importlib.util

    return importlib.util.find_spec(module) is not None


def fmt_row(cols, widths):
    return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256,1024,4096,32768", help="local batch sizes per rank, comma-separated")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--chunk", type=int, default=1024, help="anchor rows per chunk for the chunked versions")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions (default: from the size, see default_reps; 1, no warm-up, above 8192 rows)")
    p.add_argument("--losses", default="nt_xent,clip,siglip")
    p.add_argument("--max-gib", type=float, default=8.0, help="skip configurations estimated above this per rank")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    losses = args.losses.split(",")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # spawned ranks: one thread each
    budget = min(0.9 * available_bytes() / WORLD, args.max_gib * GIB)
    print(f"{WORLD} ranks (gloo, CPU, 1 thread each), D = {args.dim}, chunk = {args.chunk}, "
          f"memory budget {budget / GIB:.1f} GiB per rank", flush=True)

    rows = []  # (loss, label, n, result, or the reason it did not run)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for n in sizes:
            plan, specs = [], []
            for impl in [i for i in IMPLS if i.loss in losses]:
                need = estimate_bytes(impl, n, args.dim, args.chunk)
                if not installed(impl.peer_module):
                    plan.append((impl, f"skipped: {impl.peer_module} not installed"))
                elif need > budget:
                    plan.append((impl, f"does not fit (needs ~{need / GIB:.0f} GiB per rank)"))
                else:
                    plan.append((impl, None))
                    specs.append((impl, n))
            large = n > 8192
            run_group(specs, args.dim, args.chunk, 1 if large else (args.reps or default_reps(n)), not large, tmp)
            for loss in losses:
                results = {}
                for impl, reason in plan:
                    if impl.loss != loss:
                        continue
                    label = impl.label.format(chunk=args.chunk)
                    if reason is None:
                        results[impl.name] = json.loads((tmp / f"{loss}-{impl.name}-{n}.json").read_text())
                    rows.append((loss, label, n, results.get(impl.name, reason)))
                add_ratios(loss, n, results, tmp)
    print_table(rows)
    print(f"(whole benchmark: {time.perf_counter() - t_start:.0f} s)")


def add_ratios(loss: str, n: int, results: dict, tmp: Path) -> None:
    """x floor, ours / best peer, and agreement with ours unchunked (chunked if that did not run)."""
    ref_name = "ours" if "ours" in results else "ours_chunked"
    ref = tmp / f"{loss}-{ref_name}-{n}.pt"
    for name, res in results.items():
        if name not in ("floor", "collectives", ref_name) and ref.exists():
            res["agrees"] = agreement(ref, tmp / f"{loss}-{name}-{n}.pt")
    # Ratios of CPU time: on a shared machine, wall time also measures the neighbours.
    floor = results.get("floor")
    peers = [results[p] for p in PEERS[loss] if p in results]
    best_t = min((r["cpu"] for r in peers), default=None)
    best_m = min((r["peak"] for r in peers), default=None)
    for name, res in results.items():
        res["x_floor"] = res["cpu"] / floor["cpu"] if floor else None
        res["x_floor_cold"] = res["cold_cpu"] / floor["cold_cpu"] if floor else None
        if name.startswith("ours") and best_t:
            res["x_peer_t"] = res["cpu"] / best_t
            res["x_peer_m"] = res["peak"] / best_m


def print_table(rows) -> None:
    head = ["loss", "implementation", "n/rank", "wall s", "cpu s", "peak GiB", "x floor", "cpu / best peer",
            "mem / best peer", "cold cpu s", "x floor cold", "loss (rank 0)", "agrees"]
    widths = [8, 40, 6, 8, 8, 8, 7, 15, 15, 10, 12, 13, 7]
    print()
    print(fmt_row(head, widths))
    print("-" * (sum(widths) + 2 * len(widths)))
    last = None
    for loss, label, n, res in rows:
        if last is not None and (loss, n) != last:
            print()
        last = (loss, n)
        if isinstance(res, str):
            print(fmt_row([loss, label, n], widths[:3]) + "    " + res)
            continue

        def r(key, f="{:.2f}"):
            return f.format(res[key]) if res.get(key) is not None else "-"

        floor_row = label.startswith(("floor", "collectives"))
        print(fmt_row([loss, label, n, f"{res['time']:.4f}", f"{res['cpu']:.4f}",
                       "-" if floor_row else f"{res['peak'] / GIB:.3f}",
                       r("x_floor"), r("x_peer_t"), r("x_peer_m"), f"{res['cold_cpu']:.4f}", r("x_floor_cold"),
                       "-" if floor_row else f"{res['loss']:.6f}",
                       r("agrees", "{:.1e}")], widths))
    print("\nwall s: median forward + backward time of the slowest rank; cpu s: the same in CPU seconds of the "
          "rank's process (robust to other load on the machine). x floor: cpu s / cpu s of the matrix products "
          "alone. cpu, mem / best peer: ours against the fastest (smallest) peer that ran at that size. cold cpu s, x floor "
          "cold: the same from a trimmed heap, every buffer a fresh page (the memory runs). agrees: "
          "largest relative difference of rank 0's loss and input gradients against ssl_dist unchunked (chunked "
          "where unchunked did not run).")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
