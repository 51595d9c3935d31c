"""open_clip's own trainer (`open_clip_train.main`) with a tap, for benchmarks/clip.py.

    torchrun --standalone --nproc_per_node 2 benchmarks/clip_open_clip_tap.py \
        --model-dir DIR --tap-dir DIR --attempt N [--minutes M] -- <open_clip_train.main flags>

What it adds to open_clip, and nothing else (training, loss, optimizer, data pipeline and
checkpoints are open_clip's, unchanged):

- `open_clip.add_model_config(--model-dir)`: the benchmark's model config JSON becomes a
  model name `--model` can use.
- The tap (instrumented: the training dataloader that `open_clip_train.data.get_wds_dataset`
  returns). Its pipeline's last-but-one stage, `to_tuple("image", "text")`, is replaced by
  `to_tuple("image", "text", "__key__")`, so each batch carries its samples' webdataset keys
  through open_clip's own loader workers; the dataloader is wrapped so that the training loop
  gets `(images, texts)` as before, and batch i's keys are written to
  `tap-dir/attempt-N-rank-R.jsonl` ({"epoch", "batch", "time", "keys"}) when the loop asks
  for batch i + 1, i.e. once step i is done. So the file holds exactly the keys of the steps
  this rank completed, and the time each completed (rank 0's times give samples/s).
- `--minutes M` (> 0): a wall-clock budget like ssl_dist's `train.max_minutes`, counted from
  the first batch asked for in this attempt: once it has passed by rank 0's clock (rank 0
  broadcasts the decision at every step, so both ranks stop at the same step), the epoch ends
  there; open_clip then saves its checkpoint as at any epoch end (`--save-most-recent`:
  `epoch_latest.pt`) and the process exits when the next epoch would start.
- webdataset >= 1.0 ends each shard's stream of files with an empty dict (`eof_value={}`),
  which open_clip_train 3.3's `group_by_keys_nothrow` cannot take (KeyError 'fname' at the
  end of the first shard): its `tar_file_expander` is given `eof_value=None`, the stream
  webdataset 0.2 made, which open_clip was written for.
- On CPU, `DistributedDataParallel` is given no `device_ids` (open_clip passes
  `device_ids=[device]`, which torch refuses for CPU modules).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


class KeyTap:
    """The training dataloader as open_clip's loop sees it (iterable, `num_batches`,
    `num_samples`), recording each completed step's keys; stops the epoch when out of time."""

    def __init__(self, loader, shared_epoch, out: Path, deadline_minutes: float):
        self.loader, self.shared_epoch, self.out = loader, shared_epoch, out
        self.num_batches, self.num_samples = loader.num_batches, loader.num_samples
        self.minutes = deadline_minutes
        self.deadline: float | None = None
        self.out_of_time = False

    def __iter__(self):
        if self.out_of_time:  # the epoch after the budget ran out: its checkpoint is saved
            raise SystemExit(0)
        if self.minutes > 0 and self.deadline is None:
            self.deadline = time.monotonic() + 60 * self.minutes
        epoch = self.shared_epoch.get_value()
        pending = None
        with self.out.open("a") as log:
            for index, (images, texts, keys) in enumerate(self.loader):
                if pending is not None:  # the previous step is done
                    self._write(log, pending)
                if self._stop():
                    self.out_of_time = True
                    return
                pending = {"epoch": epoch, "batch": index, "keys": list(keys)}
                yield images, texts
            if pending is None and not self.out_of_time:  # open_clip would loop over empty epochs
                raise SystemExit(f"epoch {epoch}: no batch at all (are the shards readable at --train-data?)")
            if pending is not None:
                self._write(log, pending)

    @staticmethod
    def _write(log, record: dict) -> None:
        log.write(json.dumps({**record, "time": time.time()}) + "\n")
        log.flush()

    def _stop(self) -> bool:
        """Rank 0's clock decides for every rank (one tiny broadcast per step, as ssl_dist's)."""
        if self.deadline is None:
            return False
        flag = torch.tensor([int(time.monotonic() >= self.deadline)])
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(flag, src=0)
        return bool(flag.item())


def install_tap(tap_dir: Path, attempt: int, minutes: float) -> None:
    import webdataset as wds
    from open_clip_train import data

    original = data.get_wds_dataset

    def get_wds_dataset(args, preprocess_img, is_train, epoch=0, floor=False, tokenizer=None):
        info = original(args, preprocess_img, is_train, epoch=epoch, floor=floor, tokenizer=tokenizer)
        if not is_train:
            return info
        pipeline = info.dataloader.pipeline[0].dataset.pipeline  # WebLoader -> DataLoader -> DataPipeline
        assert "to_tuple" in repr(pipeline[-2]), f"open_clip's pipeline changed: {pipeline[-2]!r}"
        pipeline[-2] = wds.to_tuple("image", "text", "__key__")  # keys ride with their batch
        out = tap_dir / f"attempt-{attempt}-rank-{args.rank}.jsonl"
        info.dataloader = KeyTap(info.dataloader, info.shared_epoch, out, minutes)
        return info

    data.get_wds_dataset = get_wds_dataset  # get_dataset_fn looks it up at call time


def shard_ends_without_marker() -> None:
    import functools

    from open_clip_train import data
    from webdataset import tariterators

    # tarfile_to_samples_nothrow looks tar_file_expander up in open_clip_train.data at call time
    data.tar_file_expander = functools.partial(tariterators.tar_file_expander, eof_value=None)


def ddp_without_cpu_device_ids() -> None:
    from open_clip_train import main as trainer

    ddp = torch.nn.parallel.DistributedDataParallel

    def make(module, device_ids=None, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        return ddp(module, device_ids=device_ids, **kwargs)

    trainer.torch.nn.parallel.DistributedDataParallel = make


def main(argv: list[str]) -> None:
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--tap-dir", required=True)
    parser.add_argument("--attempt", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=0.0)
    ours = parser.parse_args(argv[:split])
    import open_clip
    from open_clip_train import main as trainer

    open_clip.add_model_config(ours.model_dir)
    Path(ours.tap_dir).mkdir(parents=True, exist_ok=True)
    install_tap(Path(ours.tap_dir), ours.attempt, ours.minutes)
    shard_ends_without_marker()
    ddp_without_cpu_device_ids()
    trainer.main(argv[split + 1:])


if __name__ == "__main__":
    main(sys.argv[1:])
