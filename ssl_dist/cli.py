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


# The errors a user can cause, by the module that defines each. Only modules already
# imported are looked at: an error cannot come from a module that was never loaded (Ray
# imports a worker error's module to unpickle it), and importing them all here would load
# torch and torchvision, seconds of CPU, to print one line.
USER_ERRORS = {
    "ssl_dist.config": "ConfigError", "ssl_dist.storage": "StorageError", "ssl_dist.shards.errors": "ShardError",
    "ssl_dist.decode": "DataError", "ssl_dist.launch": "LaunchError", "ssl_dist.methods": "MethodError",
    "ssl_dist.evaluate": "EvaluationError", "ssl_dist.checkpoint.layout": "CheckpointError",
    "ssl_dist.export": "ExportError", "ssl_dist.submit": "SubmitError",
}


def user_error_message(err: BaseException) -> str | None:
    """The one-line message of an error a user can cause, looking through Ray's wrappers."""
    from ssl_dist.storage import explain

    known = tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS.items() if module in sys.modules)
    seen = set()
    stack = [err]
    while stack:  # Ray wraps worker exceptions (TrainingFailedError -> WorkerGroupError -> cause)
        e = stack.pop()
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        if isinstance(getattr(e, "cause", None), BaseException):
            # Ray's RayTaskError is made an instance of its cause's class too, and its str() is
            # the remote traceback: the message is the cause's
            stack.append(e.cause)
            continue
        if isinstance(e, known):
            return str(e)
        for attr in ("worker_failures", "controller_failure", "__cause__", "__context__", "cause"):
            value = getattr(e, attr, None)
            if isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, BaseException):
                stack.append(value)
    return explain("", err) if isinstance(err, OSError) else None


# ---- sub-commands ---------------------------------------------------------------------------


def cmd_shards_make(args) -> None:
    from ssl_dist import shards
    from ssl_dist.shards.source import dropped_summary

    manifest = shards.make_shards(args.src, args.dest, samples_per_shard=args.samples_per_shard,
                                  shard_bytes=args.shard_bytes, workers=args.workers, progress=True,
                                  overwrite=args.overwrite, captions=args.captions, image_column=args.image_column,
                                  caption_column=args.caption_column, max_image_bytes=args.max_image_bytes)
    total = sum(s["num_samples"] for s in manifest["shards"])
    print(f"wrote {len(manifest['shards'])} shards, {total} samples, to {args.dest} (index.json)")
    for line in dropped_summary(manifest["dropped"]):  # what was left out, and why: never silently
        print(line)


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
    from ssl_dist import config, launch, metrics, storage

    cfg = config.load(args.config, args.overrides)
    # Watching: a bar from the metrics CSV rank 0 rewrites (on a terminal); pretrain draws the curves
    run_url, options = launch.run_url(cfg), storage.options_from_config(cfg.run.storage_path, cfg.storage)
    with metrics.watch_run(run_url, options, max_steps=cfg.train.max_steps):
        result = launch.pretrain(cfg, address=args.address, resume=args.resume, delete_previous=args.delete_previous)
    print(f"run folder: {result.run_url}")
    print(f"newest checkpoint: {result.checkpoint_url}")
    if result.curves_url:
        print(f"curves: {result.curves_url}")


def cmd_export(args) -> None:
    from ssl_dist import export

    spec = export.export_encoder(args.checkpoint, args.out)
    towers = spec.get("open_clip")  # an image-text checkpoint: open_clip's files too
    files = [export.WEIGHTS, export.SPEC] + ([towers["weights"], towers["config"]] if towers else [])
    print(f"wrote {'both towers' if towers else 'the encoder'} of {spec['checkpoint']} (step {spec['step']}, "
          f"{spec['arch']}, {spec['feature_dim']}-d features) to {args.out}: {' + '.join(files)}")
    if towers:
        print(f"load it with open_clip.create_model_and_transforms('local-dir:{args.out}')")


