"""The async iterator a caller reads a request's events from; leaving it cancels the request."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import TYPE_CHECKING

from slimserve.runtimes.llm.params import TokenEvent

if TYPE_CHECKING:
    from slimserve.runtimes.llm.sequence import Request

END = object()  # put after a request's last event


class GenerationStream:
    """`async for event in stream`; `async with stream:` cancels on leaving the block.

    The request is cancelled (its KV blocks freed at the next iteration) when the caller
    calls `aclose()`, leaves an `async with`, is cancelled while waiting for an event (a
    client disconnect cancels the handler task), or drops the stream.
    """

    def __init__(self, request: Request, wake: threading.Event) -> None:
        self._request = request
        self._wake = wake
        self._finished = False

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._finished:
            raise StopAsyncIteration
        try:
            item = await self._request.queue.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if item is END:
            self._finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        assert isinstance(item, TokenEvent)
        return item

    def cancel(self) -> None:
        """Stop generating for this request (thread-safe; no effect once it finished)."""
        if not self._finished:
            self._finished = True
            self._request.cancelled = True
            self._wake.set()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> GenerationStream:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cancel()

    def __del__(self) -> None:
        self.cancel()
