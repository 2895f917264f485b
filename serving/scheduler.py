"""One thread owns the model: it gathers waiting requests into a batch, runs it, answers each.

Request handlers (coroutines on the HTTP event loop) only validate and enqueue; everything that
touches the model or its tokenizer (chat template, decode loop, incremental detokenization,
token strings for logprobs) runs here, one batch at a time, so no lock guards the model and a
fast tokenizer is never used from two threads. Each request gets its answer as events through
its own `publish` callback (the HTTP side hands one that puts them on an asyncio queue with
`loop.call_soon_threadsafe`): `Accepted` once its prompts are tokenized and fit, `Progress` after
every decode step for a streamed request, `Finished` with the completions, or an `APIError`.

A new model version is staged with `swap` and taken up between batches: the batch in flight
finishes on the version it started with, and every request enqueued after `swap` returned is
answered by the new one. Nothing queued is dropped by a swap.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightspan.serving.errors import APIError, invalid
from lightspan.serving.generation import ServedModel, check_context, generate
from lightspan.serving.sampling import Completion, Row, RowDelta, SamplingParams, derive_seed

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    """A validated request as the scheduler runs it: what to tokenize and how to sample.

    Tokenization waits for the batch (`encode` runs against the model that will generate), so
    the reported `prompt_token_ids` always come from the tokenizer of the version that answered.
    """

    params: SamplingParams
    encode: Callable[[Any], list[list[int]]]  # tokenizer -> one id list per prompt
    n: int = 1
    seed: int | None = None
    stream: bool = False
    prompt_count: int = 1
    # The version the request named (`model="policy:3"`); None: whichever version `model` serves.
    pinned: ServedModel | None = None

    @property
    def row_count(self) -> int:
        return self.prompt_count * self.n

    def rows(self, prompts: Sequence[Sequence[int]]) -> list[Row]:
        """n rows per prompt; seeded requests derive one seed per choice, so each is reproducible."""
        rows = []
        for p, prompt in enumerate(prompts):
            for j in range(self.n):
                index = p * self.n + j
                seed = derive_seed(self.seed, index) if self.seed is not None else secrets.randbits(63)
                rows.append(Row(tuple(prompt), self.params, seed, self.stream))
        return rows


@dataclass
class Accepted:
    """The batch took the request: the version that answers it and the prompts as it tokenized them."""

    model_id: str
    prompts: list[list[int]]


@dataclass
class Progress:
    """One decode step of a streamed request: (choice index, what the step added to it)."""

    deltas: list[tuple[int, RowDelta]]


@dataclass
class Finished:
    """Every choice of the request, in order (choice i*n+j is sample j of prompt i)."""

    completions: list[Completion]


Event = Accepted | Progress | Finished | APIError


@dataclass
class Work:
    """A request waiting for (or in) its batch, and where its events go."""

    request: GenerationRequest
    publish: Callable[[Event], None]
    cancelled: bool = False  # its client went away: do not start it, abort its rows
    done: bool = False

    def finish(self, event: Finished | APIError) -> None:
        if not self.done:
            self.done = True
            self.publish(event)


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


def _shutting_down() -> APIError:
    return APIError("the server is shutting down", status=503, type="server_error")


class Scheduler:
    """Gathers up to `max_batch` rows (a request contributes n rows per prompt), waiting at most
    `batch_wait` seconds after the first arrival for company; a single request larger than
    `max_batch` runs alone rather than being refused."""

    def __init__(self, model: ServedModel, *, max_batch: int = 32, batch_wait: float = 0.005):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._model = model
        self._staged: ServedModel | None = None
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
            work.finish(_shutting_down())

    @property
    def model(self) -> ServedModel:
        """The version that will answer the next batch."""
        with self._lock:
            return self._staged or self._model

    def swap(self, model: ServedModel) -> None:
        """Stage `model`; it answers every batch formed from now on."""
        with self._lock:
            self._staged = model

    def submit(self, request: GenerationRequest, publish: Callable[[Event], None]) -> Work:
        """Queue `request`; its events go to `publish`, called from the scheduler thread."""
        if self._stopping.is_set():
            raise _shutting_down()
        work = Work(request, publish)
        self._queue.put(work)
        return work

    # --- the loop ---------------------------------------------------------------------------------
    def _take_model(self) -> ServedModel:
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
            batch = [work for work in self._gather() if not work.cancelled]
            if not batch:
                continue
            current = self._take_model()
            # Requests that named a version run with it, each version's requests a batch of its own.
            by_model: dict[int, tuple[ServedModel, list[Work]]] = {}
            for work in batch:
                model = work.request.pinned or current
                by_model.setdefault(id(model), (model, []))[1].append(work)
            for model, works in by_model.values():
                try:
                    self._run_batch(model, works)
                except Exception as error:  # a bug or an out-of-memory must still answer every client
                    log.exception("a batch of %d requests failed", len(works))
                    failure = APIError(f"generation failed: {error}", status=500, type="server_error")
                    for work in works:
                        work.finish(failure)

    def _prepare(self, model: ServedModel, work: Work) -> tuple[list[list[int]], list[Row], list[int]]:
        """Tokenize with the batch's model and check the prompts fit: (prompts, rows, budgets)."""
        request = work.request
        prompts = request.encode(model.tokenizer)
        vocab = model.model.get_input_embeddings().num_embeddings
        if any(t >= vocab for prompt in prompts for t in prompt):
            raise invalid("prompt", f"token ids must be below the vocabulary size {vocab}")
        budgets = [check_context(model, len(p), request.params.max_tokens) for p in prompts]
        return prompts, request.rows(prompts), [b for b in budgets for _ in range(request.n)]

    def _run_batch(self, model: ServedModel, batch: list[Work]) -> None:
        accepted: list[tuple[Work, list[Row], list[int]]] = []
        for work in batch:
            try:
                prompts, rows, budgets = self._prepare(model, work)
            except APIError as error:
                work.finish(error)
                continue
            work.publish(Accepted(model.id, prompts))
            accepted.append((work, rows, budgets))
        if not accepted:
            return
        owner = [(work, choice) for work, rows, _ in accepted for choice in range(len(rows))]

        def on_step(deltas: list[tuple[int, RowDelta]]) -> list[int]:
            steps: dict[int, tuple[Work, list[tuple[int, RowDelta]]]] = {}
            for row, delta in deltas:
                work, choice = owner[row]
                steps.setdefault(id(work), (work, []))[1].append((choice, delta))
            for work, items in steps.values():
                work.publish(Progress(items))
            return [row for row, _ in deltas if owner[row][0].cancelled]

        rows = [row for _, work_rows, _ in accepted for row in work_rows]
        budgets = [b for *_, work_budgets in accepted for b in work_budgets]
        completions = generate(model, rows, budgets, on_step)
        self.stats.record(len(rows), len(accepted))
        start = 0
        for work, work_rows, _ in accepted:
            work.finish(Finished(completions[start : start + len(work_rows)]))
            start += len(work_rows)
