"""The Lua scripts ``RedisBackend`` runs: one script, one round trip, per operation.

Each script runs atomically on the server, so a registration's check-and-claim, its
generation number, its index updates and its event are one step that no other client can
interleave with, as the writer lock makes them in shared memory.

Keys, all under one prefix ``shmreg:{<registry>}:`` whose braces are a Redis Cluster hash
tag, so every key of one registry hashes to one slot (scripts touch index and lease keys they
build from the prefix; that is allowed because the slot is the same):

==========================  ==========================================================
``meta``                    hash: settings, and the counters ``gen`` (owner changes),
                            ``seq`` (newest event), ``sweeps``, ``dead_found`` ...
``nss``                     set of namespaces that hold entries
``ns:<namespace>``          hash: key bytes -> entry value
``ev``                      stream of events, entry ids ``<seq>-1``, capped at the ring
``ix:<namespace>:<tag>``    set of key bytes whose metadata carries ``tag``
``lease:<host>``            this host is alive while the key exists (it has a TTL)
``hosts``                   set of hosts that ever wrote an entry
==========================  ==========================================================

An entry value is ``pid \\t start \\t generation \\t tags \\t host \\n`` then the msgpack
metadata; ``host`` is hex (any bytes are safe), ``tags`` a comma list of index tags.

Scripts read ``ARGV`` for everything the client knows (time, ring size, lease length): a
script whose writes depend only on its arguments replicates the same on every server.
"""

from __future__ import annotations

FUNCTIONS = r"""
local P = KEYS[1]
local function parse(v)
  return string.match(v, '^(%d+)\t(%d+)\t(%d+)\t([^\t]*)\t([^\n]*)\n')
end
local function head_len(v)
  return string.find(v, '\n', 1, true)
end
local function index(op, ns, key, tags)
  for tag in string.gmatch(tags, '[^,]+') do
    redis.call(op, P .. 'ix:' .. ns .. ':' .. tag, key)
  end
end
local function expired_hosts(into)
  for _, host in ipairs(redis.call('SMEMBERS', P .. 'hosts')) do
    if redis.call('EXISTS', P .. 'lease:' .. host) == 0 then into[#into + 1] = host end
  end
  return into
end
local function remote_dead(host, here)
  return host ~= here and redis.call('EXISTS', P .. 'lease:' .. host) == 0
end
-- Scripts are not rolled back when a command fails, so each writes its event first: a script
-- that fails there (a key of the wrong type, out of memory) has changed nothing.
local function emit(ring, now, kind, ns, key, pid, gen, reason, start, host)
  local seq = tonumber(redis.call('HGET', P .. 'meta', 'seq')) + 1
  redis.call('XADD', P .. 'ev', 'MAXLEN', '~', ring, seq .. '-1', 'k', kind, 'n', ns, 's', key,
    'p', pid, 'g', gen, 't', now, 'r', reason, 'st', start, 'h', host)
  redis.call('HSET', P .. 'meta', 'seq', seq)
  return seq
end
"""

PRELUDE = (
    FUNCTIONS
    + r"""
if redis.call('EXISTS', P .. 'meta') == 0 then
  return redis.error_reply('SHMREG_DESTROYED registry was destroyed')
end
"""
)

# ARGV: create(0/1), capacity, max_metadata_bytes, ring_events, now.
# Returns the stored settings, or nil when absent and not created. No prelude: it makes meta.
OPEN = r"""
local P = KEYS[1]
if redis.call('EXISTS', P .. 'meta') == 0 then
  if ARGV[1] == '0' then return nil end
  redis.call('HSET', P .. 'meta', 'capacity', ARGV[2], 'max_metadata_bytes', ARGV[3],
    'ring_events', ARGV[4], 'created', ARGV[5], 'gen', 0, 'seq', 0,
    'sweeps', 0, 'dead_found', 0)
end
return redis.call('HMGET', P .. 'meta', 'capacity', 'max_metadata_bytes', 'ring_events')
"""

