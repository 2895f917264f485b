"""One thread owns the model: it gathers waiting requests into a batch, runs it, answers each.

HTTP handler threads only validate and enqueue; everything that touches the model or its
tokenizer (chat template, decode loop, rendering token strings) runs here, one batch at a
time, so no lock guards the model and a fast tokenizer is never used from two threads.
A new model version is staged with `swap` and taken up between batches: the batch in flight
finishes on the version it started with, and every request enqueued after `swap` returned is
answered by the new one. Nothing queued is dropped by a swap.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from lightspan.serving.generation import LoadedModel, check_context, generate
from lightspan.serving.protocol import APIError, GenerationRequest, Row, invalid, render

log = logging.getLogger(__name__)


@dataclass
class Work:
    """A request waiting for its batch; `future` resolves to the response body."""

    request: GenerationRequest
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """Counters that show batching at work (served on /health)."""

    batches: int = 0
    requests: int = 0
    rows: int = 0
    largest: int = 0
    sizes: Counter = field(default_factory=Counter)  # rows per batch -> number of batches
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, rows: int, requests: int) -> None:
        with self.lock:
            self.batches += 1
            self.requests += requests
            self.rows += rows
            self.largest = max(self.largest, rows)
            self.sizes[rows] += 1

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "batches": self.batches,
                "requests": self.requests,
                "rows": self.rows,
                "largest_batch": self.largest,
                "batch_sizes": {str(size): count for size, count in sorted(self.sizes.items())},
            }


class Scheduler:
    """Gathers up to `max_batch` rows (a request contributes n rows per prompt), waiting at most
    `batch_wait` seconds after the first arrival for company; a single request larger than
    `max_batch` runs alone rather than being refused."""

    def __init__(self, model: LoadedModel, *, max_batch: int = 32, batch_wait: float = 0.005):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._model = model
        self._staged: LoadedModel | None = None
        self._lock = threading.Lock()
        self._queue: queue.Queue[Work] = queue.Queue()
        self._carry: Work | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lightspan-serve-scheduler", daemon=True)
        self.max_batch = max_batch
        self.batch_wait = batch_wait
        self.stats = BatchStats()

    # --- control ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in flight, then refuse what is still queued."""
        self._stopping.set()
        self._thread.join(timeout)
        pending = [self._carry] if self._carry else []
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for work in pending:
            work.future.set_exception(
                APIError("the server is shutting down", status=503, type="server_error")
            )

    @property
    def model(self) -> LoadedModel:
        """The version that will answer the next batch."""
        with self._lock:
            return self._staged or self._model

    def swap(self, model: LoadedModel) -> None:
        """Stage `model`; it answers every batch formed from now on."""
        with self._lock:
            self._staged = model

    def submit(self, request: GenerationRequest) -> Future:
        if self._stopping.is_set():
            raise APIError("the server is shutting down", status=503, type="server_error")
        work = Work(request)
        self._queue.put(work)
        return work.future

    # --- the loop ---------------------------------------------------------------------------------
    def _take_model(self) -> LoadedModel:
        with self._lock:
            if self._staged is not None:
                log.info("now serving %s (was %s)", self._staged.id, self._model.id)
                self._model, self._staged = self._staged, None
            return self._model

    def _gather(self) -> list[Work]:
        if self._carry is not None:
            first, self._carry = self._carry, None
        else:
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                return []
        batch, rows = [first], first.request.row_count
        deadline = time.monotonic() + self.batch_wait
        while rows < self.max_batch:
            try:
                work = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if rows + work.request.row_count > self.max_batch:
                self._carry = work
                break
            batch.append(work)
            rows += work.request.row_count
        return batch

    def _run(self) -> None:
        while not self._stopping.is_set():
            batch = [work for work in self._gather() if work.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                self._run_batch(self._take_model(), batch)
            except Exception as error:  # a bug or an out-of-memory must still answer every client
                log.exception("a batch of %d requests failed", len(batch))
                failure = APIError(f"generation failed: {error}", status=500, type="server_error")
                for work in batch:
                    if not work.future.done():
                        work.future.set_exception(failure)

    def _prepare(self, model: LoadedModel, work: Work) -> tuple[list[list[int]], list[Row], list[int]]:
        """Tokenize with the batch's model and check the prompts fit: (prompts, rows, budgets)."""
        request = work.request
        prompts = request.encode(model.tokenizer)
        vocab = model.model.get_input_embeddings().num_embeddings
        if any(t >= vocab for prompt in prompts for t in prompt):
            raise invalid("prompt", f"token ids must be below the vocabulary size {vocab}")
        budgets = [check_context(model, len(p), request.params.max_tokens) for p in prompts]
        return prompts, request.rows(prompts), [b for b in budgets for _ in range(request.n)]

    def _run_batch(self, model: LoadedModel, batch: list[Work]) -> None:
        prepared = []
        for work in batch:
            try:
                prepared.append((work, *self._prepare(model, work)))
            except APIError as error:
                work.future.set_exception(error)
        if not prepared:
            return
        rows = [row for _, _, work_rows, _ in prepared for row in work_rows]
        budgets = [b for *_, work_budgets in prepared for b in work_budgets]
        completions = generate(model, rows, budgets)
        self.stats.record(len(rows), len(prepared))
        start = 0
        for work, prompts, work_rows, _ in prepared:
            mine = completions[start : start + len(work_rows)]
            start += len(work_rows)
            work.future.set_result(render(work.request, model.id, model.tokenizer, prompts, mine))
