"""Dynamic batching for a model worker thread: the texts of concurrent requests are merged into padded batches
under a size, token and padding budget, and each request gets its rewards back on its own event loop. Used by
`qrm serve`; independent of HTTP."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class _Item:
    ids: Sequence[int]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


def _settle(future: asyncio.Future, value: float | None, error: BaseException | None) -> None:
    if future.done():  # the request was cancelled (client gone)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class DynamicBatcher:
    """Merges the texts of concurrent requests into batches for one model worker thread.

    The worker takes the first waiting text, waits up to `max_wait_ms` for more (less once a batch is full), takes
    whatever else is already queued, sorts it all by length and scores it in batches of at most `max_batch_size`
    texts, `max_batch_tokens` padded tokens and `max_padding` padding, one forward pass each, under
    `torch.inference_mode`.

    Args:
        score (`Callable[[list[Sequence[int]]], list[float]]`): rewards of one batch of token id sequences.
        max_batch_size (`int`, *optional*, defaults to `64`): most texts per forward pass.
        max_batch_tokens (`int`, *optional*, defaults to `16384`): most padded tokens per forward pass.
        max_wait_ms (`float`, *optional*, defaults to `5.0`): wait for more texts after the first of a batch.
        max_padding (`float`, *optional*, defaults to `0.25`): most padded ÷ real tokens − 1 in a batch.
    """

    def __init__(
        self,
        score: Callable[[list[Sequence[int]]], list[float]],
        max_batch_size: int = 64,
        max_batch_tokens: int = 16384,
        max_wait_ms: float = 5.0,
        max_padding: float = 0.25,
    ):
        self._score = score
        self.max_padding = max(0.0, max_padding)
        self.max_batch_size = max(1, max_batch_size)
        self.max_batch_tokens = max(1, max_batch_tokens)
        self.max_wait = max(0.0, max_wait_ms) / 1000
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="qrm-serve-model", daemon=True)
        self.stats = {"texts": 0, "batches": 0, "largest_batch": 0, "queued_texts": 0}
        self._stats_lock = threading.Lock()  # updated from the event loop and from the worker

    def start(self) -> None:
        """Start the model worker thread."""
        self._thread.start()

    def stop(self) -> None:
        """Score everything queued so far, then stop the worker (blocks until it has)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    async def score(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        """Rewards of `sequences`, scored together with whatever other requests are waiting."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in sequences]
        with self._stats_lock:
            self.stats["queued_texts"] += len(futures)
        for ids, fut in zip(sequences, futures, strict=True):
            self._queue.put(_Item(ids, fut, loop))
        return list(await asyncio.gather(*futures))

    def _full(self, count: int, width: int) -> bool:
        return count >= self.max_batch_size or count * width >= self.max_batch_tokens

    def _collect(self) -> tuple[list[_Item], bool]:
        """(items to score now, whether stop() was called)."""
        first = self._queue.get()
        if first is None:
            return [], True
        items, width = [first], len(first.ids)
        deadline = time.monotonic() + self.max_wait
        cap = 8 * self.max_batch_size  # a burst is sorted by length as a whole, up to 8 batches of it
        while len(items) < cap:
            remaining = deadline - time.monotonic()
            try:
                if remaining > 0 and not self._full(len(items), width):
                    item = self._queue.get(timeout=remaining)
                else:  # batch full or wait over: take only what is already queued
                    item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return items, True
            items.append(item)
            width = max(width, len(item.ids))
        return items, False

    def _batches(self, items: list[_Item]) -> list[list[_Item]]:
        items = sorted(items, key=lambda it: len(it.ids))
        batches: list[list[_Item]] = [[]]
        real = 0
        for it in items:  # ascending length: `it` would set the width of the current batch
            cur, width = batches[-1], len(it.ids)
            padded = (len(cur) + 1) * width
            if cur and (
                len(cur) + 1 > self.max_batch_size
                or padded > self.max_batch_tokens
                or padded > (1 + self.max_padding) * (real + width)
            ):
                batches.append(cur := [])
                real = 0
            cur.append(it)
            real += width
        return [b for b in batches if b]

    def _run(self) -> None:
        import torch

        stop = False
        while not stop:
            items, stop = self._collect()
            for batch in self._batches(items):
                error, rewards = None, None
                try:
                    with torch.inference_mode():
                        rewards = self._score([it.ids for it in batch])
                except Exception as e:  # answer every waiting request with the error; the worker keeps running
                    logger.exception("qrm serve: a batch of %d texts failed", len(batch))
                    error = e
                with self._stats_lock:
                    self.stats["texts"] += len(batch)
                    self.stats["queued_texts"] -= len(batch)
                    self.stats["batches"] += 1
                    self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
                for k, it in enumerate(batch):
                    value = None if rewards is None else rewards[k]
                    try:
                        it.loop.call_soon_threadsafe(_settle, it.future, value, error)
                    except RuntimeError:  # that request's event loop is closed
                        pass
