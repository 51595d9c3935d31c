"""Batches from a loader worker to the training process through a ring of shared-memory slots.

torch's DataLoader hands each tensor of each batch over as a new shared-memory segment: the
worker copies the tensor into a fresh segment (and faults its pages in), and the training
process fetches the segment's file descriptor over a socket connection to the worker, one
connection per tensor per batch. For a CIFAR batch (256 x 3 x 32 x 32 uint8, the labels and
the mask) passed alone through a one-worker DataLoader that is 11-12.6 us of CPU per sample
(4.0-4.7 in the training process, 7.0-7.8 in the worker), about what decoding the sample costs;
through the slots below, 2.4-2.5 (1.2-1.3 on each side). At 224 px the two ways cost about the
same in all (150-160 us per sample), but the slots put more of it in the training process (its
copy out: 93 us, against 31).

Here each loader worker keeps a ring of `slots` shared buffers. A batch's tensors are copied
into the next free buffer, and only the slot's number and the tensors' places in it (offset,
dtype, shape) go through the DataLoader's pipe with the rest of the batch. A buffer crosses
once, when it is made or grown: the training process keeps it, copies the batch's tensors
out (one memcpy each, so what the training step holds never aliases a slot) and marks the
slot free in a shared flag array, which went over with the worker's first batch. A worker
whose next slot is still held waits for it: the DataLoader's prefetch bound keeps at most
`prefetch_factor` batches of a worker in flight, so with `prefetch_factor + 2` slots it
does not wait in practice. Lists of tensors (images of different sizes) and everything that
is not a tensor go the DataLoader's usual way.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch

ALIGN = 64  # bytes: every tensor in a slot starts at a multiple of this (any dtype's alignment, a cache line)
GROWTH = 1.25  # a buffer that is too small is replaced by one this much larger than needed
SLOT_KEY = "__slot__"


def _tensors(value: Any) -> tuple[torch.Tensor, ...] | None:
    """The tensors a batch field is made of, when it is one tensor or a tuple of tensors; else None."""
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
        return value
    return None


class Sender:
    """The worker's side: `pack(batch)` moves its tensor fields into the next free slot.

    One per loader worker (made in the worker, by `stream.ShardStream`), `slots` buffers.
    """

    def __init__(self, worker: int, slots: int):
        self.worker, self.slots = worker, slots
        self.flags = torch.zeros(slots, dtype=torch.int32).share_memory_()  # 1: the training process holds it
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.next = 0
        self.flags_sent = False
        self.parent = os.getppid()

    def pack(self, batch: dict) -> dict:
        """`batch` with its tensor fields (tensors, tuples of tensors) replaced by their places in a slot,
        under `SLOT_KEY`: (worker, slot, {field: (is a tuple, [(offset, dtype, shape), ...])}, new buffer or None,
        the flag array or None). Other fields are left as they are."""
        fields = {name: parts for name, value in batch.items() if (parts := _tensors(value)) is not None}
        if not fields:
            return batch
        places, end = {}, 0
        for name, parts in fields.items():
            spots = []
            for part in parts:
                spots.append((end, part.dtype, tuple(part.shape)))
                end += -(-part.numel() * part.element_size() // ALIGN) * ALIGN
            places[name] = (isinstance(batch[name], tuple), spots)
        slot = self.next
        self.next = (slot + 1) % self.slots
        self._wait_free(slot)
        buffer, fresh = self.buffers[slot], None
        if buffer is None or buffer.numel() < end:
            buffer = fresh = torch.empty(int(end * GROWTH) + ALIGN, dtype=torch.uint8).share_memory_()
            self.buffers[slot] = buffer
        for name, parts in fields.items():
            for part, (offset, dtype, shape) in zip(parts, places[name][1]):
                _view(buffer, offset, dtype, shape).copy_(part)
        self.flags[slot] = 1
        packed = {name: value for name, value in batch.items() if name not in fields}
        packed[SLOT_KEY] = (self.worker, slot, places, fresh, None if self.flags_sent else self.flags)
        self.flags_sent = True
        return packed

    def _wait_free(self, slot: int) -> None:
        pause = 1e-4
        while int(self.flags[slot]) != 0:
            if os.getppid() != self.parent:  # the training process is gone: nobody will free it
                raise RuntimeError("the training process exited while this loader worker waited for a batch slot")
            time.sleep(pause)
            pause = min(pause * 2, 5e-3)


class Receiver:
    """The training process's side: `unpack(batch)` copies a packed batch's tensors out of its slot and
    frees the slot. One per DataLoader (per set of loader workers), made by the Loader."""

    def __init__(self):
        self.flags: dict[int, torch.Tensor] = {}
        self.buffers: dict[tuple[int, int], torch.Tensor] = {}

    def unpack(self, batch: dict) -> dict:
        """`batch` as the worker made it, its tensors copies of the slot's (the slot is free again)."""
        if SLOT_KEY not in batch:
            return batch
        worker, slot, places, fresh, flags = batch.pop(SLOT_KEY)
        if flags is not None:
            self.flags[worker] = flags
        if fresh is not None:
            self.buffers[(worker, slot)] = fresh
        buffer = self.buffers[(worker, slot)]
        for name, (is_tuple, spots) in places.items():
            tensors = tuple(_view(buffer, offset, dtype, shape).clone() for offset, dtype, shape in spots)
            batch[name] = tensors if is_tuple else tensors[0]
        self.flags[worker][slot] = 0
        return batch


def _view(buffer: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """The tensor of `dtype` and `shape` that starts `offset` bytes into the uint8 `buffer`."""
    return buffer[offset:offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
