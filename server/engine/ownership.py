"""Which server holds each session, with a shared session store (Redis, --session-store).

A server holds a session under an epoch (server/durability/redis_log.py): epoch 1 when it
creates the session, a new one whenever it takes the session over. Before every call about an
existing session it compares its epoch with the store's (one GET): equal, it serves; older, it
lets its copy go and takes the session over again; not held here, it takes it over (the store
bumps the epoch and hands back the snapshot and the log, which are replayed through the same
per-token step). A write the store refuses (another server bumped the epoch meanwhile) also
lets the copy go. A copy that is let go ends its stream with UNAVAILABLE ("now held by another
server"): the client's resume() retries, and the router sends it where the session now lives.

Every server gives the same answers about sessions it does not hold: ListSessions lists the
caller's sessions from the store too (those held elsewhere, or nowhere, with location STORE),
and a call about a session that expired in the store says "expired" (redis_scripts.INDEX).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from server.durability.redis_log import Stored
from server.durability.shared import SharedDurability
from server.engine.persistence import Persistence
from server.errors import AlreadyExists
from server.sessions.principal import Principal
from server.sessions.store import ID_PATTERN, Session, SessionStore, expired

log = logging.getLogger(__name__)


class Ownership:
    def __init__(
        self,
        shared: SharedDurability,
        store: SessionStore,
        persistence: Persistence,
        end: Callable[[Session, str], None],  # Engine._end: removes a session for a reason
    ) -> None:
        self.shared = shared
        self.store = store
        self.persistence = persistence
        self._end = end
        self.loop: asyncio.AbstractEventLoop | None = None  # the engine's, once it runs
        self._under_way: dict[str, asyncio.Future] = {}  # session id -> its check or takeover

    async def ensure_local(self, principal: Principal, session_id: str) -> None:
        """Make sure this server holds the current state of the caller's session, if the store
        knows it; otherwise leave it to the lookup that follows (NOT_FOUND)."""
        if not ID_PATTERN.fullmatch(session_id or ""):
            return
        while (pending := self._under_way.get(session_id)) is not None:
            await asyncio.shield(pending)  # one at a time per session; then look again
        done = self._under_way[session_id] = asyncio.get_running_loop().create_future()
        try:
            await self._hold(principal, session_id)
        finally:
            del self._under_way[session_id]
            done.set_result(None)

    async def _hold(self, principal: Principal, session_id: str) -> None:
        local = self.store.find(session_id)
        if local is not None and (local.owner != principal.name or not local.durable or local.stranded):
            return
        epoch = await asyncio.to_thread(self.shared.epoch_of, session_id)
        if local is not None:
            if local.epoch == epoch:
                return
            self._end(local, "moved")  # another server took it over since: this copy is stale
        if epoch is None:  # unknown, deleted, or expired: the owner's index knows which
            expired_at = await asyncio.to_thread(self.shared.expired_at, session_id, principal.name)
            if expired_at is not None:
                raise expired(session_id, expired_at)
            return
        taken = await asyncio.to_thread(self.shared.take_over, session_id, principal.name)
        if taken is not None:
            found, epoch = taken
            await self.persistence.take_over(found, epoch)
            log.info("session %s taken over under epoch %d", session_id, epoch)

    async def list_sessions(self, principal: Principal) -> tuple[list[Session], list[Stored]]:
        """The caller's sessions held here, and the others the store has (read off the event
        loop: redis_log.RedisSessions.list). A copy here whose epoch the store has moved past is
        another server's."""
        stored = await asyncio.to_thread(self.shared.list, principal.name)
        epochs = {s.id: s.epoch for s in stored}
        held = [s for s in self.store.owned_by(principal.name) if epochs.get(s.id, s.epoch) == s.epoch]
        here = {s.id for s in held}
        return held, [s for s in stored if s.id not in here]

    async def claim(self, session: Session) -> None:
        """Epoch 1 for a new durable session; ALREADY_EXISTS if the store knows its id (another
        server created it). The session is removed here if it cannot be claimed."""
        if not session.durable:
            return
        try:
            claimed = await asyncio.to_thread(self.shared.claim, session.id)
        except BaseException:
            self._end(session, "deleted")
            raise
        if not claimed:
            self._end(session, "deleted")
            raise AlreadyExists(f"session {session.id} already exists: choose another id")
        session.epoch = 1

    def let_go(self, session_ids: set[str]) -> None:
        """Writer thread: the store refused these sessions' writes (another server holds them)."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._let_go, session_ids)

    def _let_go(self, session_ids: set[str]) -> None:
        for session_id in session_ids:
            session = self.store.find(session_id)
            if session is not None:
                self._end(session, "moved")
