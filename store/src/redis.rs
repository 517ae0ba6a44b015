//! The production backend: Redis (or Redis Cluster), shared by every proxy replica.
//!
//! Per agent (every key carries the hash tag `{agent}`, so one agent's keys share a Cluster
//! slot and a script may touch them together):
//! - `c:{agent}:evt`: a stream; entry id `0-<offset>`, one field whose name is
//!   `<received_ms> <size> <cb>` (`cb`: bytes appended before this entry) and whose value is
//!   the record. One field rather than four: replay is bound by parsing XRANGE replies, and the
//!   `redis` crate's parser costs about 0.3 µs per RESP value (measured: 3.7 µs per 1 KiB event
//!   with four fields, 2.3 µs with one). The header is the field's name so that the record
//!   passes through the script untouched: Redis's Lua hashes every byte of every string it
//!   creates, so building `header + record` in the script cost a second pass over the record.
//!   Two earlier layouts are still read: one field `e` = `<received_ms> <size> <cb>\n<record>`,
//!   and four fields `record`, `received_ms`, `size`, `cb`.
//! - `c:{agent}:meta`: a hash: `epoch`, `head`, `cursor`, `bytes` (size of pending events),
//!   `appended` (bytes ever appended).
//! - `c:{agent}:drop`: a sorted set of events an operator dropped while pending (member
//!   `<offset>:<size>`, score the offset); their stream entries are deleted. Kept while their
//!   offsets are within the retained range, so pending counts and rewinds can account for them.
//! - `c:{agent}:dd:<dedupe key>`: the offset an event was stored at, expiring after the
//!   dedupe TTL.
//! - `c:{agent}:send:<idempotency key>`: `inflight`, or the postcard-encoded `SendResult`.
//!
//! Append and ack are each ONE Lua script, so they are atomic. Appends are group committed:
//! a task takes every append queued while its previous round was in flight and sends one
//! `APPEND` call per agent for them (the Lua call itself cost Redis more than the commands it
//! runs); with `appendfsync always` Redis answers only after the AOF fsync, which the whole
//! round shares. All calls are pipelined on one multiplexed connection.
//!
//! The connection, the group-commit task and every call run as tasks on the runtime that
//! opened the store (the proxy's ingress runtime; QUIC has its own), each call a task of its
//! own so that a caller that gives up does not cancel a command already sent. An earlier
//! version ran them on a thread of their own, for a wake storm whose appends queued behind QUIC
//! handshakes; since QUIC has its own runtime and woken agents start warm, that thread only
//! added a hand-off to every call: without it, ingest acks 11% more per second on 2 cores
//! (alternated runs, BENCHMARKS.md) and the storm's overhead stays within its target.
//!
//! Agent ids are escaped in keys (`%`, `{`, `}`, `:` become `%XX`), so no agent id can break
//! out of its hash tag or collide with another agent's keys; dedupe and idempotency keys sit
//! at the end of the key after a fixed prefix and need no escaping.

use std::collections::HashMap;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Cmd, ErrorKind, Script, ServerErrorKind, Value};
use async_trait::async_trait;
use concierge_protocol::{EventData, EventRecord, SendResult};
use tokio::sync::{mpsc, oneshot};

use crate::{
    Appended, Position, SendClaim, Stats, Store, StoreError, StoreOptions, decode_result, encode_result, new_epoch,
};

/// Each connection attempt gives up after this long, so a dead Redis fails fast.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Each command gives up after this long, so no caller ever hangs on Redis.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnect attempts per failed request before the error is returned (the next request
/// starts a new round).
const RECONNECT_RETRIES: usize = 2;
/// Key written by `check_writable`, and how long it lives.
const READYZ_KEY: &str = "c:readyz";
const READYZ_TTL_MS: u64 = 60_000;
/// Value of a send key whose send has started but not finished. A postcard-encoded
/// `SendResult` starts with its variant index (0 or 1), so it can never equal this.
const INFLIGHT: &[u8] = b"inflight";

/// Shared by every script that touches an agent's meta hash: KEYS[1] = meta, KEYS[2] =
/// stream, KEYS[3] = dropped set, ARGV[1] = a fresh random epoch used only if the meta hash
/// does not exist. Every script calls `ensure_meta()` first, except `APPEND`, which calls it
/// only when its `HMGET` finds no meta hash (a command fewer on the hot path).
const PRELUDE: &str = r#"
local function id(offset) return string.format('0-%d', offset) end
local function field(fields, name)
  for i = 1, #fields, 2 do if fields[i] == name then return fields[i + 1] end end
  return nil
end
local function offset_of(entry) return tonumber(string.match(entry[1], '%-(%d+)$')) end
-- received_ms, size and cb of an entry's fields, in any of the layouts (see the module docs).
local function meta_of(fields)
  local header = fields[1] == 'e' and fields[2] or (#fields == 2 and fields[1])
  if header then
    local ms, size, cb = string.match(header, '^(%d+) (%d+) (%d+)')
    return tonumber(ms) or 0, tonumber(size) or 0, tonumber(cb) or 0
  end
  return tonumber(field(fields, 'received_ms') or '0'), tonumber(field(fields, 'size') or '0'),
    tonumber(field(fields, 'cb') or '0')
end
-- Creates the meta hash with a new epoch on first use, or after Redis lost it. If the
-- stream survived (eviction), offsets continue after its last entry and every surviving
-- entry counts as pending again (at-least-once), so nothing is skipped or overwritten; the
-- gaps between surviving entries are dropped events, and are recorded as such again.
local function ensure_meta()
  if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1]) == 0 then return end
  redis.call('DEL', KEYS[3])
  local head, bytes, cursor, appended = 0, 0, 0, 0
  local entries = redis.call('XRANGE', KEYS[2], '-', '+')
  for i, entry in ipairs(entries) do
    local offset = offset_of(entry)
    local _, size, cb = meta_of(entry[2])
    if i == 1 then cursor = offset - 1 end
    if i > 1 then
      for gap = head + 1, offset - 1 do
        -- The whole gap's bytes go to its first offset: sums over the set stay exact.
        local size = gap == head + 1 and cb - appended or 0
        redis.call('ZADD', KEYS[3], gap, string.format('%d:%d', gap, size))
      end
    end
    head = offset
    bytes = bytes + size
    appended = cb + size
  end
  redis.call('HSET', KEYS[1], 'head', head, 'cursor', cursor, 'bytes', bytes, 'appended', appended)
