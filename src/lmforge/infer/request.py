"""What a caller holds for a prompt it submitted to the Engine: a `Request`, and the records it yields.

Two threads share a Request. The thread that steps the engine (its background thread after
`Engine.start()`, else the caller's own) writes: `put` hands each event to the reader, `finish` ends the
stream. The caller reads: it iterates the request (blocking), or `aiter`s it on an asyncio event loop,
and may `cancel` it from anywhere. An asyncio reader gets its events through its event loop: the engine
gathers a step's events per loop (its `outbox`) and hands them over with one `send_events` call per loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmforge.infer.sampling import SamplingParams

if TYPE_CHECKING:
    import torch

    from lmforge.infer.engine import Engine


@dataclass
class TokenLogprob:
    token_id: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]]  # (id, text, logprob), most likely first


@dataclass
class Output:  # one of the n samples of a request
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | None while running (or cancelled)
    logprobs: list[TokenLogprob] | None


@dataclass
class Delta:  # one streaming event for sample `index`
    index: int
    text: str  # new text, never a broken UTF-8 character (held back until complete)
    token_ids: list[int]  # tokens since the previous event of this sample
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # set on the last event of that sample


# A step's events for asyncio readers: event loop -> [(request, event)], sent when the step ends.
Outbox = dict[asyncio.AbstractEventLoop, list[tuple["Request", object]]]
_DONE = object()  # end of a request's event stream


class Request:
    """A submitted prompt: iterate it (or `aiter` it) for Deltas; `outputs` holds the results."""

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams,
                 pixel_values: torch.Tensor | None = None, cache_key: list[int] | None = None):
        self.id = f"req-{uuid.uuid4().hex[:16]}"
        self.prompt = prompt  # token ids, each image's placeholder repeated once per image token
        # the prompt's images [images, 3, H, W], their features placed at the placeholders at the prefill
        self.pixel_values = pixel_values
        # what the prefix cache compares: the prompt, with each image token made unique to its image's content
        self.cache_key = prompt if cache_key is None else cache_key
        self.prompt_tokens = len(prompt)
        self.cached_tokens = 0  # of the prompt, found in the prefix cache (not prefilled again)
        # params.prompt_logprobs: each prompt token's log-prob given those before it (None for the first), set
        # once the prompt is prefilled, before the first event
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.params = params
        self.outputs = [Output(i, "", [], None, [] if params.logprobs else None) for i in range(params.n)]
        self.cancelled = False
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._engine = engine
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # orders `put` against `aiter` switching the reader to asyncio
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_events: asyncio.Queue | None = None

    def cancel(self) -> None:
        """Stop generating (thread-safe); the batch rows are freed before the next decode step."""
        self.cancelled = True
        self._engine.wake()

    # -- the writer: the thread stepping the engine ---------------------------------------------------

    def put(self, event: Delta, outbox: Outbox | None = None) -> None:
        """Hand one event to the reader. An asyncio reader's event joins `outbox` (the step's, sent at its
        end) or, outside a step, goes to its event loop at once."""
        with self._lock:
            if self._loop is None:
                self._events.put(event)
            elif outbox is not None:
                outbox.setdefault(self._loop, []).append((self, event))
            else:
                send_events(self._loop, [(self, event)])

    def finish(self, error: BaseException | None = None, outbox: Outbox | None = None) -> None:
        """End the event stream: every sample finished or left, or `error` ended them all."""
        self.error = error
        self.done.set()
        self.put(_DONE, outbox)

    # -- the reader -----------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Delta]:
        """Blocking iteration over events until all n samples finish. Without the engine's background
        thread nobody else steps the engine, so this does, until an event of this request arrives."""
        while True:
            if not self._engine.running:
                while self._events.empty():
                    self._engine.step()
            if (event := self._event(self._events.get())) is None:
                return
            yield event

    async def aiter(self) -> AsyncIterator[Delta]:
        """Events for asyncio code: the engine's thread hands them to this event loop."""
        if not self._engine.running:
            raise RuntimeError("Engine.start() must be called before iterating requests asynchronously")
        with self._lock:
            self._loop, self._async_events = asyncio.get_running_loop(), asyncio.Queue()
            while not self._events.empty():  # anything sent before we switched to asyncio
                self._async_events.put_nowait(self._events.get_nowait())
        while (event := self._event(await self._async_events.get())) is not None:
            yield event

    def _event(self, event) -> Delta | None:
        """The event to yield; None at the end of the stream, which raises the error that ended it, if any."""
        if event is _DONE:
            if self.error is not None:
                raise RuntimeError(f"generation failed: {self.error!r}") from self.error
            return None
        return event


def send_events(loop: asyncio.AbstractEventLoop, items: list[tuple[Request, object]]) -> None:
    """Hand events to requests iterated on `loop`, in one wake-up of that loop: one call per step rather
    than per token, since each wake-up is a write to the loop's socket pair, a system call on the engine's
    thread (BENCHMARKS.md). A loop that has closed has nobody listening: its requests are cancelled."""
    try:
        loop.call_soon_threadsafe(_deliver, items)
    except RuntimeError:  # the event loop has closed
        for request, _ in items:
            request.cancelled = True


def _deliver(items: list[tuple[Request, object]]) -> None:  # on the requests' event loop
    for request, event in items:
        request._async_events.put_nowait(event)


async def aiter_all(requests: list[Request]) -> AsyncIterator[tuple[int, Delta]]:
    """(request number, Delta) from several requests as they come, in one async stream; the error that ends
    one of them ends it."""
    if len(requests) == 1:
        async for delta in requests[0].aiter():
            yield 0, delta
        return
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(number, request):
        try:
            async for delta in request.aiter():
                await merged.put((number, delta))
            await merged.put((number, None))
        except Exception as e:  # surfaces in the consumer, not as an unretrieved task exception
            await merged.put((number, e))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    try:
        running = len(requests)
        while running:
            number, item = await merged.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                running -= 1
            else:
                yield number, item
    finally:
        for task in tasks:
            task.cancel()