# ARGV: ns, key, pid, start, host, tags, metadata, now, ring, lease_ms, expect. lease_ms '0'
# skips renewing the host's lease (the client renewed it a moment ago).
# expect '' claims a free name or re-registers the same owner; otherwise it is the whole value
# the client judged dead, and the name is taken over only if that value is still stored.
# Returns {generation, kind}, {'HELD', value} (the client must judge the holder), or
# {'LIVE', value} (held by a live remote host), or {'MOVED'} (expect no longer stored).
REGISTER = (
    FUNCTIONS
    + r"""
local ns, key, pid, start, host, tags = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local now, ring, expect = ARGV[8], ARGV[9], ARGV[11]
-- The hot path: the counters in one read, which is also the "destroyed?" check.
local counters = redis.call('HMGET', P .. 'meta', 'seq', 'gen')
if not counters[1] then
  return redis.error_reply('SHMREG_DESTROYED registry was destroyed')
end
local hkey = P .. 'ns:' .. ns
local v = redis.call('HGET', hkey, key)
local gen, kind, reason, htags = nil, 'registered', '', ''
if v then
  local hpid, hstart, hgen, hhost
  hpid, hstart, hgen, htags, hhost = parse(v)
  if hpid == pid and hstart == start and hhost == host then
    gen, kind = hgen, 'updated'
  elseif expect == '' then
    if hhost == host then return {'HELD', v} end
    if not remote_dead(hhost, host) then return {'LIVE', v} end
  elseif v ~= expect then
    return {'MOVED'}
  end
  if not gen then reason = 'takeover' end
elseif expect ~= '' then
  return {'MOVED'}
end
if not gen then gen = tonumber(counters[2]) + 1 end
local seq = tonumber(counters[1]) + 1
redis.call('XADD', P .. 'ev', 'MAXLEN', '~', ring, seq .. '-1', 'k', kind, 'n', ns, 's', key,
  'p', pid, 'g', gen, 't', now, 'r', reason, 'st', start, 'h', host)
if kind == 'registered' then
  redis.call('HSET', P .. 'meta', 'seq', seq, 'gen', gen)
else
  redis.call('HSET', P .. 'meta', 'seq', seq)
end
if ARGV[10] ~= '0' then
  redis.call('SET', P .. 'lease:' .. host, '1', 'PX', ARGV[10])
  redis.call('SADD', P .. 'hosts', host)
end
if htags ~= tags then
  index('SREM', ns, key, htags)
end
redis.call('HSET', hkey, key, pid .. '\t' .. start .. '\t' .. gen .. '\t' .. tags .. '\t' ..
  host .. '\n' .. ARGV[7])
if kind == 'registered' then redis.call('SADD', P .. 'nss', ns) end
if htags ~= tags then index('SADD', ns, key, tags) end
return {tonumber(gen), kind}
"""
)

# ARGV: ns, key, old value, new value, new tags, now, ring. Compare-and-set of one entry's
# metadata (an 'updated' event); returns 1, or 0 when the stored value is not the old one.
UPDATE = (
    PRELUDE
    + r"""
local ns, key, old = ARGV[1], ARGV[2], ARGV[3]
local hkey = P .. 'ns:' .. ns
if redis.call('HGET', hkey, key) ~= old then return 0 end
local pid, start, gen, tags, host = parse(old)
emit(ARGV[7], ARGV[6], 'updated', ns, key, pid, gen, '', start, host)
index('SREM', ns, key, tags)
redis.call('HSET', hkey, key, ARGV[4])
index('SADD', ns, key, ARGV[5])
return 1
"""
)

# ARGV: ns, key, generation ('' for any), now, ring, here. Returns {removed value, 1 if its
# host was alive}, nil if there was none, or {'STALE', generation} when fenced off.
UNREGISTER = (
    PRELUDE
    + r"""
local ns, key = ARGV[1], ARGV[2]
local hkey = P .. 'ns:' .. ns
local v = redis.call('HGET', hkey, key)
if not v then return nil end
local pid, start, gen, tags, host = parse(v)
if ARGV[3] ~= '' and ARGV[3] ~= gen then return {'STALE', tonumber(gen)} end
emit(ARGV[5], ARGV[4], 'unregistered', ns, key, pid, gen, '', start, host)
redis.call('HDEL', hkey, key)
if redis.call('EXISTS', hkey) == 0 then redis.call('SREM', P .. 'nss', ns) end
index('SREM', ns, key, tags)
if remote_dead(host, ARGV[6]) then return {v, 0} end
return {v, 1}
"""
)