def cmd_evaluate(args) -> None:
    from ssl_dist import evaluate

    if bool(args.train) != bool(args.test) or not (args.train or args.zero_shot or args.retrieval):
        raise evaluate.EvaluationError("evaluate needs --train and --test (kNN, linear probe), --zero-shot URL "
                                       "or --retrieval URL (image-text models)")
    scores = {}
    if args.zero_shot or args.retrieval:
        templates = None
        if args.templates:
            from ssl_dist import zero_shot

            templates = zero_shot.read_templates(args.templates)
        scores.update(evaluate.evaluate_text_checkpoint(args.checkpoint, zero_shot_url=args.zero_shot or "",
                                                        templates=templates, retrieval_url=args.retrieval or "",
                                                        max_samples=args.max_samples))
    if args.train:
        scores.update(evaluate.evaluate_checkpoint(args.checkpoint, args.train, args.test, k=args.k,
                                                   linear_probe=args.linear_probe, probe_c=args.probe_c,
                                                   probe_max_iter=args.probe_max_iter))
    names = {"knn_top1": f"kNN top-1 (k={args.k})", "linear_top1": "linear-probe top-1",
             "zero_shot_top1": "zero-shot top-1"}
    for key, value in scores.items():
        if not key.endswith("_random_init"):
            print(f"{names.get(key, key)}: {value:.4f}  "
                  f"(same model at random initialisation: {scores[key + '_random_init']:.4f})")
    if args.json:
        print(json.dumps(scores))


def cmd_finetune(args) -> None:
    from ssl_dist import finetune

    settings = finetune.FinetuneSettings(label_fraction=args.label_fraction, seed=args.seed, epochs=args.epochs,
                                         batch_size=args.batch_size, lr=args.lr, num_workers=args.workers,
                                         cpus_per_worker=args.cpus_per_worker, use_gpu=args.use_gpu)
    results = finetune.finetune(args.checkpoint, args.train, args.test, settings, out=args.out, head_url=args.head,
                                address=args.address)
    print(f"fine-tune top-1 ({args.label_fraction:g} of the labels, {results['subset_samples']} samples): "
          f"{results['top1']:.4f}  (same fine-tune from random initialisation: {results['top1_random_init']:.4f})")
    print(f"subset and results: {results['out']}")


def cmd_submit(args) -> int:
    from ssl_dist import config, submit

    cfg = config.load(args.config, args.overrides)  # a bad key fails here, before the cluster sees it
    env = submit.parse_env(args.env)
    jobs, sent = submit.submit(cfg, address=args.address, installed=args.installed, env=env,
                               entrypoint_num_cpus=args.entrypoint_num_cpus)
    print(f"submitted job {sent.job_id}: {sent.entrypoint}", flush=True)
    if args.no_wait:
        print(f"watch it with `ssl-dist logs {sent.job_id} --follow --address {submit.resolve_address(args.address)}`")
        return 0
    try:
        return submit.follow(jobs, sent.job_id)
    except KeyboardInterrupt:
        print(f"\nssl-dist: stopped watching; job {sent.job_id} goes on (`ssl-dist stop {sent.job_id}` stops it)",
              file=sys.stderr)
        return 130


def cmd_status(args) -> int:
    from ssl_dist import submit

    rows = submit.status(args.address, args.job_id)
    if args.json:
        print(json.dumps(rows))
    for row in rows:
        print(f"{row['job_id']}  {row['status']}  {row['entrypoint']}" +
              (f"\n    {row['message']}" if args.job_id and row["message"] else ""))
    return 0


def cmd_logs(args) -> int:
    from ssl_dist import submit

    return submit.logs(args.address, args.job_id, follow_logs=args.follow)


