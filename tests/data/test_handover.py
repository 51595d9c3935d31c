"""handover.py: batches through a ring of shared slots, from real DataLoader workers to this process.

The batches arrive exact (every dtype, tuples of tensors, other fields untouched) when sizes grow
and a slot's buffer is remade, when there are more batches than slots and the consumer keeps
every batch it got, and a worker waits for a slot the training process still holds.
"""

from __future__ import annotations

import threading
import time

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ssl_dist.data import handover


def made(worker: int, n: int) -> dict:
    """Batch `n` of worker `worker`: its sizes grow every few batches, so the slots' buffers are remade."""
    g = torch.Generator().manual_seed(1000 * worker + n)
    rows = 4 + 3 * (n // 3)
    return {"image": torch.randint(0, 256, (rows, 3, 5, 5), generator=g, dtype=torch.uint8),
            "cls": torch.randint(0, 10, (rows,), generator=g),
            "__valid__": torch.rand(rows, generator=g) > 0.3,
            "views": (torch.randn(rows, 2, generator=g), torch.randn(rows, 3, generator=g).double()),
            "odd": torch.randn(rows, 3, generator=g).t(),  # not contiguous
            "__key__": [f"w{worker}-{n}-{i}" for i in range(rows)], "__batch__": (worker, n)}


class Batches(IterableDataset):
    def __init__(self, per_worker: int, slots: int):
        self.per_worker, self.slots = per_worker, slots

    def __iter__(self):
        worker = get_worker_info().id
        sender = handover.Sender(worker, self.slots)
        for n in range(self.per_worker):
            yield sender.pack(made(worker, n))


def same(a: dict, b: dict) -> bool:
    for name in b:
        x, y = a[name], b[name]
        if isinstance(y, torch.Tensor):
            if not (x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif isinstance(y, tuple) and isinstance(y[0], torch.Tensor):
            if not (isinstance(x, tuple) and all(torch.equal(u, v) and u.dtype == v.dtype for u, v in zip(x, y))):
                return False
        elif x != y:
            return False
    return set(a) == set(b)


def test_batches_arrive_exact_through_workers_and_stay_intact_while_held():
    loader = DataLoader(Batches(per_worker=12, slots=2), batch_size=None, num_workers=2, prefetch_factor=1,
                        collate_fn=lambda b: b)
    receiver = handover.Receiver()
    held = [receiver.unpack(batch) for batch in loader]  # all kept: a slot reused under one would show
    assert len(held) == 24
    for batch in held:
        worker, n = batch["__batch__"]
        assert same(batch, made(worker, n)), (worker, n)
    assert all(not batch["image"].is_shared() for batch in held)  # copies, not views of a slot


def test_a_worker_waits_for_the_slot_the_training_process_holds():
    sender, receiver = handover.Sender(0, 1), handover.Receiver()
    first = sender.pack(made(0, 0))
    second: list = []
    thread = threading.Thread(target=lambda: second.append(sender.pack(made(0, 1))))
    thread.start()
    time.sleep(0.3)
    assert not second, "the worker overwrote a slot the training process had not read"
    assert same(receiver.unpack(first), made(0, 0))
    thread.join(timeout=10)
    assert second and same(receiver.unpack(second[0]), made(0, 1))


def test_a_batch_without_tensors_passes_as_it_is():
    sender, receiver = handover.Sender(0, 2), handover.Receiver()
    batch = {"__error__": ("DataError", "a message")}
    assert sender.pack(batch) is batch and receiver.unpack(batch) is batch