end
-- Bytes of the dropped events after `offset`.
local function dropped_bytes_after(offset)
  local total = 0
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], string.format('(%d', offset), '+inf')) do
    total = total + tonumber(string.match(member, ':(%d+)$'))
  end
  return total
end
-- Bytes stored after `offset`: every entry records the bytes appended before it ('cb'), so
-- this is one lookup however many events an ack covers (plus the dropped ones, usually none).
local function bytes_after(offset)
  local nxt = redis.call('XRANGE', KEYS[2], id(offset + 1), '+', 'COUNT', 1)
  if #nxt == 0 then return 0 end
  local appended = tonumber(redis.call('HGET', KEYS[1], 'appended') or '0')
  local _, _, cb = meta_of(nxt[1][2])
  return appended - cb - dropped_bytes_after(offset_of(nxt[1]))
end
-- The cursor moves over dropped events right after it (nobody will ever ack them): to just
-- before the next surviving entry, or to head when none survives.
local function skip_dropped(cursor, head)
  if redis.call('ZCOUNT', KEYS[3], cursor + 1, cursor + 1) == 0 then return cursor end
  local nxt = redis.call('XRANGE', KEYS[2], id(cursor + 1), '+', 'COUNT', 1)
  if #nxt == 0 then return head end
  return offset_of(nxt[1]) - 1
end
-- Trims acked events beyond the retention, and deletes a drained stream: an empty stream
-- still costs ~4.7 KB. The meta hash stays, so offsets never restart.
local function trim(cursor, head, retain)
  if cursor == head and retain == 0 then
    redis.call('DEL', KEYS[2], KEYS[3])
  elseif cursor - retain >= 1 then
    redis.call('XTRIM', KEYS[2], 'MINID', id(cursor - retain + 1))
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', cursor - retain)
  end
end
"#;

/// Appends a batch of one agent's events in arrival order (group commit: one script call
/// for every append that queued while the previous call was in flight).
///
/// KEYS[4..] = the dedupe keys of the batch; ARGV[2] = dedupe TTL in ms; then 4 values per
/// event: record, `<received_ms> <size>`, size, and the index in KEYS of its dedupe key
/// (0 = none). Returns a flat array: per event 1 (stored) or 0 (duplicate), then its offset.
///
/// Each command inside a script costs Redis about 1 µs on top of its own work, so the script
/// runs as few as it can: the counters are read once and written once per batch, and a dedupe
/// key is checked and claimed by one `SET NX GET` (a key repeated within the batch finds its
/// first occurrence's offset). The claim comes before the `XADD`; should the `XADD` fail, the
/// claim is released, the counters cover what was stored, and the call fails, so a retry of
/// that event is stored rather than answered as a duplicate of nothing.
const APPEND: &str = r#"
local meta = redis.call('HMGET', KEYS[1], 'head', 'appended', 'bytes')
if not meta[1] then
  ensure_meta()
  meta = redis.call('HMGET', KEYS[1], 'head', 'appended', 'bytes')
end
local head, cb, bytes = tonumber(meta[1]), tonumber(meta[2]), tonumber(meta[3])
local function save()
  redis.call('HSET', KEYS[1], 'head', string.format('%d', head), 'appended', string.format('%d', cb),
    'bytes', string.format('%d', bytes))
