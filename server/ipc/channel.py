"""A framed, batched message channel over a connected Unix socket (asyncio streams).

Messages sent during one turn of the event loop go out together as one frame: a 4-byte
big-endian length and a MessagePack array of messages. In the engine core, a scheduler
iteration's events are all put in one callback, so each iteration costs one frame and one
write; in the front end, the commands and credits of one turn do the same.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

import msgspec

HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024  # far above any frame (an exported session is at most 64 MiB)


class ChannelClosed(Exception):
    """The other process closed its end (it exited, or died)."""


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, incoming: Any) -> None:
        self._reader = reader
        self._writer = writer
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(list[incoming])
        self._pending: list[msgspec.Struct] = []
        self._scheduled = False
        self.before_flush: Callable[[], None] = lambda: None  # last additions to a frame (credits)

    @classmethod
    async def connect(cls, sock: socket.socket, incoming: Any) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_FRAME)
        return cls(reader, writer, incoming)

    def send(self, message: msgspec.Struct) -> None:
        """Queue `message` for this turn's frame."""
        self._pending.append(message)
        self.schedule()

    def schedule(self) -> None:
        """Flush at the end of this turn (also for what `before_flush` will add)."""
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.before_flush()
        self._scheduled = False
        if not self._pending or self._writer.is_closing():
            self._pending = []
            return
        body = self._encoder.encode(self._pending)
        self._pending = []
        self._writer.write(HEADER.pack(len(body)) + body)

    async def drain(self) -> None:
        """Flush, and wait until the socket took everything (before exiting)."""
        self.flush()
        await self._writer.drain()

    async def receive(self) -> list:
        """The next frame's messages; ChannelClosed at the other end's exit."""
        try:
            (size,) = HEADER.unpack(await self._reader.readexactly(HEADER.size))
            if size > MAX_FRAME:
                raise ChannelClosed(f"a frame of {size} bytes: the other end is not an engine channel")
            return self._decoder.decode(await self._reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise ChannelClosed(str(e) or "end of stream") from e

    def close(self) -> None:
        self._writer.close()