def cmd_stop(args) -> int:
    from ssl_dist import submit

    was_running = submit.stop(args.address, args.job_id)
    print(f"job {args.job_id}: " + ("stop requested" if was_running else "was not running"))
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (a clear usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def cmd_quickstart(args) -> None:
    from ssl_dist import quickstart

    quickstart.run(args.out, args.overrides, method=args.method, per_class=args.per_class,
                   delete_previous=args.delete_previous)


def cmd_config(args) -> None:
    from ssl_dist import config

    cfg = config.load(args.config, args.overrides)
    print(config.describe(cfg) if args.describe else config.dump_yaml(cfg), end="")


def cmd_sweep(args) -> int:
    from ssl_dist import config, sweep

    cfg = config.load(args.config, args.overrides)
    result = sweep.run_sweep(cfg, args.param, metric=args.metric, samples=args.samples, name=args.name,
                             grace_evals=args.grace_evals, reduction_factor=args.reduction_factor,
                             max_concurrent=args.max_concurrent, out=args.out, address=args.address,
                             explain=user_error_message)
    return 0 if result.best is not None else 1


def build_parser() -> argparse.ArgumentParser:
    """The `ssl-dist` argument parser: one sub-command per job, each handled by its cmd_ function."""
    parser = argparse.ArgumentParser(prog="ssl-dist", description="Contrastive self-supervised pretraining at scale.")
    sub = parser.add_subparsers()
    add_run_commands(sub)
    add_sweep_command(sub)
    add_checkpoint_commands(sub)
    add_finetune_command(sub)
    add_job_commands(sub)
    add_shard_commands(sub)
    return parser


def add_run_commands(sub) -> None:
    """quickstart, pretrain, config: runs on this machine's Ray (or RAY_ADDRESS)."""
    p = sub.add_parser("quickstart", help="make a synthetic dataset, pretrain on local Ray, compare to random init "
                                          "(simclr: kNN; clip: zero-shot and retrieval)")
    p.add_argument("--out", default="runs/quickstart", help="folder for the data and the run (default: %(default)s)")
    p.add_argument("--method", choices=("simclr", "clip"), default="simclr",
                   help="simclr: an encoder on the shapes, kNN top-1; clip: image and text towers on the captioned "
                        "shapes, zero-shot top-1 and retrieval recall (default: %(default)s)")
    p.add_argument("--per-class", type=positive_int, default=1000, metavar="N",
                   help="training images of each shape; the test split gets a fifth as many (default: %(default)s)")
    p.add_argument("--delete-previous", action="store_true",
                   help="delete what an earlier quickstart wrote in its run folder, instead of moving it to "
                        "<run>.previous-<UTC time>")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=50")
    p.set_defaults(handler=cmd_quickstart)

    p = sub.add_parser("pretrain", help="run a pretraining job on Ray (local, or RAY_ADDRESS / --address)")
    p.add_argument("--config", help="YAML file overriding the defaults (see `ssl-dist config --describe`)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="--resume: continue from the run folder's newest complete checkpoint, an error if there is "
                        "none; --no-resume: start over, moving what the previous run wrote in the run folder to "
                        "<run>.previous-<UTC time>; neither: resume if there is a checkpoint, else start")
    p.add_argument("--delete-previous", action="store_true",
                   help="with --no-resume: delete what the previous run wrote (checkpoints, metrics, records, "
                        "config.yaml, Ray Train's files) instead of moving it aside; nothing else is touched")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after --config")
    p.set_defaults(handler=cmd_pretrain)

    p = sub.add_parser("config", help="print the resolved config (or every key with its documentation)")
    p.add_argument("--config", help="YAML file overriding the defaults")
    p.add_argument("--describe", action="store_true", help="list every key with its documentation")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(handler=cmd_config)


def add_sweep_command(sub) -> None:
    """sweep: a Ray Tune search whose trials are ordinary runs."""
    p = sub.add_parser("sweep", help="search hyperparameters with Ray Tune, ASHA stopping trials early on the periodic "
                                     "evaluation (eval.every); each trial is an ordinary run with its own folder")
    p.add_argument("--config", help="YAML file overriding the defaults: what every trial shares")
    p.add_argument("--param", action="append", default=[], required=True, metavar="KEY=DIST(ARGS)",
                   help="a swept key, repeatable: uniform(low,high), loguniform(low,high), randint(low,high) "
                        "(high not drawn), choice(a,b,...) or grid(a,b,...), e.g. 'optim.lr=loguniform(1e-4,1e-2)'")
    p.add_argument("--samples", type=positive_int, default=8,
                   help="trials drawn (with grid values: times each grid is searched) (default: %(default)s)")
    p.add_argument("--metric", default="knn_top1",
                   help="evaluation score ranking the trials: knn_top1 or zero_shot_top1 (default: %(default)s)")
    p.add_argument("--name", help="the sweep's name: trials run as <name>-<trial id>, Tune's state goes to "
                                  "<storage>/<name>.tune (default: run.name)")
    p.add_argument("--grace-evals", type=positive_int, default=1,
                   help="evaluations every trial gets before ASHA may stop it (default: %(default)s)")
    p.add_argument("--reduction-factor", type=positive_int, default=2,
                   help="ASHA keeps the best 1 in this many trials at each rung (default: %(default)s)")
    p.add_argument("--max-concurrent", type=positive_int, default=None,
                   help="trials at a time (default: as many as the cluster's CPUs and GPUs hold)")
    p.add_argument("--out", metavar="FILE", help="the best trial's config (default: <storage>/<name>-best.yaml for "
                                                 "local storage, ./<name>-best.yaml for a bucket)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after --config")
    p.set_defaults(handler=cmd_sweep)


def add_checkpoint_commands(sub) -> None:
    """export, evaluate: read a checkpoint, no Ray needed."""
    p = sub.add_parser("export", help="write a checkpoint's encoder as fp32 safetensors + JSON (no DeepSpeed, no Ray "
                                      "needed to load it)")
    p.add_argument("checkpoint", help="checkpoint folder URL (…/checkpoint-NNNNNNNN), or a run folder (its newest "
                                      "complete checkpoint)")
    p.add_argument("out", help="output folder (local or s3://…)")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("evaluate", help="kNN / linear-probe top-1 of a checkpoint's encoder on labeled shards; "
                                        "zero-shot top-1 and retrieval recall of an image-text model")
    p.add_argument("checkpoint", help="checkpoint folder URL (…/checkpoint-NNNNNNNN)")
    p.add_argument("--train", help="labeled shards for the neighbours (with --test)")
    p.add_argument("--test", help="labeled shards for the queries (with --train)")
    p.add_argument("--zero-shot", metavar="URL", help="labeled shards whose index.json lists the class names: "
                                                      "zero-shot top-1 (clip/siglip checkpoints)")
    p.add_argument("--templates", metavar="FILE", help="zero-shot prompts, one a line with {} for the class name "
                                                       "(default: CLIP's 18 CIFAR-10 prompts)")
    p.add_argument("--retrieval", metavar="URL", help="image-caption shards (KEY.jpg + KEY.txt): image-to-text and "
                                                      "text-to-image recall@1/5/10 (clip/siglip checkpoints)")
    p.add_argument("--max-samples", type=int, default=10000, help="samples read of the --zero-shot and --retrieval "
                                                                  "sets, 0 for all (default: %(default)s)")
    p.add_argument("--k", type=int, default=200, help="neighbours (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="also print the scores as JSON")
    p.add_argument("--linear-probe", action=argparse.BooleanOptionalAction, default=True,
                   help="also fit a logistic regression (scikit-learn) on the frozen features (default: on)")
    p.add_argument("--probe-c", type=float, default=1.0, help="inverse L2 strength of the probe (default: %(default)s)")
    p.add_argument("--probe-max-iter", type=int, default=1000, help="solver iterations of the probe (default: %(default)s)")
    p.set_defaults(handler=cmd_evaluate)


def add_finetune_command(sub) -> None:
    """finetune: the encoder and a linear head on a fraction of the labels, on Ray Train workers."""
    p = sub.add_parser("finetune", help="fine-tune a checkpoint's whole encoder with a linear head on a class-stratified "
                                        "fraction of labeled shards (Ray Train workers); top-1 on the test set next to "
                                        "the same fine-tune from random initialisation")
    p.add_argument("checkpoint", help="checkpoint folder URL (…/checkpoint-NNNNNNNN), or a run folder (its newest "
                                      "complete checkpoint)")
    p.add_argument("--train", required=True, help="labeled shards the subset is drawn from")
    p.add_argument("--test", required=True, help="labeled shards the top-1 is measured on")
    p.add_argument("--label-fraction", type=float, required=True, metavar="F",
                   help="fraction of each class's labels kept, in (0, 1], e.g. 0.01, 0.1, 1.0 (rounded down per class)")
    p.add_argument("--seed", type=int, default=0, help="draws the subset, the head and the order (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=30, help="passes over the subset (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="per worker (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD (Nesterov, momentum 0.9) learning rate, cosine decay "
                                                          "(default: %(default)s)")
    p.add_argument("--workers", type=positive_int, default=1, help="Ray Train workers (default: %(default)s)")
    p.add_argument("--cpus-per-worker", type=positive_int, default=1, help="(default: %(default)s)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--head", metavar="FILE", help="safetensors with 'weight' (classes, features) and 'bias': the "
                                                  "pretrained arm's linear head starts there (e.g. a linear probe's, "
                                                  "LP-FT); the random-init arm always starts from a fresh head")
    p.add_argument("--out", help="folder for subset.json, results.json and the workers' key lists (default: "
                                 "<run folder>/finetune-<fraction>-seed<seed>)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.set_defaults(handler=cmd_finetune)


def add_job_commands(sub) -> None:
    """submit, status, logs, stop: a Ray cluster's Jobs API."""
    address_help = "Ray Jobs API of the cluster, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS)"
    p = sub.add_parser("submit", help="submit a pretraining run to a Ray cluster (Jobs API), stream its logs, "
                                      "exit with its status")
    p.add_argument("--address", help=address_help)
    p.add_argument("--config", help="YAML file overriding the defaults; resolved here and sent as key=value arguments")
    p.add_argument("--installed", action="store_true",
                   help="the cluster's Python already has the project's dependencies (an image built from "
                        "cluster/Dockerfile, a test cluster): send the code only, no pip requirements")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the job (never a secret: names like *KEY*, *TOKEN*, *SECRET* "
                        "are refused)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the job's driver")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following it")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after --config")
    p.set_defaults(handler=cmd_submit)

    p = sub.add_parser("status", help="status of a submitted job (or of every job on the cluster)")
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address", help=address_help)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("logs", help="logs of a submitted job")
    p.add_argument("job_id")
    p.add_argument("--address", help=address_help)
    p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends; exit with its status")
    p.set_defaults(handler=cmd_logs)

    p = sub.add_parser("stop", help="stop a submitted job")
    p.add_argument("job_id")
    p.add_argument("--address", help=address_help)
    p.set_defaults(handler=cmd_stop)


def add_shard_commands(sub) -> None:
    """shards make / index / check."""
    shards = sub.add_parser("shards", help="make, index and check WebDataset shards").add_subparsers()
    p = shards.add_parser("make", help="image folder (ImageFolder layout and/or x.txt captions beside x.jpg) or a "
                                       "tar of one -> shards + index.json")
    p.add_argument("src")
    p.add_argument("dest", help="local folder or s3://bucket/prefix")
    p.add_argument("--samples-per-shard", type=int, default=None)
    p.add_argument("--shard-bytes", type=int, default=256 * 2**20)
    p.add_argument("--workers", type=int, default=4, help="shards written in parallel")
    p.add_argument("--overwrite", action="store_true", help="replace shards already at DEST")
    p.add_argument("--captions", metavar="FILE", default=None,
                   help="CSV, TSV, JSONL or Parquet (by extension) of image paths relative to SRC and their captions")
    p.add_argument("--image-column", default="image", help="column of --captions holding the image path")
    p.add_argument("--caption-column", default="caption", help="column of --captions holding the caption")
    p.add_argument("--max-image-bytes", type=int, default=2**30,
                   help="image files larger than this are left out (and reported): no training image is that large")
    p.set_defaults(handler=cmd_shards_make)
    p = shards.add_parser("index", help="write sidecar offsets and index.json for shards made elsewhere")
    p.add_argument("url")
    p.add_argument("--workers", type=int, default=8)
    p.set_defaults(handler=cmd_shards_index)
    p = shards.add_parser("check", help="decode every sample; report counts and problems")
    p.add_argument("url")
    p.add_argument("--workers", type=int, default=4)
    p.set_defaults(handler=cmd_shards_check)


if __name__ == "__main__":
    sys.exit(main())
