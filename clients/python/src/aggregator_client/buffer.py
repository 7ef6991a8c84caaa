"""A bounded queue between threads that log and the one thread that sends (for the handler).

Putting never waits unless asked to: when the queue is full the oldest item
makes room and is counted as dropped (or, with `block`, the putter waits for
room). The sender takes batches: as many as are there up to a size, once the
batch is full or its first item has waited `linger` seconds. Items taken stay
pending until the sender says they are done, so `wait_done` (a flush) sees
the batch in flight too.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generic
from typing import TypeVar

T = TypeVar("T")


class RecordBuffer(Generic[T]):
    """A bounded FIFO with drop-oldest (counted) or blocking puts, and lingering batch takes."""

    def __init__(self, capacity: int, *, block: bool = False) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.block = block
        self.dropped = 0
        self._items: deque[tuple[float, T]] = deque()
        self._in_flight = 0
        self._flushes = 0
        self._closed = False
        self._changed = threading.Condition(threading.Lock())

    @property
    def closed(self) -> bool:
        """Say whether the buffer takes no more items."""
        return self._closed

    def pending(self) -> int:
        """Return how many items are queued or taken and not yet done."""
        with self._changed:
            return len(self._items) + self._in_flight

    def put(self, item: T) -> bool:
        """Queue `item`; False when it was not queued (the buffer is closed)."""
        with self._changed:
            if self.block:
                while len(self._items) >= self.capacity and not self._closed:
                    self._changed.wait()
            if self._closed:
                self.dropped += 1
                return False
            if len(self._items) >= self.capacity:
                self._items.popleft()
                self.dropped += 1
            self._items.append((time.monotonic(), item))
            self._changed.notify_all()
            return True

    def take(self, size: int, linger: float, idle: float = 1.0) -> list[T] | None:
        """Return up to `size` items once that many are queued or the first waited `linger` s.

        A flush or close sends what is there at once. Returns [] after `idle`
        seconds with nothing queued (so the caller can look around), and None
        once the buffer is closed and empty.
        """
        with self._changed:
            deadline = time.monotonic() + idle
            while not self._items:
                if self._closed:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._changed.wait(left)
            while len(self._items) < size and not self._closed and not self._flushes:
                left = self._items[0][0] + linger - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            count = min(size, len(self._items))
            batch = [self._items.popleft()[1] for _ in range(count)]
            self._in_flight += count
            self._changed.notify_all()
            return batch

    def done(self, count: int) -> None:
        """Say that `count` taken items are finished with (sent, refused or given up)."""
        with self._changed:
            self._in_flight -= count
            self._changed.notify_all()

    def drain(self) -> list[T]:
        """Remove and return every queued item (for giving them up)."""
        with self._changed:
            items = [item for _, item in self._items]
            self._items.clear()
            self._changed.notify_all()
            return items

    def wait_done(self, timeout: float) -> bool:
        """Send what is queued at once and wait until nothing is pending; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            self._flushes += 1
            self._changed.notify_all()
            try:
                while self._items or self._in_flight:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._changed.wait(left)
                return True
            finally:
                self._flushes -= 1

    def close(self) -> None:
        """Take no more items; what is queued is still handed out, without lingering."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
