"""The `ssl-dist` command. Thin: parse arguments, call the library, turn known errors into
one clear line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        print("ssl-dist: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 (known user errors become one line; others keep their trace)
        message = user_error_message(err)
        if message is None:
            raise
        print(f"ssl-dist: error: {message}", file=sys.stderr)
        return 2


def user_error_message(err: BaseException) -> str | None:
    """The one-line message of an error a user can cause, looking through Ray's wrappers."""
    from ssl_dist.checkpoint import CheckpointError
    from ssl_dist.config import ConfigError
    from ssl_dist.data import DataError
    from ssl_dist.evaluate import EvaluationError
    from ssl_dist.launch import LaunchError
    from ssl_dist.shards import ShardError
    from ssl_dist.storage import StorageError, explain

    known = (ConfigError, StorageError, ShardError, DataError, LaunchError, EvaluationError, CheckpointError)
    seen = set()
    stack = [err]
    while stack:  # Ray wraps worker exceptions (TrainingFailedError -> WorkerGroupError -> cause)
        e = stack.pop()
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        if isinstance(e, known):
            return str(e)
        for attr in ("worker_failures", "__cause__", "__context__", "cause"):
            value = getattr(e, attr, None)
            if isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, BaseException):
                stack.append(value)
    return explain("", err) if isinstance(err, OSError) else None


# ---- sub-commands ---------------------------------------------------------------------------


def cmd_shards_make(args) -> None:
    from ssl_dist import shards

    manifest = shards.make_shards(args.src, args.dest, samples_per_shard=args.samples_per_shard,
                                  shard_bytes=args.shard_bytes, workers=args.workers, progress=True,
                                  overwrite=args.overwrite)
    total = sum(s["num_samples"] for s in manifest["shards"])
    print(f"wrote {len(manifest['shards'])} shards, {total} samples, to {args.dest} (index.json)")


def cmd_shards_index(args) -> None:
    from ssl_dist import shards

    manifest = shards.index_shards(args.url, workers=args.workers)
    total = sum(s["num_samples"] for s in manifest["shards"])
    print(f"indexed {len(manifest['shards'])} shards, {total} samples, at {args.url}")


def cmd_shards_check(args) -> int:
    from ssl_dist import shards

    report = shards.check_shards(args.url, workers=args.workers)
    print(f"{report['shards']} shards, {report['samples']} samples, {len(report['problems'])} problems")
    for problem in report["problems"]:
        print(f"  {problem}")
    return 1 if report["problems"] else 0


def cmd_pretrain(args) -> None:
    from ssl_dist import config, launch

    cfg = config.load(args.config, args.overrides)
    result = launch.pretrain(cfg, address=args.address)
    print(f"run folder: {result.run_url}")
    print(f"newest checkpoint: {result.checkpoint_url}")


def cmd_evaluate(args) -> None:
    from ssl_dist import evaluate

    scores = evaluate.evaluate_checkpoint(args.checkpoint, args.train, args.test, k=args.k)
    print(f"kNN top-1 (k={args.k}): {scores['knn_top1']:.4f}  "
          f"(same encoder at random initialisation: {scores['knn_top1_random_init']:.4f})")
    if args.json:
        print(json.dumps(scores))


def cmd_quickstart(args) -> None:
    from ssl_dist import quickstart

    quickstart.run(args.out, args.overrides)


def cmd_config(args) -> None:
    from ssl_dist import config

    cfg = config.load(args.config, args.overrides)
    print(config.describe(cfg) if args.describe else config.dump_yaml(cfg), end="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssl-dist", description="Contrastive self-supervised pretraining at scale.")
    sub = parser.add_subparsers()

    p = sub.add_parser("quickstart", help="make a synthetic dataset, pretrain on local Ray, compare kNN to random init")
    p.add_argument("--out", default="runs/quickstart", help="folder for the data and the run (default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=50")
    p.set_defaults(handler=cmd_quickstart)

    p = sub.add_parser("pretrain", help="run a pretraining job on Ray (local, or RAY_ADDRESS / --address)")
    p.add_argument("--config", help="YAML file overriding the defaults (see `ssl-dist config --describe`)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after --config")
    p.set_defaults(handler=cmd_pretrain)

    p = sub.add_parser("evaluate", help="kNN top-1 of a checkpoint's encoder on labeled shards")
    p.add_argument("checkpoint", help="checkpoint folder URL (…/checkpoint-NNNNNNNN)")
    p.add_argument("--train", required=True, help="labeled shards for the neighbours")
    p.add_argument("--test", required=True, help="labeled shards for the queries")
    p.add_argument("--k", type=int, default=200, help="neighbours (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="also print the scores as JSON")
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser("config", help="print the resolved config (or every key with its documentation)")
    p.add_argument("--config", help="YAML file overriding the defaults")
    p.add_argument("--describe", action="store_true", help="list every key with its documentation")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(handler=cmd_config)

    shards = sub.add_parser("shards", help="make, index and check WebDataset shards").add_subparsers()
    p = shards.add_parser("make", help="image folder (ImageFolder layout) or a tar of one -> shards + index.json")
    p.add_argument("src")
    p.add_argument("dest", help="local folder or s3://bucket/prefix")
    p.add_argument("--samples-per-shard", type=int, default=None)
    p.add_argument("--shard-bytes", type=int, default=256 * 2**20)
    p.add_argument("--workers", type=int, default=4, help="shards written in parallel")
    p.add_argument("--overwrite", action="store_true", help="replace shards already at DEST")
    p.set_defaults(handler=cmd_shards_make)
    p = shards.add_parser("index", help="write sidecar offsets and index.json for shards made elsewhere")
    p.add_argument("url")
    p.add_argument("--workers", type=int, default=8)
    p.set_defaults(handler=cmd_shards_index)
    p = shards.add_parser("check", help="decode every sample; report counts and problems")
    p.add_argument("url")
    p.add_argument("--workers", type=int, default=4)
    p.set_defaults(handler=cmd_shards_check)
    return parser


if __name__ == "__main__":
    sys.exit(main())
