"""What a session handle knows of the tokens its session absorbed, so `resume()` can reconcile.

A server with a write-ahead log reports each session's durable position: after a crash the
session comes back there or further. Between that position and what the client saw, the
restarted server may be behind (tokens the client saw were never made durable) or ahead
(tokens it absorbed and logged were never delivered). So a handle keeps the tokens it knows
were absorbed after the last durable position it heard of: those of its feeds (a feed's
tokens are absorbed in order, and its events say where) and the generated ones it received
(one per `token` event, or a whole `tokens` batch when the request had a stream_interval).
"""

from __future__ import annotations

from dataclasses import dataclass

from client.errors import SessionDataLostError
from client.lstmserve.v1 import lstm_serve_pb2 as pb
from client.messages import SessionInfo, input_tokens

KEEP = 8192  # tokens kept while no durable position advances (a server without a log)
REFEED_CHUNK = 4096  # tokens per feed when resume() feeds them again (within the server's prompt limit)


@dataclass(frozen=True)
class ResumeResult:
    """What `resume()` found and did."""

    position: int
    """The session's position once reconciled (also `session.position`)."""
    refed: list[int]
    """Tokens fed again: the server had come back without them."""
    missed: list[int]
    """Tokens the server had absorbed that this handle never received (e.g. generated tokens
    that were in flight, or an interrupted feed's): the session now continues after them."""
    session: SessionInfo
    """The session as the server reported it on re-attaching (before any re-feed)."""


class TokenHistory:
    """Observes a handle's requests and events: its position, durable position and the tokens
    absorbed since that durable position (bounded: trimmed as durable positions advance)."""

    def __init__(self, info: SessionInfo | None) -> None:
        self.position = 0  # as last reported
        self.durable = 0  # the furthest durable position heard
        self._start: int | None = None  # `_tokens` hold positions start+1...; None: nothing known
        self._tokens: list[int] = []
        self._feeds: dict[str, list[int]] = {}  # request id -> tokens of a feed not finished yet
        if info is not None:
            self.restart(info)

    @property
    def end(self) -> int | None:
        """The last position whose token is known (None: nothing known)."""
        return None if self._start is None else self._start + len(self._tokens)

    def restart(self, info: SessionInfo) -> None:
        """Start over from the server's view (creation, reset, an attach that found it elsewhere)."""
        self.position, self._start, self._tokens = info.position, info.position, []
        self.durable = min(info.durable_position, info.position)
        self._feeds.clear()

    def report(self, info: SessionInfo) -> None:
        """The server's view from a unary call (GetSession): position and durable position."""
        self._heard(info.position, info.durable_position)

    def attached(self, info: SessionInfo) -> None:
        """A plain attach: go on if the server is where this handle left it, else start over."""
        if info.position == self.end:
            self._feeds.clear()
            self._heard(info.position, info.durable_position)
        else:
            self.restart(info)

    # ---- the stream's traffic -------------------------------------------------------------

    def sent(self, request: pb.StreamRequest) -> None:
        if request.WhichOneof("kind") == "feed":
            self._feeds[request.request_id] = input_tokens(request.feed.input)

    def received(self, response: pb.StreamResponse) -> None:
        event = response.WhichOneof("event")
        if event == "token":
            token = response.token
            self._place(token.position, [token.id])
            self._heard(token.position, token.durable_position)
        elif event == "tokens":  # a batch (stream_interval > 1): consecutive tokens, in order
            batch = response.tokens.tokens
            if batch:
                last = batch[-1]
                self._place(last.position, [t.id for t in batch])
                self._heard(last.position, max(t.durable_position for t in batch))
        elif event == "finished":
            finished = response.finished
            fed = self._feeds.pop(response.request_id, None)
            if fed is not None:  # a cancelled feed absorbed only its first fed_tokens
                self._place(finished.position, fed[: finished.fed_tokens])
            self._heard(finished.position, finished.durable_position)

    def _place(self, last: int, tokens: list[int]) -> None:
        """`tokens` were absorbed, the last at position `last`."""
        end = self.end
        if not tokens or end is None:
            return
        first = last - len(tokens)  # the position before them
        if first > end:  # absorbed after tokens this handle never saw: only these are known
            self._start, self._tokens = first, list(tokens)
        elif last > end:
            self._tokens += tokens[end - first :]
        self._trim()

    def _heard(self, position: int, durable: int) -> None:
        self.position = position
        self.durable = max(self.durable, min(durable, position))
        self._trim()

    def _trim(self) -> None:
        """Drop what is durable; failing that, keep the last KEEP tokens (amortized)."""
        if self._start is None:
            return
        cut = min(self.durable, self._start + len(self._tokens)) - self._start
        if len(self._tokens) - cut > 2 * KEEP:
            cut = len(self._tokens) - KEEP
        if cut > 0:
            del self._tokens[:cut]
            self._start += cut

    # ---- resume ----------------------------------------------------------------------------

    def reconcile(self, session_id: str, info: SessionInfo) -> tuple[list[int], int | None]:
        """After re-attaching at `info`: (the tokens to feed again, the position after which
        to fetch missed tokens, or None). Raises SessionDataLostError when the server came back
        before the tokens this handle holds."""
        self._feeds.clear()  # the old stream's requests are gone with it: their callers re-issue
        end, server = self.end, info.position
        if end is None:
            self.restart(info)
            return [], None
        if server < end:
            if server < self._start:
                raise SessionDataLostError(session_id, server, self._start, self.durable)
            refeed = self._tokens[server - self._start :]
            del self._tokens[server - self._start :]
            self._heard(server, info.durable_position)
            return refeed, None
        self._heard(server, info.durable_position)
        return [], end if server > end else None

    def caught_up(self, after: int, tokens: list[int]) -> None:
        """The tokens the server absorbed after position `after`, fetched after a resume."""
        self._place(after + len(tokens), tokens)
        self.position = max(self.position, after + len(tokens))