# ARGV: now, ring, here, sweeping (0/1), n, then n hosts to forget, then (ns, key, value,
# reason) per entry. Removes each entry still holding exactly that value, with a 'died' event;
# an entry of another host is removed only while that host's lease is expired (a live host's
# entries are never ours to judge). Then forgets each listed host whose lease is still
# expired: the caller saw no entry of it left, and without this ``hosts`` would keep every
# host that ever wrote (each restarted container is a new host) and every heartbeat would
# check them all. Returns how many entries were removed.
REMOVE = (
    PRELUDE
    + r"""
local now, ring, here = ARGV[1], ARGV[2], ARGV[3]
local first = 6 + tonumber(ARGV[5])
local removed = 0
for i = first, #ARGV, 4 do
  local ns, key, old, reason = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local hkey = P .. 'ns:' .. ns
  if redis.call('HGET', hkey, key) == old then
    local pid, start, gen, tags, host = parse(old)
    if host == here or remote_dead(host, here) then
      emit(ring, now, 'died', ns, key, pid, gen, reason, start, host)
      redis.call('HDEL', hkey, key)
      if redis.call('EXISTS', hkey) == 0 then redis.call('SREM', P .. 'nss', ns) end
      index('SREM', ns, key, tags)
      removed = removed + 1
    end
  end
end
for i = 6, first - 1 do
  if redis.call('EXISTS', P .. 'lease:' .. ARGV[i]) == 0 then
    redis.call('SREM', P .. 'hosts', ARGV[i])
  end
end
if ARGV[4] == '1' or removed > 0 then
  -- a monitor's removal counts like a sweep's, so stats() sees every dead entry
  redis.call('HINCRBY', P .. 'meta', 'sweeps', 1)
  redis.call('HINCRBY', P .. 'meta', 'dead_found', removed)
  redis.call('HSET', P .. 'meta', 'last_sweep', now)
end
return removed
"""
)

# ARGV: namespace ('' for every one). Returns {ns, key, value, ...} over the stored entries
# (dead ones included) and then the hosts whose lease expired, after a '' separator.
SCAN = (
    PRELUDE
    + r"""
local out = {}
local spaces
if ARGV[1] == '' then spaces = redis.call('SMEMBERS', P .. 'nss') else spaces = {ARGV[1]} end
for _, ns in ipairs(spaces) do
  local all = redis.call('HGETALL', P .. 'ns:' .. ns)
  for i = 1, #all, 2 do
    out[#out + 1] = ns
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
out[#out + 1] = ''
return expired_hosts(out)
"""
)

# ARGV: ns, then index tags. Returns {key, value, ...} of the entries carrying every tag;
# members whose entry is gone or no longer carries the tag are swept from the index.
FIND = (
    PRELUDE
    + r"""
local ns = ARGV[1]
local hkey = P .. 'ns:' .. ns
local sets = {}
for i = 2, #ARGV do sets[#sets + 1] = P .. 'ix:' .. ns .. ':' .. ARGV[i] end
local out = {}
for _, key in ipairs(redis.call('SINTER', unpack(sets))) do
  local v = redis.call('HGET', hkey, key)
  local keep = v ~= false
  if keep then
    local _, _, _, tags = parse(v)
    for i = 2, #ARGV do
      if not string.find(',' .. tags .. ',', ',' .. ARGV[i] .. ',', 1, true) then
        redis.call('SREM', sets[i - 1], key)
        keep = false
      end
    end
  else
    for _, set in ipairs(sets) do redis.call('SREM', set, key) end
  end
  if keep then
    out[#out + 1] = key
    out[#out + 1] = v
  end
end
return out
"""
)

