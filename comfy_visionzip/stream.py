"""Overlapping decode with encode: a bounded queue filled by one background thread.

PyAV decodes and torch computes with the GIL released, so while the encoder works on chunk k the
thread decodes chunk k+1. The queue holds at most ``depth`` chunks, so memory stays bounded by
(depth + 2) chunks whatever the length of the video: the one being encoded, the ones waiting, and
the one being decoded. Errors in the thread (a corrupt file) are raised in the consumer, at the
point where the failing chunk would have arrived; when the consumer stops early (cancel, an
error in the encoder) the thread stops at its next chunk and closes the decoder.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class _Done:
    """The end of the items (a class of its own so that the queue's item type says what it holds)."""


_DONE = _Done()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead of the consumer.

    ``depth=0`` iterates in the caller's thread (no overlap), e.g. for debugging.
    """
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue[T | _Done | _Failed] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: T | _Done | _Failed) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not put(item):
                    break
            else:
                put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(_Failed(e))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()  # a generator's finally blocks (the decoder's container) run in this thread

    worker = threading.Thread(target=produce, name="visionzip-decode", daemon=True)
    worker.start()
    try:
        while True:
            item = slots.get()
            if isinstance(item, _Done):
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # drain so a blocked put() sees the stop flag promptly
            try:
                slots.get_nowait()
            except queue.Empty:
                pass
            worker.join(timeout=0.05)
