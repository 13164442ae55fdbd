"""The next steps' batches made in a background thread while the current step runs.

Reading records, decoding their images, tokenizing and collating take host time every step;
made in the training loop's thread, the step waits for them (on a GPU, the device idles).
:class:`Prefetcher` calls a step's ``make()`` function in one background thread, up to
``depth`` steps ahead, and hands the results over in order; ``depth = 0`` calls it in
:meth:`Prefetcher.get` instead (no thread).

Exactness: ``make`` runs exactly ``count`` times, in order, in one thread, so the datasets
are read in the same order as without prefetching; the producer's position in the streams
runs ahead of the steps taken, so ``make`` returns the streams' positions *after its own
batches* with them, and checkpoints record the positions of the last step taken (see
:class:`~flamingo_rt.runtime.train.Trainer`). An exception in ``make`` is raised by the
:meth:`Prefetcher.get` that would have returned its item.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Optional, TypeVar

__all__ = ["Prefetcher"]

T = TypeVar("T")


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetcher(Generic[T]):
    """Calls ``make()`` ``count`` times, in order, at most ``depth`` items ahead of :meth:`get`
    (made, or being made, and not yet taken).

    Args:
        make: produces one step's item (called from the background thread when depth > 0).
        count: how many items to make in all (the steps left).
        depth: items made ahead (0: ``make`` runs inside :meth:`get`, no thread).
        threads: torch's intra-op threads in the background thread (``torch.set_num_threads``
            there; OpenMP's thread count is a per-thread setting, so the training loop's own
            ops keep theirs), None to leave it. One by default: two OpenMP pools on the
            same cores slow the step more than the batches' ops gain.
    Use as a context manager or call :meth:`close` (stops the thread after the item it is
    making).
    """

    def __init__(self, make: Callable[[], T], count: int, depth: int = 1, threads: Optional[int] = 1):
        if int(depth) < 0:
            raise ValueError(f"expected a prefetch depth >= 0, got {depth}")
        if int(count) < 0:
            raise ValueError(f"expected an item count >= 0, got {count}")
        self._make, self._count, self.depth, self.threads = make, int(count), int(depth), threads
        self._taken = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if self.depth > 0 and self._count > 0:
            self._queue: queue.Queue = queue.Queue()
            self._slots = threading.Semaphore(self.depth)  # items made and not yet taken
            self._thread = threading.Thread(target=self._run, name="flamingo_rt-prefetch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        if self.threads is not None:
            import torch

            torch.set_num_threads(int(self.threads))
        for _ in range(self._count):
            while not self._slots.acquire(timeout=0.1):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            try:
                item = self._make()
            except BaseException as e:  # handed to the consumer, raised there
                item = _Failed(e)
            self._queue.put(item)
            if isinstance(item, _Failed):
                return

    def get(self) -> T:
        """The next item (waits for it); raises what ``make`` raised for it, and IndexError
        after ``count`` items."""
        if self._taken >= self._count:
            raise IndexError(f"all {self._count} prefetched items were taken")
        if self._thread is None:
            item = self._make()
        else:
            while True:
                try:
                    item = self._queue.get(timeout=0.1)
                    break
                except queue.Empty:
                    if not self._thread.is_alive() and self._queue.empty():
                        raise RuntimeError("the prefetch thread stopped without an item") from None
            self._slots.release()
        self._taken += 1
        if isinstance(item, _Failed):
            self._taken = self._count  # nothing follows a failure
            raise item.exc
        return item

    def close(self) -> None:
        """Stop the thread (after the item it is making) and drop what it made ahead."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
