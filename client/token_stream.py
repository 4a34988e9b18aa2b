"""One request's tokens, yielded as they arrive, then its `Finished` event.

A request with `stream_interval` N > 1 gets its generated tokens N to a message (a `tokens`
event); they are yielded one by one all the same.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc

from client.errors import StatusError
from client.lstmserve.v1 import lstm_serve_pb2 as pb
from client.messages import Classification, Finished, Token

Response = pb.GenerateResponse | pb.StreamResponse


class _TokenStreamBase:
    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        """The session generating (for Generate without a session: the temporary one)."""
        self.tokens: list[Token] = []
        """The tokens received so far (a message's all at once, from its first one yielded)."""
        self.finished: Finished | None = None
        """The final event; None until it arrives, and for a cancelled Generate call."""
        self.classification: Classification | None = None
        """A feed with `classify`: the heads' answer once the input was absorbed."""
        self._cancelled = False
        self._pending: deque[Token] = deque()  # received, not yielded yet (the rest of a batch)

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(t.text for t in self.tokens)

    @property
    def position(self) -> int:
        """The session's position after the last event received (0 before any)."""
        if self.finished is not None:
            return self.finished.position
        return self.tokens[-1].position if self.tokens else 0

    def _take(self, response: Response) -> bool:
        """Record a response, queueing its tokens (one, or a batch's); False once finished."""
        if isinstance(response, pb.GenerateResponse) and response.session_id:
            self.session_id = response.session_id
        event = response.WhichOneof("event")
        if event == "finished":
            self.finished = response.finished
            return False
        if event == "tokens":
            batch: list[Token] = list(response.tokens.tokens)
        elif event == "token":
            batch = [response.token]
        elif event == "classification":
            self.classification, batch = response.classification, []
        else:  # an event this client does not know
            batch = []
        self.tokens += batch
        self._pending.extend(batch)
        return True

    def _ends_quietly(self, error: grpc.RpcError) -> bool:
        """A call this object cancelled ends without an error."""
        return self._cancelled and StatusError.from_rpc(error).code == grpc.StatusCode.CANCELLED


class TokenStream(_TokenStreamBase):
    """Iterate to receive the `Token`s of one request as the server sends them."""

    def __init__(
        self, responses: Iterator[Response], cancel: Callable[[], object], session_id: str = ""
    ) -> None:
        super().__init__(session_id)
        self._responses = responses
        self._cancel = cancel

    def __iter__(self) -> Iterator[Token]:
        return self

    def __next__(self) -> Token:
        while not self._pending:
            if self.finished is not None:
                raise StopIteration
            try:
                more = self._take(next(self._responses))
            except grpc.RpcError as e:
                if self._ends_quietly(e):
                    raise StopIteration from None
                raise StatusError.from_rpc(e) from e
            if not more:
                raise StopIteration
        return self._pending.popleft()

    def cancel(self) -> None:
        """Ask the server to stop; iteration then ends (a session's request finishes CANCELLED)."""
        self._cancelled = True
        self._cancel()

    def wait(self) -> Finished | None:
        """Receive the rest; the final event."""
        for _ in self:
            pass
        return self.finished


class AsyncTokenStream(_TokenStreamBase):
    """`async for` over the `Token`s of one request as the server sends them."""

    def __init__(
        self,
        responses: AsyncIterator[Response],
        cancel: Callable[[], Awaitable[object]],
        session_id: str = "",
    ) -> None:
        super().__init__(session_id)
        self._responses = responses
        self._cancel = cancel

    def __aiter__(self) -> AsyncIterator[Token]:
        return self

    async def __anext__(self) -> Token:
        while not self._pending:
            if self.finished is not None:
                raise StopAsyncIteration
            try:
                more = self._take(await anext(self._responses))
            except grpc.RpcError as e:
                if self._ends_quietly(e):
                    raise StopAsyncIteration from None
                raise StatusError.from_rpc(e) from e
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._cancelled and task is not None and not task.cancelling():
                    raise StopAsyncIteration from None  # grpc.aio's way of ending a call cancel() ended
                raise
            if not more:
                raise StopAsyncIteration
        return self._pending.popleft()

    async def cancel(self) -> None:
        """Ask the server to stop; iteration then ends (a session's request finishes CANCELLED)."""
        self._cancelled = True
        await self._cancel()

    async def wait(self) -> Finished | None:
        """Receive the rest; the final event."""
        async for _ in self:
            pass
        return self.finished
