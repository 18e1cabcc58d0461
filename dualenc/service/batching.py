"""One encoder shared by many request threads: calls queue up and run together on one thread.

Requests that arrive while the encoder is busy are embedded together in the next batch (up to
`max_batch`), so TensorFlow sees one call at a time and 32 concurrent clients cost a few
batched calls instead of 32 competing ones. A lone request waits for nothing: the worker
takes whatever is queued when it becomes free. At inference no layer mixes rows (padding is
masked, normalisation uses stored statistics), so an answer does not change with the load.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np
import tensorflow as tf

from dualenc.export.encoders import LoadedEncoder

DEFAULT_MAX_BATCH = 32


class EmbeddingBatcher:
    """`embed(input)` from any thread → that input's unit embedding ``[D]``."""

    def __init__(self, encoder: LoadedEncoder, max_batch: int = DEFAULT_MAX_BATCH):
        self.encoder = encoder
        self.max_batch = max_batch
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._serve, name=f"embed-{encoder.path.name}", daemon=True)
        self._worker.start()

    def embed(self, item: bytes | str, timeout: float | None = None) -> np.ndarray:
        """The embedding of one input; re-raises the encoder's error for this input alone.

        `TimeoutError` after `timeout` seconds; the request is then dropped from the queue if it
        has not started, so a backlog of abandoned requests costs no encoder time."""
        future: Future = Future()
        self._requests.put((item, future))
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no embedding within {timeout} s") from None

    def close(self) -> None:
        """Finish the queued requests and stop the worker thread."""
        self._requests.put(None)
        self._worker.join()

    def _serve(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:
                return
            batch = [request]
            stopping = False
            while len(batch) < self.max_batch:
                try:
                    request = self._requests.get_nowait()
                except queue.Empty:
                    break
                if request is None:
                    stopping = True
                    break
                batch.append(request)
            batch = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
            if batch:
                self._run(batch)
            if stopping:
                return

    def _run(self, batch: Sequence[tuple[bytes | str, Future]]) -> None:
        try:
            embeddings = self.encoder.embed_batch([item for item, _ in batch])
        except tf.errors.OpError as exc:
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            # One bad input (an image TensorFlow cannot decode) fails the whole batch: retry
            # each alone so only its own request gets the error.
            for request in batch:
                self._run([request])
            return
        except Exception as exc:  # a bug: report it to every waiting request, keep serving
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), embedding in zip(batch, embeddings):
            future.set_result(embedding)
