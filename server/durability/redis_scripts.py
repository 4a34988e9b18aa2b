"""The Lua scripts of the session store (redis_log.py): fenced writes, takeover, listing.

Every script runs atomically in Redis and holds it meanwhile (every replica's writes wait), so
none of them does unbounded work in one call. The session keys they name outside KEYS (LIST's
reads) are fine on one Redis, which is the setup; Redis Cluster is not supported.
"""

from __future__ import annotations

from server.sessions.store import EXPIRED_MEMORY

# An owner's index (lstm:owner:<owner>, a sorted set) lists its session ids scored by their
# expiry time (unix ms): ListSessions reads one owner's ids, not a SCAN over every session of
# every owner, and the score, kept past the keys' expiry, is how every replica can tell "expired"
# from "unknown". An expired id stays KEEP_EXPIRED_MS and at most KEEP_EXPIRED per owner (as the
# local store remembers them); the index itself expires once its last id would be forgotten.
KEEP_EXPIRED_MS = 24 * 3600 * 1000
KEEP_EXPIRED = EXPIRED_MEMORY
CLOCK = """
local now
local function clock() -- Redis's time in unix ms: once per call, when needed
  if not now then local t = redis.call('TIME'); now = t[1] * 1000 + math.floor(t[2] / 1000) end
  return now
end
"""
INDEX = f"""
local function index(key, id, expires) -- id in its owner's index, scored by its expiry
  if redis.call('ZADD', key, expires, id) == 1 then -- a new id: forget the oldest expired ones
    redis.call('ZREMRANGEBYSCORE', key, '-inf', clock() - {KEEP_EXPIRED_MS})
    local expired = redis.call('ZCOUNT', key, '-inf', clock())
    if expired > {KEEP_EXPIRED} then redis.call('ZREMRANGEBYRANK', key, 0, expired - {KEEP_EXPIRED} - 1) end
  end
  redis.call('PEXPIREAT', key, expires + {KEEP_EXPIRED_MS}, 'NX')
  redis.call('PEXPIREAT', key, expires + {KEEP_EXPIRED_MS}, 'GT')
end
"""

WRITE = (
    CLOCK
    + INDEX
    + """
-- Writes of several sessions, in order. For write i (from 0): KEYS[5i+1..5i+5] are its epoch,
-- meta, log and snap keys and its owner's index; ARGV[5i+1..5i+5] its op, epoch, TTL in ms,
-- payload and meta (its first write only). Ops: append, snapshot, touch (expiry only), delete,
-- expire (its holder expired it: gone, and "expired" in the index). Returns 1 per write done,
-- 0 per stale epoch.
local function id_of(epoch) return string.sub(epoch, 7, -8) end -- lstm:{<id>}:epoch
local done = {}
for i = 0, #KEYS / 5 - 1 do
  local epoch, meta, log, snap, owned = KEYS[5*i+1], KEYS[5*i+2], KEYS[5*i+3], KEYS[5*i+4], KEYS[5*i+5]
  local op, ttl, payload, first = ARGV[5*i+1], ARGV[5*i+3], ARGV[5*i+4], ARGV[5*i+5]
  if redis.call('GET', epoch) ~= ARGV[5*i+2] then
    done[i+1] = 0
  elseif op == 'delete' or op == 'expire' then
    redis.call('DEL', epoch, meta, log, snap)
    if op == 'delete' then redis.call('ZREM', owned, id_of(epoch)) else index(owned, id_of(epoch), clock()) end
    done[i+1] = 1
  else
    -- expiry: refreshed by the first write, every snapshot (--snapshot-interval while the
    -- session moves) and a log's first record, not by every record (Redis's own CPU counts)
    local refresh = {}
    if first ~= '' then
      redis.call('SET', meta, first)
      refresh = {epoch, meta}
    end
    if op == 'append' then
      if redis.call('RPUSH', log, payload) == 1 then table.insert(refresh, log) end
    elseif op == 'touch' then -- held here but unchanged for a while: it lives on
      refresh = {epoch, meta, log, snap}
    else -- a snapshot covers every record queued before it: the log starts again after it
      redis.call('SET', snap, payload)
      redis.call('DEL', log)
      refresh = {epoch, meta, snap}
    end
    if #refresh > 0 then
      local expires = clock() + ttl
      for _, key in ipairs(refresh) do redis.call('PEXPIREAT', key, expires) end
      if first ~= '' or op ~= 'append' then index(owned, id_of(epoch), expires) end -- scored by meta's expiry
    end
    done[i+1] = 1
  end
end
return done
"""
)

TAKE_OVER = """
-- KEYS: epoch, meta, log, snap; ARGV: owner. Bumps the epoch and reads the session, atomically.
local meta = redis.call('GET', KEYS[2])
if not meta or cjson.decode(meta)['owner'] ~= ARGV[1] then return false end
local epoch = redis.call('INCR', KEYS[1])
return {epoch, meta, redis.call('GET', KEYS[4]) or '', redis.call('LRANGE', KEYS[3], 0, -1),
        redis.call('PTTL', KEYS[2])}
"""

READ = """
-- A session of an owner's index, if it lives: {id, epoch, meta, meta's PTTL, position}, the
-- position the store would restore (its last log record's end, else its snapshot's; -1 if
-- neither says). An id whose keys are gone before its expiry (deleted, not by us) leaves the
-- index. The keys are named here, not in KEYS: one Redis, not a Cluster (see the top).
local function read(owned, id)
  local base = 'lstm:{' .. id .. '}'
  local meta = redis.call('GET', base .. ':meta')
  if not meta then
    if tonumber(redis.call('ZSCORE', owned, id) or 0) > clock() then redis.call('ZREM', owned, id) end
    return nil
  end
  local position, last = -1, redis.call('LINDEX', base .. ':log', -1)
  if last then -- a TOKENS record body (journal.py): kind, id (17 bytes), life, start, count
    local _, start, count = struct.unpack('<I4I8I2', last, 18)
    position = start + count
  else -- a snapshot (blob.pack): its header's "position" follows the model and fingerprint
    local head = redis.call('GETRANGE', base .. ':snap', 0, #meta + 128)
    position = tonumber(string.match(head, '"position": (%d+)')) or -1
  end
  return {id, redis.call('GET', base .. ':epoch'), meta, redis.call('PTTL', base .. ':meta'), position}
end
local function read_all(owned, ids)
  local found = {}
  for _, id in ipairs(ids) do
    local session = read(owned, id)
    if session then table.insert(found, session) end
  end
  return found
end
"""

# A Lua call blocks Redis, every replica's writes included, so a long list is read in pages:
# LIST reads the first LIST_PAGE sessions and returns the other ids, LIST_MORE reads those
# (one pipeline). At most two round trips; one for an owner with up to LIST_PAGE sessions.
LIST_PAGE = 256
LIST = (
    CLOCK
    + READ
    + """
-- KEYS[1]: an owner's index; ARGV[1]: LIST_PAGE. {its first live sessions, the other live ids}.
local ids, rest = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. clock(), '+inf'), {}
for i = tonumber(ARGV[1]) + 1, #ids do
  table.insert(rest, ids[i])
  ids[i] = nil
end
return {read_all(KEYS[1], ids), rest}
"""
)
LIST_MORE = (
    CLOCK
    + READ
    + """
-- KEYS[1]: an owner's index; ARGV: ids of it. Those that live.
return read_all(KEYS[1], ARGV)
"""
)