end
local ttl, out, stored = ARGV[2], {}, 0
for i = 3, #ARGV, 4 do
  local k = tonumber(ARGV[i + 3])
  local key = k > 0 and KEYS[k] or nil
  local offset = string.format('%d', head + 1)
  local original = key and redis.call('SET', key, offset, 'NX', 'GET', 'PX', ttl)
  if original then
    out[#out + 1], out[#out + 2] = 0, tonumber(original)
  else
    local added = redis.pcall('XADD', KEYS[2], id(head + 1), string.format('%s %d', ARGV[i + 1], cb), ARGV[i])
    if type(added) == 'table' and added.err then
      if key then redis.call('DEL', key) end
      if stored > 0 then save() end
      return redis.error_reply('ERR XADD of offset ' .. offset .. ' failed: ' .. added.err)
    end
    local size = tonumber(ARGV[i + 2])
    head, cb, bytes, stored = head + 1, cb + size, bytes + size, stored + 1
    out[#out + 1], out[#out + 2] = 1, head
  end
end
if stored > 0 then save() end
return out
"#;

/// ARGV[2] = up_to, ARGV[3] = retain_acked. Returns the new cursor.
const ACK: &str = r#"
ensure_meta()
local head = tonumber(redis.call('HGET', KEYS[1], 'head'))
local cursor = tonumber(redis.call('HGET', KEYS[1], 'cursor'))
local target = math.min(tonumber(ARGV[2]), head)
if target > cursor then
  target = skip_dropped(target, head)
  redis.call('HSET', KEYS[1], 'cursor', target, 'bytes', bytes_after(target))
  cursor = target
end
trim(cursor, head, tonumber(ARGV[3]))
return cursor
"#;

/// ARGV[2] = target cursor. Returns {1, new cursor}, or {0, cursor} when the target is past
/// the cursor, or {-1, cursor} when events after the target are no longer retained.
const REWIND: &str = r#"
ensure_meta()
local cursor = tonumber(redis.call('HGET', KEYS[1], 'cursor'))
local target = tonumber(ARGV[2])
if target > cursor then return {0, cursor} end
if target == cursor then return {1, cursor} end
local entries = redis.call('XRANGE', KEYS[2], id(target + 1), id(cursor))
local dropped = redis.call('ZCOUNT', KEYS[3], target + 1, cursor)
if #entries + dropped ~= cursor - target then return {-1, cursor} end
redis.call('HSET', KEYS[1], 'cursor', target, 'bytes', bytes_after(target))
return {1, target}
"#;

/// Returns {epoch, cursor, head}.
const POSITION: &str = r#"
ensure_meta()
return redis.call('HMGET', KEYS[1], 'epoch', 'cursor', 'head')
"#;

/// Returns {epoch, cursor, head, pending bytes, dropped pending, received_ms of the oldest
/// pending or nil}.
const STATS: &str = r#"
ensure_meta()
local m = redis.call('HMGET', KEYS[1], 'epoch', 'cursor', 'head', 'bytes')
local oldest = false
local first = redis.call('XRANGE', KEYS[2], id(tonumber(m[2]) + 1), '+', 'COUNT', 1)
if #first > 0 then oldest = meta_of(first[1][2]) end
local dropped = redis.call('ZCOUNT', KEYS[3], '(' .. m[2], '+inf')
return {m[1], m[2], m[3], m[4], dropped, oldest}
"#;

/// ARGV[2] = retain_acked, ARGV[3..] = offsets to drop. Returns {dropped now, new cursor}.
const DROP: &str = r#"
ensure_meta()
local head = tonumber(redis.call('HGET', KEYS[1], 'head'))
local cursor = tonumber(redis.call('HGET', KEYS[1], 'cursor'))
local dropped, freed = 0, 0
for i = 3, #ARGV do
  local offset = tonumber(ARGV[i])
  if offset and offset > cursor and offset <= head then
    local entry = redis.call('XRANGE', KEYS[2], id(offset), id(offset))
    if #entry == 1 then
      local _, size = meta_of(entry[1][2])
      redis.call('XDEL', KEYS[2], id(offset))
      redis.call('ZADD', KEYS[3], offset, string.format('%d:%d', offset, size))
      dropped, freed = dropped + 1, freed + size
    end
  end
end
if dropped > 0 then
  redis.call('HINCRBY', KEYS[1], 'bytes', -freed)
  local moved = skip_dropped(cursor, head)
  if moved ~= cursor then
    redis.call('HSET', KEYS[1], 'cursor', moved)
    cursor = moved
  end
  trim(cursor, head, tonumber(ARGV[2]))
end
return {dropped, cursor}
"#;

/// KEYS[1] = send key, ARGV[1] = TTL in ms. Returns nil when claimed, else the key's value.
const CLAIM: &str = r#"
if redis.call('SET', KEYS[1], 'inflight', 'NX', 'PX', ARGV[1]) then return false end
return redis.call('GET', KEYS[1])
"#;

/// The loaded scripts (Redis caches them by SHA; `redis::Script` re-loads after a restart).
struct Scripts {
    append: Script,
    ack: Script,
    rewind: Script,
    position: Script,
    stats: Script,
    drop: Script,
    claim: Script,
}

impl Scripts {
    fn new() -> Self {
        let with_prelude = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Self {
            append: with_prelude(APPEND),
            ack: with_prelude(ACK),
            rewind: with_prelude(REWIND),
            position: with_prelude(POSITION),
            stats: with_prelude(STATS),
            drop: with_prelude(DROP),
            claim: Script::new(CLAIM),
        }
    }
}

/// The Redis store: shared by replicas, reconnects by itself after Redis restarts.
pub struct RedisStore {
    inner: std::sync::Arc<Inner>,
    /// Appends wait here for the group-commit task ([`commit_appends`]).
    appends: mpsc::Sender<AppendJob>,
    /// Where the store's tasks run: the runtime that opened it.
    runtime: tokio::runtime::Handle,
}

/// What every call needs; shared with the tasks that run the calls.
struct Inner {
    conn: ConnectionManager,
    opts: StoreOptions,
    scripts: Scripts,
}

/// Most appends one script call carries, and most record bytes: bounds the script's run time
/// (Redis serves nobody else meanwhile) and the size of one command.
const MAX_BATCH_EVENTS: usize = 256;
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Appends queued for the group-commit task before callers wait for room.
const APPEND_QUEUE: usize = 4096;

/// One append waiting for its batch.
struct AppendJob {
    agent: String,
    record: Vec<u8>,
    received_at_ms: u64,
    size: u64,
    dedupe_key: Option<String>,
    done: oneshot::Sender<Result<Appended, StoreError>>,
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`); fails if Redis cannot be reached now.
    pub async fn connect(url: &str, opts: StoreOptions) -> Result<RedisStore, StoreError> {
        // The URL may carry a password: messages show it redacted.
        let shown = redact_url(url);
        let client = Client::open(url).map_err(|e| StoreError::Config(format!("invalid Redis URL {shown:?}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(1));
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| StoreError::Config(format!("the Redis store needs a Tokio runtime: {e}")))?;
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot connect to Redis at {shown}: {e}")))?;
        let scripts = Scripts::new();
        let (appends, queued) = mpsc::channel(APPEND_QUEUE);
        runtime.spawn(commit_appends(queued, conn.clone(), scripts.append.clone(), opts.dedupe_ttl));
        Ok(RedisStore { inner: std::sync::Arc::new(Inner { conn, opts, scripts }), appends, runtime })
    }

    /// Runs `call` with the shared state as a task of its own, so that it completes even if
    /// the caller stops waiting for it.
    async fn spawned<T: Send + 'static, F>(
        &self,
        call: impl FnOnce(std::sync::Arc<Inner>) -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        self.runtime
            .spawn(call(self.inner.clone()))
            .await
            .map_err(|e| StoreError::Unavailable(format!("the Redis store's runtime stopped: {e}")))?
    }
}

/// Runs `EVALSHA` of `script` with `keys` and `args`, loading the script once if Redis does
/// not know it (first use, or after a restart).
///
/// The command is built directly rather than through `redis::ScriptInvocation`, which copies
/// every key and argument into a vector of its own before copying them again into the
/// command: on the append path that was two extra copies of every event record.
async fn eval<T: ::redis::FromRedisValue>(
    conn: &mut ConnectionManager,
    script: &Script,
    keys: &[&str],
    args: impl FnOnce(&mut Cmd),
) -> ::redis::RedisResult<T> {
    let mut cmd = ::redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
    args(&mut cmd);
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            script.prepare_invoke().load_async(conn).await?;
            cmd.query_async(conn).await
        }
        other => other,
    }
}

/// The group-commit task: takes every append queued while the previous round was in flight,
/// and sends one `APPEND` script call per agent for them, all pipelined on the connection.
///
/// Under load a round carries many events for the price of one script call (the Lua call
/// overhead in Redis was larger than the commands it runs); when idle, a round is one event
/// and costs what a direct call would. Ends when the store is dropped.
async fn commit_appends(
    mut queued: mpsc::Receiver<AppendJob>,
    conn: ConnectionManager,
    script: Script,
    dedupe_ttl: Duration,
) {
    let ttl = ttl_ms(dedupe_ttl);
    while let Some(first) = queued.recv().await {
        let mut bytes = first.record.len();
        let mut round = vec![first];
        while round.len() < MAX_BATCH_EVENTS * 4 && bytes < MAX_BATCH_BYTES * 4 {
            match queued.try_recv() {
                Ok(job) => {
                    bytes += job.record.len();
                    round.push(job);
                }
                Err(_) => break,
            }
        }
        let batches = batches_by_agent(round);
        let calls = batches.into_iter().map(|batch| {
            let mut conn = conn.clone();
            let script = &script;
            async move { commit_batch(&mut conn, script, ttl, batch).await }
        });
        futures::future::join_all(calls).await;
    }
}

/// Splits a round into per-agent batches (arrival order kept within each), each within the
/// batch limits.
fn batches_by_agent(round: Vec<AppendJob>) -> Vec<Vec<AppendJob>> {
    let mut batches: Vec<(usize, Vec<AppendJob>)> = Vec::new();
    let mut open: HashMap<String, usize> = HashMap::new();
    for job in round {
        let index = match open.get(&job.agent) {
            Some(&i) if batches[i].1.len() < MAX_BATCH_EVENTS && batches[i].0 + job.record.len() <= MAX_BATCH_BYTES => {
                i
            }
            _ => {
                batches.push((0, Vec::new()));
                open.insert(job.agent.clone(), batches.len() - 1);
                batches.len() - 1
            }
        };
        batches[index].0 += job.record.len();
        batches[index].1.push(job);
    }
    batches.into_iter().map(|(_, jobs)| jobs).collect()
}

/// One `APPEND` call for one agent's batch; answers every job in it.
async fn commit_batch(conn: &mut ConnectionManager, script: &Script, ttl: u64, batch: Vec<AppendJob>) {
    let Some(agent) = batch.first().map(|j| j.agent.clone()) else { return };
    let keys = AgentKeys::new(&agent);
    let dedupe_keys: Vec<String> =
        batch.iter().filter_map(|j| j.dedupe_key.as_deref()).map(|d| keys.dedupe(d)).collect();
    let mut key_list = Vec::with_capacity(3 + dedupe_keys.len());
    key_list.extend(keys.log());
    key_list.extend(dedupe_keys.iter().map(String::as_str));
    let reply: Result<Vec<u64>, _> = eval(conn, script, &key_list, |c| {
        c.arg(new_epoch()).arg(ttl);
        let mut next_key = 4;
        for job in &batch {
            c.arg(&job.record).arg(format!("{} {}", job.received_at_ms, job.size)).arg(job.size);
            if job.dedupe_key.is_some() {
                c.arg(next_key);
                next_key += 1;
            } else {
                c.arg(0);
            }
        }
    })
    .await;
    match reply {
        Ok(flat) if flat.len() == 2 * batch.len() => {
            for (job, pair) in batch.into_iter().zip(flat.chunks_exact(2)) {
                let appended = if pair[0] == 1 { Appended::Stored(pair[1]) } else { Appended::Duplicate(pair[1]) };
                let _ = job.done.send(Ok(appended));
            }
        }
        Ok(flat) => {
            let why = format!("Redis append for agent {agent:?}: {} values for {} events", flat.len(), batch.len());
            for job in batch {
                let _ = job.done.send(Err(StoreError::Corrupt(why.clone())));
            }
        }
        Err(e) => {
            let why = format!("Redis append for agent {agent:?} failed: {e}");
            for job in batch {
                let _ = job.done.send(Err(StoreError::Unavailable(why.clone())));
            }
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn append(&self, event: &EventData) -> Result<Appended, StoreError> {
        let (done, answer) = oneshot::channel();
        let job = AppendJob {
            agent: event.agent.clone(),
            record: event.to_record(),
            received_at_ms: event.received_at_ms,
            size: event.size_hint() as u64,
            dedupe_key: event.dedupe_key.clone(),
            done,
        };
        let gone =
            || StoreError::Unavailable(format!("Redis append for agent {:?}: the store is shutting down", event.agent));
        self.appends.send(job).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    async fn read_records(&self, agent: &str, after: u64, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        let agent = agent.to_owned();
        self.spawned(|i| async move { i.read_records(&agent, after, limit).await }).await
    }

    async fn ack(&self, agent: &str, up_to: u64) -> Result<u64, StoreError> {
        let agent = agent.to_owned();
        self.spawned(|i| async move { i.ack(&agent, up_to).await }).await
    }

    async fn rewind(&self, agent: &str, to: u64) -> Result<u64, StoreError> {
        let agent = agent.to_owned();
        self.spawned(|i| async move { i.rewind(&agent, to).await }).await
    }

    async fn drop_events(&self, agent: &str, offsets: &[u64]) -> Result<u64, StoreError> {
        let (agent, offsets) = (agent.to_owned(), offsets.to_vec());
        self.spawned(|i| async move { i.drop_events(&agent, &offsets).await }).await
    }

    async fn position(&self, agent: &str) -> Result<Position, StoreError> {
        let agent = agent.to_owned();
        self.spawned(|i| async move { i.position(&agent).await }).await
    }

    async fn stats(&self, agent: &str) -> Result<Stats, StoreError> {
        let agent = agent.to_owned();
        self.spawned(|i| async move { i.stats(&agent).await }).await
    }

    async fn claim_send(&self, agent: &str, key: &str) -> Result<SendClaim, StoreError> {
        let (agent, key) = (agent.to_owned(), key.to_owned());
        self.spawned(|i| async move { i.claim_send(&agent, &key).await }).await
    }

    async fn finish_send(&self, agent: &str, key: &str, result: &SendResult) -> Result<(), StoreError> {
        let (agent, key, result) = (agent.to_owned(), key.to_owned(), result.clone());
        self.spawned(|i| async move { i.finish_send(&agent, &key, &result).await }).await
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        self.spawned(|i| async move { i.check_writable().await }).await
    }

    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_owned();
        self.spawned(|i| async move { i.get_state(&key).await }).await
    }

    async fn put_state(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let (key, value) = (key.to_owned(), value.to_vec());
        self.spawned(|i| async move { i.put_state(&key, &value).await }).await
    }

    async fn warnings(&self) -> Vec<String> {
        self.spawned(|i| async move { Ok(i.warnings().await) }).await.unwrap_or_else(|e| vec![e.to_string()])
    }
}

/// The calls themselves; [`RedisStore`] runs each as a task of its own.
impl Inner {
    /// A handle on the shared multiplexed connection (cheap; requests are pipelined).
    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// [`eval`] on this store's connection.
    async fn eval<T: ::redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: impl FnOnce(&mut Cmd),
    ) -> ::redis::RedisResult<T> {
        eval(&mut self.conn(), script, keys, args).await
    }

    async fn read_records(&self, agent: &str, after: u64, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let keys = AgentKeys::new(agent);
        let reply: Value = ::redis::cmd("XRANGE")
            .arg(&keys.evt)
            .arg(format!("0-{}", after.saturating_add(1)))
            .arg("+")
            .arg("COUNT")
            // Redis parses COUNT as a signed 64-bit integer.
            .arg(i64::try_from(limit).unwrap_or(i64::MAX))
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable("read", agent, e))?;
        parse_entries(agent, reply)
    }

    async fn ack(&self, agent: &str, up_to: u64) -> Result<u64, StoreError> {
        let keys = AgentKeys::new(agent);
        self.eval(&self.scripts.ack, &keys.log(), |c| {
            c.arg(new_epoch()).arg(up_to).arg(self.opts.retain_acked);
        })
        .await
        .map_err(|e| unavailable("ack", agent, e))
    }

    async fn rewind(&self, agent: &str, to: u64) -> Result<u64, StoreError> {
        let keys = AgentKeys::new(agent);
        let (status, cursor): (i64, u64) = self
            .eval(&self.scripts.rewind, &keys.log(), |c| {
                c.arg(new_epoch()).arg(to);
            })
            .await
            .map_err(|e| unavailable("rewind", agent, e))?;
        match status {
            1 => Ok(cursor),
            0 => Err(StoreError::Rejected(format!(
                "cannot rewind agent {agent:?} forward to {to}: its cursor is {cursor}"
            ))),
            _ => Err(StoreError::Rejected(format!(
                "cannot rewind agent {agent:?} to {to}: events {}..={cursor} are no longer retained (raise store.retain_acked)",
                to + 1
            ))),
        }
    }

    async fn drop_events(&self, agent: &str, offsets: &[u64]) -> Result<u64, StoreError> {
        if offsets.is_empty() {
            return Ok(0);
        }
        let keys = AgentKeys::new(agent);
        let (dropped, _cursor): (u64, u64) = self
            .eval(&self.scripts.drop, &keys.log(), |c| {
                c.arg(new_epoch()).arg(self.opts.retain_acked).arg(offsets);
            })
            .await
            .map_err(|e| unavailable("drop_events", agent, e))?;
        Ok(dropped)
    }

    async fn position(&self, agent: &str) -> Result<Position, StoreError> {
        let keys = AgentKeys::new(agent);
        let (epoch, cursor, head): (u64, u64, u64) = self
            .eval(&self.scripts.position, &keys.log(), |c| {
                c.arg(new_epoch());
            })
            .await
            .map_err(|e| unavailable("position", agent, e))?;
        Ok(Position { epoch, cursor, head })
    }

    async fn stats(&self, agent: &str) -> Result<Stats, StoreError> {
        let keys = AgentKeys::new(agent);
        type Reply = (u64, u64, u64, u64, u64, Option<u64>);
        let (epoch, cursor, head, pending_bytes, dropped, oldest_pending_ms): Reply = self
            .eval(&self.scripts.stats, &keys.log(), |c| {
                c.arg(new_epoch());
            })
            .await
            .map_err(|e| unavailable("stats", agent, e))?;
        Ok(Stats {
            pending: head.saturating_sub(cursor).saturating_sub(dropped),
            pending_bytes,
            oldest_pending_ms,
            position: Position { epoch, cursor, head },
        })
    }

    async fn claim_send(&self, agent: &str, key: &str) -> Result<SendClaim, StoreError> {
        let send_key = AgentKeys::new(agent).send(key);
        let existing: Option<Vec<u8>> = self
            .eval(&self.scripts.claim, &[send_key.as_str()], |c| {
                c.arg(ttl_ms(self.opts.send_ttl));
            })
            .await
            .map_err(|e| unavailable("claim_send", agent, e))?;
        match existing {
            None => Ok(SendClaim::Claimed),
            Some(value) if value == INFLIGHT => Ok(SendClaim::InFlight),
            Some(value) => Ok(SendClaim::Done(decode_result(&value)?)),
        }
    }

    async fn finish_send(&self, agent: &str, key: &str, result: &SendResult) -> Result<(), StoreError> {
        ::redis::cmd("SET")
            .arg(AgentKeys::new(agent).send(key))
            .arg(encode_result(result)?)
            .arg("PX")
            .arg(ttl_ms(self.opts.send_ttl))
            .exec_async(&mut self.conn())
            .await
            .map_err(|e| unavailable("finish_send", agent, e))
    }

    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        ::redis::cmd("GET")
            .arg(format!("c:state:{{{}}}", escape_agent(key)))
            .query_async(&mut self.conn())
            .await
            .map_err(|e| StoreError::Unavailable(format!("Redis get_state {key:?}: {e}")))
    }

    async fn put_state(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        ::redis::cmd("SET")
            .arg(format!("c:state:{{{}}}", escape_agent(key)))
            .arg(value)
            .exec_async(&mut self.conn())
            .await
            .map_err(|e| StoreError::Unavailable(format!("Redis put_state {key:?}: {e}")))
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        ::redis::cmd("SET")
            .arg(READYZ_KEY)
            .arg(concierge_protocol::now_ms())
            .arg("PX")
            .arg(READYZ_TTL_MS)
            .exec_async(&mut self.conn())
            .await
            .map_err(|e| StoreError::Unavailable(format!("Redis refused a write: {e}")))
    }

    async fn warnings(&self) -> Vec<String> {
        let mut settings = Vec::new();
        for name in ["appendonly", "appendfsync", "maxmemory-policy"] {
            let reply: Result<Vec<String>, _> =
                ::redis::cmd("CONFIG").arg("GET").arg(name).query_async(&mut self.conn()).await;
            match reply {
                // CONFIG GET answers [name, value]; an empty answer means the setting is unknown.
                Ok(pair) => settings.push((name, pair.get(1).cloned().unwrap_or_default())),
                Err(e) => {
                    return vec![format!(
                        "cannot read Redis persistence settings (CONFIG GET {name} failed: {e}); CONFIG may be \
                         disabled or renamed, so check by hand that appendonly is yes, appendfsync is always and \
                         maxmemory-policy is noeviction, or acked events can be lost (write-before-ack)"
                    )];
                }
            }
        }
        settings.iter().filter_map(|(name, value)| setting_warning(name, value)).collect()
    }
}

/// The warning for one Redis setting, if its value breaks write-before-ack.
fn setting_warning(name: &str, value: &str) -> Option<String> {
    match (name, value) {
        ("appendonly", "yes") | ("appendfsync", "always") | ("maxmemory-policy", "noeviction") => None,
        ("appendonly", v) => Some(format!(
            "Redis appendonly is {v:?}: without the append-only file every event acked to a platform since \
             the last snapshot is lost when Redis restarts, which breaks write-before-ack; set appendonly yes"
        )),
        ("appendfsync", "everysec") => Some(
            "Redis appendfsync is \"everysec\": a crash can lose about the last 1 s of events already acked to \
             platforms (write-before-ack); set appendfsync always for strict durability"
                .to_owned(),
        ),
        ("appendfsync", v) => Some(format!(
            "Redis appendfsync is {v:?}: writes are acked before they reach the disk, so a crash can lose events \
             already acked to platforms (write-before-ack); set appendfsync always"
        )),
        ("maxmemory-policy", v) => Some(format!(
            "Redis maxmemory-policy is {v:?}: under memory pressure Redis may evict buffered events, cursors or \
             dedupe keys that were already acked to platforms (write-before-ack); set maxmemory-policy noeviction"
        )),
        _ => None,
    }
}

/// The keys of one agent.
struct AgentKeys {
    /// `c:{agent}:` with the agent id escaped.
    prefix: String,
    meta: String,
    evt: String,
    drop: String,
}

impl AgentKeys {
    fn new(agent: &str) -> Self {
        // On every append: plain pushes, not format! (measurably cheaper per event).
        let with = |suffix: &str, prefix: &str| {
            let mut key = String::with_capacity(prefix.len() + suffix.len());
            key.push_str(prefix);
            key.push_str(suffix);
            key
        };
        let mut prefix = String::with_capacity(agent.len() + 8);
        prefix.push_str("c:{");
        escape_agent_into(agent, &mut prefix);
        prefix.push_str("}:");
        Self { meta: with("meta", &prefix), evt: with("evt", &prefix), drop: with("drop", &prefix), prefix }
    }

    /// The keys every log script declares (KEYS[1..=3]), so a Cluster routes it to their slot.
    fn log(&self) -> [&str; 3] {
        [self.meta.as_str(), self.evt.as_str(), self.drop.as_str()]
    }

    fn dedupe(&self, key: &str) -> String {
        format!("{}dd:{key}", self.prefix)
    }

    fn send(&self, key: &str) -> String {
        format!("{}send:{key}", self.prefix)
    }
}

/// Escapes an agent id for use inside a hash tag: `%`, `{`, `}` and `:` become `%XX`. The
/// empty id becomes `%` (never produced otherwise), because an empty tag `{}` would not
/// keep the agent's keys in one Cluster slot.
fn escape_agent(agent: &str) -> String {
    let mut out = String::with_capacity(agent.len() + 1);
    escape_agent_into(agent, &mut out);
    out
}

/// [`escape_agent`] appended to `out`.
fn escape_agent_into(agent: &str, out: &mut String) {
    if agent.is_empty() {
        out.push('%');
        return;
    }
    for c in agent.chars() {
        match c {
            '%' | '{' | '}' | ':' => {
                out.push('%');
                out.push_str(&format!("{:02X}", c as u32));
            }
            c => out.push(c),
        }
    }
}

/// Turns an XRANGE reply (`[[id, [field, value, ...]], ...]`) into events.
fn parse_entries(agent: &str, reply: Value) -> Result<Vec<EventRecord>, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("Redis stream of agent {agent:?}: {what}"));
    let Value::Array(entries) = reply else {
        return Err(corrupt("XRANGE did not return an array"));
    };
    // The reply is walked by value: each record's bytes move out of the reply tree instead of
    // being converted into intermediate strings and vectors (records are the bulk of a replay).
    let mut events = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(pair) = entry else {
            return Err(corrupt("malformed entry: not an array"));
        };
        let mut pair = pair.into_iter();
        let (Some(Value::BulkString(id)), Some(Value::Array(fields)), None) = (pair.next(), pair.next(), pair.next())
        else {
            return Err(corrupt("malformed entry: expected [id, [field, value, ...]]"));
        };
        let offset = id
            .strip_prefix(b"0-")
            .and_then(|o| std::str::from_utf8(o).ok())
            .and_then(|o| o.parse::<u64>().ok())
            .ok_or_else(|| corrupt(&format!("unexpected entry id {:?}", String::from_utf8_lossy(&id))))?;
        let (received_at_ms, record) =
            entry_fields(fields).map_err(|what| corrupt(&format!("entry 0-{offset} {what}")))?;
        events.push(EventRecord { offset, received_at_ms, record });
    }
    Ok(events)
}

/// `received_ms` and the record of an entry's fields, in any of the layouts (see the module
/// docs).
fn entry_fields(fields: Vec<Value>) -> Result<(u64, Vec<u8>), &'static str> {
    let received_ms = |header: &[u8]| -> Result<u64, &'static str> {
        let text = std::str::from_utf8(header).map_err(|_| "has a header that is not text")?;
        text.split(' ').next().and_then(|t| t.parse().ok()).ok_or("has a bad header")
    };
    let mut fields = fields.into_iter();
    let mut record = None;
    let mut received_at_ms = 0;
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        let (Value::BulkString(name), Value::BulkString(mut value)) = (name, value) else {
            return Err("has a field that is not a string");
        };
        match name.as_slice() {
            [b'0'..=b'9', ..] => {
                received_at_ms = received_ms(&name)?;
                record = Some(value);
            }
            b"e" => {
                let header = value.iter().take(64).position(|&b| b == b'\n').ok_or("has no header line")?;
                received_at_ms = received_ms(&value[..header])?;
                value.drain(..=header);
                record = Some(value);
            }
            b"record" => record = Some(value),
            b"received_ms" => {
                received_at_ms = std::str::from_utf8(&value).ok().and_then(|t| t.parse().ok()).unwrap_or(0)
            }
            _ => {}
        }
    }
    Ok((received_at_ms, record.ok_or("has no record")?))
}

/// The URL with any user info (`user:password@`) replaced, so it can appear in messages.
fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let sep = if scheme.is_empty() { "" } else { "://" };
            format!("{scheme}{sep}[redacted]@{}", &rest[at + 1..])
        }
        None => url.to_string(),
    }
}

/// Every Redis failure means "not durable": the caller must not ack.
fn unavailable(op: &str, agent: &str, e: ::redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("Redis {op} for agent {agent:?} failed: {e}"))
}

/// A TTL in whole milliseconds, at least 1 (Redis rejects `PX 0`).
fn ttl_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_cannot_escape_their_hash_tag() {
        assert_eq!(AgentKeys::new("bob").evt, "c:{bob}:evt");
        assert_eq!(AgentKeys::new("a}:dd:x").evt, "c:{a%7D%3Add%3Ax}:evt");
        assert_eq!(AgentKeys::new("%7D").meta, "c:{%257D}:meta");
        assert_eq!(AgentKeys::new("").meta, "c:{%}:meta");
        assert_eq!(AgentKeys::new("a").dedupe("k}{:"), "c:{a}:dd:k}{:");
    }

    #[test]
    fn urls_in_messages_hide_the_password() {
        assert_eq!(redact_url("redis://:pw@host:6379/0"), "redis://[redacted]@host:6379/0");
        assert_eq!(redact_url("redis://user:p@ss@host/0?x=@"), "redis://[redacted]@host/0?x=@");
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
        assert_eq!(redact_url("unix:///tmp/r.sock"), "unix:///tmp/r.sock");
    }

    fn bulk(b: &[u8]) -> Value {
        Value::BulkString(b.to_vec())
    }

    fn entry(id: &[u8], fields: &[(&[u8], &[u8])]) -> Value {
        let fields = fields.iter().flat_map(|(n, v)| [bulk(n), bulk(v)]).collect();
        Value::Array(vec![bulk(id), Value::Array(fields)])
    }

    #[test]
    fn stream_entries_parse_into_records_whatever_the_field_order() {
        let reply = Value::Array(vec![
            entry(b"0-7", &[(b"record", b"\x01\x02"), (b"received_ms", b"1234"), (b"size", b"2"), (b"cb", b"0")]),
            entry(b"0-9", &[(b"cb", b"2"), (b"received_ms", b"99"), (b"record", b"abc")]),
        ]);
        let got = parse_entries("a", reply).expect("well-formed reply");
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].offset, got[0].received_at_ms, got[0].record.as_slice()), (7, 1234, &b"\x01\x02"[..]));
        assert_eq!((got[1].offset, got[1].received_at_ms, got[1].record.as_slice()), (9, 99, &b"abc"[..]));
    }

    #[test]
    fn one_field_entries_give_the_header_and_the_record_in_both_layouts() {
        // The header as the field's name (current), or as the value's first line (`e`).
        let layouts: [[(&[u8], &[u8]); 2]; 2] = [
            [(b"1234 70 0", b"\x01{\"a\":\n1}"), (b"99 0 70", b"")],
            [(b"e", b"1234 70 0\n\x01{\"a\":\n1}"), (b"e", b"99 64 70\n")],
        ];
        for [first, second] in layouts {
            let reply = Value::Array(vec![entry(b"0-3", &[first]), entry(b"0-4", &[second])]);
            let got = parse_entries("a", reply).expect("well-formed reply");
            assert_eq!(
                (got[0].offset, got[0].received_at_ms, got[0].record.as_slice()),
                (3, 1234, &b"\x01{\"a\":\n1}"[..])
            );
            assert_eq!((got[1].offset, got[1].received_at_ms, got[1].record.as_slice()), (4, 99, &b""[..]));
        }
    }

    #[test]
    fn malformed_stream_entries_are_corrupt_errors_naming_the_agent() {
        let cases = [
            Value::Okay,
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![entry(b"1-7", &[(b"record", b"x")])]),
            Value::Array(vec![entry(b"0-x", &[(b"record", b"x")])]),
            Value::Array(vec![entry(b"0-7", &[(b"size", b"1")])]),
            Value::Array(vec![Value::Array(vec![bulk(b"0-7"), Value::Array(vec![bulk(b"record"), Value::Int(3)])])]),
            Value::Array(vec![Value::Array(vec![bulk(b"0-7"), Value::Array(vec![]), bulk(b"extra")])]),
            Value::Array(vec![entry(b"0-7", &[(b"e", b"no header line")])]),
            Value::Array(vec![entry(b"0-7", &[(b"e", b"x 1 2\nrecord")])]),
            Value::Array(vec![entry(b"0-7", &[(b"e", &[0xff, b' ', b'\n'])])]),
            Value::Array(vec![entry(b"0-7", &[(b"1x 2 3", b"record")])]),
            Value::Array(vec![entry(b"0-7", &[(&[b'1', 0xff], b"record")])]),
        ];
        for (i, reply) in cases.into_iter().enumerate() {
            match parse_entries("bob", reply) {
                Err(StoreError::Corrupt(m)) => assert!(m.contains("\"bob\""), "case {i}: {m}"),
                other => panic!("case {i}: expected a Corrupt error, got {other:?}"),
            }
        }
    }

    fn job(agent: &str, bytes: usize, tag: u64) -> AppendJob {
        let (done, _) = oneshot::channel();
        AppendJob { agent: agent.into(), record: vec![0; bytes], received_at_ms: tag, size: 0, dedupe_key: None, done }
    }

    #[test]
    fn rounds_split_per_agent_in_arrival_order_within_limits() {
        let mut round = Vec::new();
        for i in 0..(MAX_BATCH_EVENTS as u64 + 10) {
            round.push(job("a", 10, i));
            if i % 3 == 0 {
                round.push(job("b", 10, i));
            }
        }
        round.push(job("c", MAX_BATCH_BYTES - 5, 0));
        round.push(job("c", 10, 1));
        let batches = batches_by_agent(round);
        let summary: Vec<(String, Vec<u64>)> =
            batches.iter().map(|b| (b[0].agent.clone(), b.iter().map(|j| j.received_at_ms).collect())).collect();
        for (agent, tags) in &summary {
            assert!(batches.iter().all(|b| b.iter().all(|j| &j.agent == agent) || b[0].agent != *agent));
            assert!(tags.windows(2).all(|w| w[0] < w[1]), "{agent}: order kept within a batch: {tags:?}");
        }
        let of = |agent: &str| summary.iter().filter(|(a, _)| a == agent).map(|(_, t)| t.clone()).collect::<Vec<_>>();
        let a = of("a");
        assert_eq!(a.len(), 2, "the events cap splits agent a");
        assert_eq!(a[0].len(), MAX_BATCH_EVENTS);
        assert_eq!(a.concat(), (0..(MAX_BATCH_EVENTS as u64 + 10)).collect::<Vec<_>>());
        assert_eq!(of("b").len(), 1);
        assert_eq!(of("c"), vec![vec![0], vec![1]], "the bytes cap splits agent c");
    }

    #[test]
    fn good_settings_give_no_warning() {
        assert_eq!(setting_warning("appendonly", "yes"), None);
        assert_eq!(setting_warning("appendfsync", "always"), None);
        assert_eq!(setting_warning("maxmemory-policy", "noeviction"), None);
        let everysec = setting_warning("appendfsync", "everysec").unwrap_or_default();
        assert!(everysec.contains("1 s"), "{everysec}");
    }
}
