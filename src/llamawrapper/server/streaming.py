"""From engine handles to HTTP: merged event streams, Server-Sent Events framing, and the
client-disconnect watch that cancels generations (streaming or not) as soon as the client
goes away, so the engine frees their slots within one step."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable, Optional, Sequence

from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..types import Result, StreamEvent


def sse(data: Any) -> bytes:
    """One SSE ``data:`` frame."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


DONE = sse("[DONE]")


def cancel_all(handles: Sequence[Any]) -> None:
    for h in handles:
        h.cancel()


async def merged(handles: Sequence[Any]) -> AsyncIterator[tuple[int, StreamEvent]]:
    """Events of several handles as ``(index, event)`` in arrival order; raises the first error."""
    if len(handles) == 1:
        async for event in handles[0]:
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, handle: Any) -> None:
        try:
            async for event in handle:
                queue.put_nowait((i, event))
        except Exception as exc:
            queue.put_nowait((i, exc))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    remaining = len(handles)
    try:
        while remaining:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield i, item
            if item.finish_reason is not None:
                remaining -= 1
    finally:
        for t in tasks:
            t.cancel()


async def wait_disconnect(receive: Receive) -> None:
    """Return when the client has gone (the request body must already be read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def results_unless_disconnected(handles: Sequence[Any], receive: Receive) -> list[Result]:
    """Every handle's ``Result``; cancel them all and raise ``ClientGone`` if the client leaves."""
    gather = asyncio.ensure_future(asyncio.gather(*(h.aresult() for h in handles)))
    watch = asyncio.ensure_future(wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({gather, watch}, return_when=asyncio.FIRST_COMPLETED)
        if gather in done:
            return gather.result()
        raise ClientGone()
    finally:
        watch.cancel()
        if not gather.done():
            gather.cancel()
        cancel_all(handles)  # no-op for finished ones


class EventStream(StreamingResponse):
    """``text/event-stream`` whose generations are cancelled however the response ends
    (finished, client gone, server shutting down)."""

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], None], headers: Optional[dict] = None) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass
        finally:
            self._on_close()
