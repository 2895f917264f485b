"""What chat and completions share between the router and the scheduler (vLLM's `OpenAIServing`).

A request is queued on the scheduler with a `RequestEvents` as its outlet: the decode thread
publishes through `loop.call_soon_threadsafe`, the request's coroutine awaits them. The first
event decides the HTTP status (an `APIError` for a prompt that does not fit becomes a 4xx even for
`stream: true`, as vLLM answers); after it a plain request waits for `Finished`, a streamed one
turns every decode step into server-sent events as it arrives, ending with `data: [DONE]`.
A `Renderer` per endpoint turns the events into that endpoint's pydantic responses.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from lightspan.serving.errors import APIError
from lightspan.serving.protocol import ErrorResponse, TopLogprob, UsageInfo
from lightspan.serving.sampling import Completion, RowDelta
from lightspan.serving.scheduler import (
    Accepted,
    Event,
    Finished,
    GenerationRequest,
    Progress,
    Scheduler,
    Work,
)


class RequestEvents:
    """The scheduler's events for one request, carried from the decode thread to its coroutine."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def publish(self, event: Event) -> None:
        """Called on the decode thread; never blocks it."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:
            pass  # the event loop is closed: the server is shutting down and nobody waits

    async def next(self) -> Accepted | Progress | Finished:
        event = await self._queue.get()
        if isinstance(event, APIError):
            raise event
        return event


class Renderer(Protocol):
    """One endpoint's responses for one request (it holds the request's id and creation time)."""

    def response(self, accepted: Accepted, completions: Sequence[Completion]) -> BaseModel: ...

    def opening(self, accepted: Accepted) -> Sequence[BaseModel]: ...

    def step(self, accepted: Accepted, deltas: Sequence[tuple[int, RowDelta]]) -> Sequence[BaseModel]: ...

    def usage(self, accepted: Accepted, usage: UsageInfo) -> BaseModel: ...


async def serve(
    scheduler: Scheduler,
    request: GenerationRequest,
    renderer: Renderer,
    *,
    include_usage: bool = False,
) -> Response:
    """Queue `request` and answer it: JSON, or (`request.stream`) an event stream."""
    events = RequestEvents()
    work = scheduler.submit(request, events.publish)
    try:
        accepted = await events.next()
        assert isinstance(accepted, Accepted)
        if request.stream:
            stream = _stream(work, events, renderer, accepted, include_usage)
            return StreamingResponse(
                stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        while not isinstance(event := await events.next(), Finished):
            pass
    finally:
        if not request.stream:
            work.cancelled = True  # answered, failed, or the client left: nothing more to decode
    return JSONResponse(dump(renderer.response(accepted, event.completions)))


async def _stream(
    work: Work, events: RequestEvents, renderer: Renderer, accepted: Accepted, include_usage: bool
) -> AsyncIterator[str]:
    try:
        for chunk in renderer.opening(accepted):
            yield sse(chunk)
        while not isinstance(event := await events.next(), Finished):
            if isinstance(event, Progress):
                for chunk in renderer.step(accepted, event.deltas):
                    yield sse(chunk)
        if include_usage:
            tokens = sum(len(c.token_ids) for c in event.completions)
            yield sse(renderer.usage(accepted, UsageInfo.of(accepted.prompts, tokens)))
    except APIError as error:  # the 200 status line is sent: the error goes in the stream, as vLLM does
        yield sse(ErrorResponse.model_validate(error.body()))
    finally:
        work.cancelled = True  # a client that disconnected stops its rows at the next step
    yield "data: [DONE]\n\n"


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


def sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


def token_entry(token_text: Mapping[int, str], token_id: int, logprob: float) -> TopLogprob:
    """One token of chat logprobs: its text alone, its logprob, its UTF-8 bytes."""
    text = token_text[token_id]
    return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))
