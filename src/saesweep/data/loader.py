"""Training batches streamed from activation shards, in a seeded random order.

The stream of epoch e: shards in the order of a permutation drawn from (seed, e);
consecutive groups of ``group_shards`` shards are read together and their rows shuffled
by a permutation drawn from (seed, e, group) — a shuffle buffer across shards; batches
are cut from the concatenation of the shuffled groups. The stream therefore depends
only on the seed and the manifest, and a resumed run that starts at token offset t sees
exactly the batches an uninterrupted run sees from t on. A background thread reads and
shuffles the next group while the current one is consumed.

Every batch is whole: a budget T that is not a multiple of the batch size B ends at
``end`` = start + ⌊(T − start) / B⌋·B, and the last T − end tokens are dropped (not folded
into the last step, which would make one step, and its memory, up to twice as large). So
no step, and no logged point, comes from a smaller batch than the others.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Iterator

import numpy as np
import torch

from saesweep.data.activations import ActivationStore
from saesweep.core.errors import UserError
from saesweep.core.normalisation import GLOBAL, normalise


def seeded_generator(*parts: int) -> np.random.Generator:
    """A NumPy generator determined by a tuple of integers."""
    return np.random.default_rng(np.random.SeedSequence(list(parts)))


def whole_batches_end(start: int, budget: int, batch_size: int) -> int:
    """The token count after the last whole batch of ``batch_size`` from ``start`` within
    ``budget``: start + ⌊(budget − start) / B⌋·B (``start`` when none fits)."""
    return start + max(0, budget - start) // batch_size * batch_size


class BatchStream:
    """Batches of exactly ``batch_size`` normalised activations (float32, on ``device``)
    from token offset ``start`` up to ``end``, the last whole batch within ``budget`` tokens
    (the rest is dropped); past the extracted tokens it starts a new epoch
    (``on_exhausted="cycle"``) or refuses to start (``"error"``). ``normalisation``: the map
    of ``core.normalisation`` (the store's μ and s for ``global``)."""

    def __init__(
        self,
        store: ActivationStore,
        batch_size: int,
        seed: int,
        budget: int,
        *,
        device: torch.device,
        start: int = 0,
        on_exhausted: str = "cycle",
        group_shards: int = 4,
        normalisation: str = GLOBAL,
    ) -> None:
        if budget > store.tokens and on_exhausted == "error":
            raise UserError(
                f"a cell asks for {budget} training tokens but {store.folder} holds {store.tokens}; "
                "raise activations.train_tokens or set activations.on_exhausted: cycle"
            )
        self.store, self.batch_size, self.seed = store, batch_size, seed
        self.budget, self.start, self.device = budget, start, device
        self.end = whole_batches_end(start, budget, batch_size)
        if self.end <= start < budget:
            raise UserError(
                f"{budget - start} training tokens from token {start} hold no whole batch of {batch_size}: "
                "raise train.tokens or lower train.batch_size"
            )
        self.group_shards, self.normalisation = group_shards, normalisation
        self.mean = store.mean.to(device)
        self.scale = store.scale
        if budget > store.tokens:
            print(
                f"the budget of {budget} tokens is {budget / store.tokens:.2f} epochs of the "
                f"{store.tokens} extracted tokens: the data will be cycled",
                file=sys.stderr,
            )

    def epoch_groups(self, epoch: int) -> list[list[int]]:
        """Shard indices of each read group of an epoch, in stream order."""
        order = seeded_generator(self.seed, epoch).permutation(len(self.store.shards)).tolist()
        return [order[i : i + self.group_shards] for i in range(0, len(order), self.group_shards)]

    def group_rows(self, epoch: int, group_index: int, shards: list[int]) -> np.ndarray:
        """The rows of a group's shards, shuffled by the group's permutation."""
        rows = np.concatenate([self.store.read(index) for index in shards])
        return rows[seeded_generator(self.seed, epoch, group_index).permutation(len(rows))]

    def chunks(self) -> Iterator[np.ndarray]:
        """Shuffled rows from token offset ``start`` to ``end``, one group at a time."""
        position = 0
        epoch = 0
        while position < self.end:
            for group_index, shards in enumerate(self.epoch_groups(epoch)):
                size = sum(self.store.shards[i].tokens for i in shards)
                end = position + size
                if end > self.start and position < self.end:
                    rows = self.group_rows(epoch, group_index, shards)
                    yield rows[max(0, self.start - position) : self.end - position]
                position = end
                if position >= self.end:
                    return
            epoch += 1

    def prefetched_chunks(self) -> Iterator[np.ndarray]:
        """``chunks`` produced by a background thread, one group ahead; the thread ends
        when the consumer stops early."""
        buffer: queue.Queue = queue.Queue(maxsize=1)
        failure: list[BaseException] = []
        finished = object()
        stop = threading.Event()

        def hand_over(item: object) -> bool:
            while not stop.is_set():
                try:
                    buffer.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for chunk in self.chunks():
                    if not hand_over(chunk):
                        return
            except BaseException as error:  # handed to the consumer
                failure.append(error)
            hand_over(finished)

        threading.Thread(target=produce, daemon=True).start()
        try:
            while (chunk := buffer.get()) is not finished:
                yield chunk
        finally:
            stop.set()
        if failure:
            raise failure[0]

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Normalised batches x (``core.normalisation``), each of ``batch_size`` rows."""
        carry = np.empty((0, self.store.d), dtype=np.float32)
        for chunk in self.prefetched_chunks():
            if len(carry):
                chunk = np.concatenate([carry, chunk])
            whole = len(chunk) - len(chunk) % self.batch_size
            for offset in range(0, whole, self.batch_size):
                yield self.to_batch(chunk[offset : offset + self.batch_size])
            carry = chunk[whole:]

    def to_batch(self, rows: np.ndarray) -> torch.Tensor:
        """Storage rows → normalised float32 tensor on the device (pinned when CUDA)."""
        tensor = torch.from_numpy(np.ascontiguousarray(rows))
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        return normalise(tensor.float(), self.normalisation, self.mean, self.scale)