# ARGV: after, limit, ring. Returns {last seq, up to limit stream entries numbered after
# ``after`` among the newest ``ring``}: read together, so the client's lost-event arithmetic
# sees the log as one moment left it. (The stream is trimmed with ``MAXLEN ~``, which is
# cheaper and may keep a few more than ``ring``: those are not served, so every reader
# sees exactly a ring of ``ring`` events.)
EVENTS = (
    PRELUDE
    + r"""
local last = tonumber(redis.call('HGET', P .. 'meta', 'seq'))
local from = math.max(tonumber(ARGV[1]) + 1, last - tonumber(ARGV[3]) + 1)
return {last, redis.call('XRANGE', P .. 'ev', from .. '-1', '+', 'COUNT', ARGV[2])}
"""
)

# No ARGV. The newest event's number: what pollers ask.
LAST = (
    PRELUDE
    + r"""
return tonumber(redis.call('HGET', P .. 'meta', 'seq'))
"""
)

# No ARGV. The hosts whose lease expired (their entries read as dead).
EXPIRED = (
    PRELUDE
    + r"""
return expired_hosts({})
"""
)

# ARGV: host, lease_ms. Renews the host's lease; returns the hosts whose lease expired.
HEARTBEAT = (
    PRELUDE
    + r"""
redis.call('SET', P .. 'lease:' .. ARGV[1], '1', 'PX', ARGV[2])
redis.call('SADD', P .. 'hosts', ARGV[1])
return expired_hosts({})
"""
)

# No ARGV. Returns {seq, gen, sweeps, dead_found, last_sweep, namespaces}.
META = (
    PRELUDE
    + r"""
local m = redis.call('HMGET', P .. 'meta', 'seq', 'gen', 'sweeps', 'dead_found', 'last_sweep')
m[6] = redis.call('SCARD', P .. 'nss')
return m
"""
)

# ARGV: ns, key, old value ('' when absent), delete (0/1), pid, start, host, tags, metadata,
# wanted generation, now, ring, lease_ms. Migration's compare-and-swap of one entry: replaces
# the stored value only if it is still ``old`` (the client judged that one). The generation
# rule is ``shmreg.backends._portable.imported_generation``. Returns {'MOVED'} when the value
# changed meanwhile, {0} after a removal, else {1, generation}.
SWAP = (
    PRELUDE
    + r"""
local ns, key, old = ARGV[1], ARGV[2], ARGV[3]
local now, ring = ARGV[11], ARGV[12]
local hkey = P .. 'ns:' .. ns
local v = redis.call('HGET', hkey, key)
if (v or '') ~= old then return {'MOVED'} end
local opid, ostart, ogen, otags, ohost
if v then opid, ostart, ogen, otags, ohost = parse(v) end
if ARGV[4] == '1' then
  if v then
    emit(ring, now, 'unregistered', ns, key, opid, ogen, '', ostart, ohost)
    redis.call('HDEL', hkey, key)
    if redis.call('EXISTS', hkey) == 0 then redis.call('SREM', P .. 'nss', ns) end
    index('SREM', ns, key, otags)
  end
  return {0}
end
local pid, start, host, tags = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local counter = tonumber(redis.call('HGET', P .. 'meta', 'gen'))
local want = tonumber(ARGV[10])
local same = v and opid == pid and ostart == start and ohost == host
local gen = want
if not (same and tonumber(ogen) == want) then
  if want < 1 or (v and tonumber(ogen) >= want) then gen = counter + 1 end
end
local kind = 'registered'
if same then kind = 'updated' end
emit(ring, now, kind, ns, key, pid, gen, '', start, host)
if gen > counter then redis.call('HSET', P .. 'meta', 'gen', gen) end
if v then index('SREM', ns, key, otags) end
redis.call('HSET', hkey, key, pid .. '\t' .. start .. '\t' .. gen .. '\t' .. tags .. '\t' ..
  host .. '\n' .. ARGV[9])
redis.call('SADD', P .. 'nss', ns)
index('SADD', ns, key, tags)
if ARGV[13] ~= '0' then
  redis.call('SET', P .. 'lease:' .. host, '1', 'PX', ARGV[13])
  redis.call('SADD', P .. 'hosts', host)
end
return {1, gen}
"""
)

# No ARGV. The namespaces holding entries.
NAMESPACES = (
    PRELUDE
    + r"""
return redis.call('SMEMBERS', P .. 'nss')
"""
)
