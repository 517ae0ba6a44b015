//! The embedded default backend: one SQLite file in WAL mode with `synchronous=FULL`.
//!
//! How it keeps promise 1 (write before ack) with useful throughput:
//! - ONE writer thread owns the write connection. Every write (append, ack, send claims,
//!   readiness checks) is a `Job` sent to it over a bounded channel (backpressure, promise 5).
//! - The writer takes the first queued job, drains whatever else is already queued (up to
//!   `MAX_BATCH`) and runs them all in ONE transaction: group commit, one fsync per batch.
//!   Each job runs inside its own savepoint, so a failing job is rolled back alone.
//! - A job's caller is answered only after `COMMIT` returned, and a failed commit fails every
//!   job of the batch. A crash mid-batch rolls the whole transaction back, so a partial append
//!   is never visible.
//! - Reads use a separate read-only connection on the blocking pool: WAL readers never block
//!   the writer and see only committed batches.
//! - A `<path>.lock` file locked for the store's lifetime refuses a second Concierge (in this
//!   or another process) on the same file.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use concierge_protocol::{EventData, EventRecord, SendResult, now_ms};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use crate::{
    Appended, Position, SendClaim, Stats, Store, StoreError, StoreOptions, decode_result, encode_result, new_epoch,
};

/// Most jobs committed in one transaction; bounds the latency of the first job in a batch.
const MAX_BATCH: usize = 512;
/// Jobs that may wait for the writer before callers feel backpressure.
const QUEUE_DEPTH: usize = 4096;
/// Expired dedupe keys and send results are swept every this many commits.
const SWEEP_EVERY_COMMITS: u64 = 64;
/// Most expired rows deleted per table per sweep, so a sweep never stalls a commit for long.
const SWEEP_LIMIT: i64 = 1000;
/// Schema version stored in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS agents (
    agent  TEXT PRIMARY KEY NOT NULL,
    epoch  INTEGER NOT NULL,
    head   INTEGER NOT NULL,
    cursor INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    agent       TEXT NOT NULL,
    offset      INTEGER NOT NULL,
    record      BLOB NOT NULL,
    received_ms INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    PRIMARY KEY (agent, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dropped (
    agent  TEXT NOT NULL,
    offset INTEGER NOT NULL,
    PRIMARY KEY (agent, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dedupe (
    agent      TEXT NOT NULL,
    key        TEXT NOT NULL,
    offset     INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (agent, key)
);
CREATE INDEX IF NOT EXISTS dedupe_expiry ON dedupe (expires_ms);
CREATE TABLE IF NOT EXISTS sends (
    agent      TEXT NOT NULL,
    key        TEXT NOT NULL,
    state      TEXT NOT NULL,
    result     BLOB,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (agent, key)
);
CREATE INDEX IF NOT EXISTS sends_expiry ON sends (expires_ms);
CREATE TABLE IF NOT EXISTS state (
    key   TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS health (
    id         INTEGER PRIMARY KEY,
    checked_ms INTEGER NOT NULL
);
";

/// `sends.state` while a send's outcome is unknown.
const STATE_INFLIGHT: &str = "inflight";
/// `sends.state` once `finish_send` recorded the result.
const STATE_DONE: &str = "done";

/// Work for the writer thread: `run` executes inside the batch transaction (in its own
/// savepoint) and says whether it succeeded; `answer` tells the caller the final outcome
/// once the batch's fate is known (`Ok` = committed), whether or not `run` ever ran.
trait Job: Send {
    /// Does the job's reads and writes; `false` means "roll my savepoint back".
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller; only called after COMMIT (or after the batch failed).
    fn answer(self: Box<Self>, committed: Result<(), StoreError>);
}

/// A [`Job`] computing a `T` with `f` and answering through a oneshot channel.
struct TypedJob<T, F> {
    f: Option<F>,
    outcome: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Job for TypedJob<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let outcome = match self.f.take() {
            Some(f) => f(conn),
            None => Err(StoreError::Unavailable("internal: SQLite job ran twice".into())),
        };
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn answer(self: Box<Self>, committed: Result<(), StoreError>) {
        let outcome = match (committed, self.outcome) {
            (Err(e), _) => Err(e),
            (Ok(()), Some(outcome)) => outcome,
            (Ok(()), None) => Err(StoreError::Unavailable("internal: SQLite job never ran".into())),
        };
        // The caller may have gone away; the write stands either way.
        let _ = self.reply.send(outcome);
    }
}

/// The embedded store: durable, single node, zero setup.
pub struct SqliteStore {
    /// The database file, for error messages.
    path: PathBuf,
    opts: StoreOptions,
    /// Queue to the writer thread; `None` only while dropping (closing it stops the writer).
    jobs: Option<mpsc::Sender<Box<dyn Job>>>,
    /// The writer thread, joined on drop so the file is quiet before the lock is released.
    writer: Option<JoinHandle<()>>,
    /// Read-only connection used from the blocking pool.
    reader: Arc<Mutex<Connection>>,
    /// Held (locked) for the store's lifetime; dropped last.
    _lock: File,
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`, refusing if another Concierge holds it.
    pub fn open(path: &Path, opts: StoreOptions) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Config(format!("cannot create the store directory {}: {e}", dir.display())))?;
        }
        let lock = acquire_lock(path)?;
        let write_conn = open_writer(path)?;
        let reader = open_reader(path)?;
        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        let writer = std::thread::Builder::new()
            .name("concierge-sqlite-writer".into())
            .spawn(move || run_writer(write_conn, queue))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the SQLite writer thread: {e}")))?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            opts,
            jobs: Some(jobs),
            writer: Some(writer),
            reader: Arc::new(Mutex::new(reader)),
            _lock: lock,
        })
    }

    /// Runs `f` on the writer thread inside the next group commit; returns its value once
    /// the commit is durable.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(TypedJob { f: Some(f), outcome: None, reply });
        let jobs = self.jobs.as_ref().ok_or_else(|| self.writer_gone())?;
        jobs.send(job).await.map_err(|_| self.writer_gone())?;
        rx.await.map_err(|_| self.writer_gone())?
    }

    /// Runs `f` on the read connection in the blocking pool.
    async fn read_with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let reader = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || {
            let conn = reader
                .lock()
                .map_err(|_| StoreError::Unavailable("SQLite read connection poisoned by a panic".into()))?;
            f(&conn)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("SQLite read task failed: {e}")))?
    }

    fn writer_gone(&self) -> StoreError {
        StoreError::Unavailable(format!("the SQLite writer for {} has stopped", self.path.display()))
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what is queued and exit; joining it means
        // the lock is released only once nothing writes to the file any more.
        self.jobs.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn append(&self, event: &EventData) -> Result<Appended, StoreError> {
        let agent = event.agent.clone();
        let dedupe_key = event.dedupe_key.clone();
        let record = event.to_record();
        let received_ms = sql_int(event.received_at_ms);
        let size = sql_int(event.size_hint() as u64);
        let dedupe_ttl = ms(self.opts.dedupe_ttl);
        self.write(move |conn| {
            let agent_row = ensure_agent(conn, &agent)?;
            let now = sql_int(now_ms());
            if let Some(key) = &dedupe_key {
                let original: Option<i64> = conn
                    .prepare_cached("SELECT offset FROM dedupe WHERE agent = ?1 AND key = ?2 AND expires_ms > ?3")?
                    .query_row(params![agent, key, now], |r| r.get(0))
                    .optional()?;
                if let Some(offset) = original {
                    return Ok(Appended::Duplicate(offset as u64));
                }
            }
            let offset = sql_int(agent_row.head) + 1;
            conn.prepare_cached(
                "INSERT INTO events (agent, offset, record, received_ms, size) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![agent, offset, record, received_ms, size])?;
            conn.prepare_cached("UPDATE agents SET head = ?2 WHERE agent = ?1")?.execute(params![agent, offset])?;
            if let Some(key) = &dedupe_key {
                conn.prepare_cached(
                    "INSERT OR REPLACE INTO dedupe (agent, key, offset, expires_ms) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![agent, key, offset, now.saturating_add(dedupe_ttl)])?;
            }
            Ok(Appended::Stored(offset as u64))
        })
        .await
    }

    async fn read_records(&self, agent: &str, after: u64, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        let agent = agent.to_owned();
        let after = sql_int(after);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read_with(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT offset, received_ms, record FROM events WHERE agent = ?1 AND offset > ?2 ORDER BY offset LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![agent, after, limit], |r| {
                Ok(EventRecord {
                    offset: r.get::<_, i64>(0)? as u64,
                    received_at_ms: r.get::<_, i64>(1)? as u64,
                    record: r.get::<_, Vec<u8>>(2)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn ack(&self, agent: &str, up_to: u64) -> Result<u64, StoreError> {
        let agent = agent.to_owned();
        let up_to = sql_int(up_to);
        let retain = sql_int(self.opts.retain_acked);
        self.write(move |conn| {
            let row = ensure_agent(conn, &agent)?;
            let (head, cursor) = (sql_int(row.head), sql_int(row.cursor));
            // Never backwards, never past head.
            let mut new_cursor = up_to.min(head).max(cursor);
            if new_cursor != cursor {
                new_cursor = skip_dropped(conn, &agent, new_cursor, head)?;
                conn.prepare_cached("UPDATE agents SET cursor = ?2 WHERE agent = ?1")?
                    .execute(params![agent, new_cursor])?;
            }
            trim(conn, &agent, new_cursor, retain)?;
            Ok(new_cursor as u64)
        })
        .await
    }

    async fn rewind(&self, agent: &str, to: u64) -> Result<u64, StoreError> {
        let agent = agent.to_owned();
        self.write(move |conn| {
            let cursor = ensure_agent(conn, &agent)?.cursor;
            if to > cursor {
                return Err(StoreError::Rejected(format!(
                    "cannot rewind agent {agent:?} forward to {to}: its cursor is {cursor}"
                )));
            }
            if to == cursor {
                return Ok(cursor);
            }
            let range = params![agent, sql_int(to), sql_int(cursor)];
            let retained: i64 = conn
                .prepare_cached("SELECT COUNT(*) FROM events WHERE agent = ?1 AND offset > ?2 AND offset <= ?3")?
                .query_row(range, |r| r.get(0))?;
            let dropped: i64 = conn
                .prepare_cached("SELECT COUNT(*) FROM dropped WHERE agent = ?1 AND offset > ?2 AND offset <= ?3")?
                .query_row(range, |r| r.get(0))?;
            if (retained + dropped) as u64 != cursor - to {
                return Err(not_retained(&agent, to, cursor));
            }
            conn.prepare_cached("UPDATE agents SET cursor = ?2 WHERE agent = ?1")?
                .execute(params![agent, sql_int(to)])?;
            Ok(to)
        })
        .await
    }

    async fn drop_events(&self, agent: &str, offsets: &[u64]) -> Result<u64, StoreError> {
        if offsets.is_empty() {
            return Ok(0);
        }
        let agent = agent.to_owned();
        let offsets: Vec<i64> = offsets.iter().map(|&o| sql_int(o)).collect();
        let retain = sql_int(self.opts.retain_acked);
        self.write(move |conn| {
            let row = ensure_agent(conn, &agent)?;
            let (head, cursor) = (sql_int(row.head), sql_int(row.cursor));
            let mut dropped = 0;
            for &offset in offsets.iter().filter(|&&o| o > cursor && o <= head) {
                let removed = conn
                    .prepare_cached("DELETE FROM events WHERE agent = ?1 AND offset = ?2")?
                    .execute(params![agent, offset])?;
                if removed == 1 {
                    conn.prepare_cached("INSERT INTO dropped (agent, offset) VALUES (?1, ?2)")?
                        .execute(params![agent, offset])?;
                    dropped += 1;
                }
            }
            let new_cursor = skip_dropped(conn, &agent, cursor, head)?;
            if new_cursor != cursor {
                conn.prepare_cached("UPDATE agents SET cursor = ?2 WHERE agent = ?1")?
                    .execute(params![agent, new_cursor])?;
                trim(conn, &agent, new_cursor, retain)?;
            }
            Ok(dropped)
        })
        .await
    }

    async fn position(&self, agent: &str) -> Result<Position, StoreError> {
        let owned = agent.to_owned();
        if let Some(row) = self.read_with(move |conn| load_agent(conn, &owned)).await? {
            return Ok(row);
        }
        // First use: the epoch is created by the writer.
        let owned = agent.to_owned();
        self.write(move |conn| ensure_agent(conn, &owned)).await
    }

    async fn stats(&self, agent: &str) -> Result<Stats, StoreError> {
        let owned = agent.to_owned();
        let stats = self
            .read_with(move |conn| {
                // One read transaction, so position and sums come from the same snapshot.
                conn.execute_batch("BEGIN")?;
                let stats = read_stats(conn, &owned);
                conn.execute_batch("COMMIT")?;
                stats
            })
            .await?;
        match stats {
            Some(stats) => Ok(stats),
            None => Ok(Stats { position: self.position(agent).await?, ..Stats::default() }),
        }
    }

    async fn claim_send(&self, agent: &str, key: &str) -> Result<SendClaim, StoreError> {
        let (agent, key) = (agent.to_owned(), key.to_owned());
        let send_ttl = ms(self.opts.send_ttl);
        self.write(move |conn| {
            let now = sql_int(now_ms());
            let existing: Option<(String, Option<Vec<u8>>)> = conn
                .prepare_cached("SELECT state, result FROM sends WHERE agent = ?1 AND key = ?2 AND expires_ms > ?3")?
                .query_row(params![agent, key, now], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            match existing {
                Some((state, Some(result))) if state == STATE_DONE => Ok(SendClaim::Done(decode_result(&result)?)),
                Some(_) => Ok(SendClaim::InFlight),
                None => {
                    conn.prepare_cached(
                        "INSERT OR REPLACE INTO sends (agent, key, state, result, expires_ms)
                         VALUES (?1, ?2, ?3, NULL, ?4)",
                    )?
                    .execute(params![agent, key, STATE_INFLIGHT, now.saturating_add(send_ttl)])?;
                    Ok(SendClaim::Claimed)
                }
            }
        })
        .await
    }

    async fn finish_send(&self, agent: &str, key: &str, result: &SendResult) -> Result<(), StoreError> {
        let (agent, key) = (agent.to_owned(), key.to_owned());
        let encoded = encode_result(result)?;
        let send_ttl = ms(self.opts.send_ttl);
        self.write(move |conn| {
            let expires = sql_int(now_ms()).saturating_add(send_ttl);
            conn.prepare_cached(
                "INSERT OR REPLACE INTO sends (agent, key, state, result, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![agent, key, STATE_DONE, encoded, expires])?;
            Ok(())
        })
        .await
    }

    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_owned();
        self.read_with(move |conn| {
            Ok(conn
                .prepare_cached("SELECT value FROM state WHERE key = ?1")?
                .query_row(params![key], |r| r.get(0))
                .optional()?)
        })
        .await
    }

    async fn put_state(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let (key, value) = (key.to_owned(), value.to_vec());
        self.write(move |conn| {
            conn.prepare_cached("INSERT OR REPLACE INTO state (key, value) VALUES (?1, ?2)")?
                .execute(params![key, value])?;
            Ok(())
        })
        .await
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        self.write(|conn| {
            conn.prepare_cached("INSERT OR REPLACE INTO health (id, checked_ms) VALUES (1, ?1)")?
                .execute(params![sql_int(now_ms())])?;
            Ok(())
        })
        .await
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Unavailable(format!("SQLite: {e}"))
    }
}

// ---------------------------------------------------------------------------------------
// Opening

/// Locks `<path>.lock` so two Concierge processes never share one database file.
fn acquire_lock(path: &Path) -> Result<File, StoreError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Config(format!("cannot open lock file {}: {e}", lock_path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(StoreError::Config(format!(
            "store {} is in use: another Concierge holds its lock file {}",
            path.display(),
            lock_path.display()
        ))),
        Err(TryLockError::Error(e)) => {
            Err(StoreError::Config(format!("cannot lock {} for store {}: {e}", lock_path.display(), path.display())))
        }
    }
}

/// Opens the write connection: WAL, `synchronous=FULL`, schema in place.
fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    let config_err =
        |e: rusqlite::Error| StoreError::Config(format!("cannot open SQLite store {}: {e}", path.display()));
    let conn = Connection::open(path).map_err(config_err)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).map_err(config_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Config(format!(
            "SQLite store {} cannot use WAL mode (got {mode}); put it on a local filesystem",
            path.display()
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL").map_err(config_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(config_err)?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(config_err)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Config(format!(
            "SQLite store {} has schema version {version}; this build knows up to {SCHEMA_VERSION}",
            path.display()
        )));
    }
    conn.execute_batch(SCHEMA).map_err(config_err)?;
    conn.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(config_err)?;
    Ok(conn)
}

/// Opens the read connection (read-only, so a bug can never write around the writer).
fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| StoreError::Config(format!("cannot open SQLite store {} for reading: {e}", path.display())))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

// ---------------------------------------------------------------------------------------
// The writer thread

/// Group commit loop: one transaction per batch of queued jobs, answers after COMMIT.
fn run_writer(conn: Connection, mut queue: mpsc::Receiver<Box<dyn Job>>) {
    let mut commits: u64 = 0;
    // `blocking_recv` returns None once the store is dropped and the queue is empty.
    while let Some(first) = queue.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        commits += 1;
        let sweep = commits.is_multiple_of(SWEEP_EVERY_COMMITS);
        let committed = run_batch(&conn, &mut batch, sweep);
        if let Err(e) = &committed {
            tracing::error!(error = %e, jobs = batch.len(), "SQLite batch not committed");
        }
        for job in batch {
            job.answer(committed.as_ref().map(|_| ()).map_err(|e| StoreError::Unavailable(format!("SQLite: {e}"))));
        }
    }
}

/// Runs every job of a batch in one transaction, each in its own savepoint, and commits.
/// Any failure outside a job's own work rolls the whole transaction back.
fn run_batch(conn: &Connection, batch: &mut [Box<dyn Job>], sweep: bool) -> Result<(), rusqlite::Error> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        for job in batch.iter_mut() {
            conn.execute_batch("SAVEPOINT job")?;
            let ok = job.run(conn);
            conn.execute_batch(if ok { "RELEASE job" } else { "ROLLBACK TO job; RELEASE job" })?;
        }
        if sweep && let Err(e) = sweep_expired(conn) {
            // Sweeping is housekeeping; it must never fail the batch.
            tracing::warn!(error = %e, "sweeping expired dedupe keys and send results failed");
        }
        conn.execute_batch("COMMIT")
    })();
    if result.is_err() {
        // Nothing of this batch becomes visible; a no-op if SQLite already rolled back.
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

/// Deletes a bounded number of expired dedupe keys and send results.
fn sweep_expired(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.execute_batch("SAVEPOINT sweep")?;
    let now = sql_int(now_ms());
    let result = (|| {
        conn.prepare_cached(
            "DELETE FROM dedupe WHERE rowid IN (SELECT rowid FROM dedupe WHERE expires_ms <= ?1 LIMIT ?2)",
        )?
        .execute(params![now, SWEEP_LIMIT])?;
        conn.prepare_cached(
            "DELETE FROM sends WHERE rowid IN (SELECT rowid FROM sends WHERE expires_ms <= ?1 LIMIT ?2)",
        )?
        .execute(params![now, SWEEP_LIMIT])?;
        Ok(())
    })();
    let end = if result.is_ok() { "RELEASE sweep" } else { "ROLLBACK TO sweep; RELEASE sweep" };
    conn.execute_batch(end)?;
    result
}

// ---------------------------------------------------------------------------------------
// Queries shared by reads and writes

/// Reads an agent's position, if the agent was ever used.
fn load_agent(conn: &Connection, agent: &str) -> Result<Option<Position>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT epoch, cursor, head FROM agents WHERE agent = ?1")?
        .query_row(params![agent], |r| {
            Ok(Position {
                // Epochs are random u64 stored bit for bit in SQLite's i64.
                epoch: r.get::<_, i64>(0)? as u64,
                cursor: r.get::<_, i64>(1)? as u64,
                head: r.get::<_, i64>(2)? as u64,
            })
        })
        .optional()?)
}

/// Reads an agent's position, creating it with a fresh random epoch on first use.
fn ensure_agent(conn: &Connection, agent: &str) -> Result<Position, StoreError> {
    if let Some(position) = load_agent(conn, agent)? {
        return Ok(position);
    }
    let epoch = new_epoch();
    conn.prepare_cached("INSERT INTO agents (agent, epoch, head, cursor) VALUES (?1, ?2, 0, 0)")?
        .execute(params![agent, epoch as i64])?;
    Ok(Position { epoch, cursor: 0, head: 0 })
}

/// The cursor moves over dropped events right after it (nobody will ever ack them): to just
/// before the next surviving event, or to head when none survives.
fn skip_dropped(conn: &Connection, agent: &str, cursor: i64, head: i64) -> Result<i64, StoreError> {
    let next_dropped = conn
        .prepare_cached("SELECT 1 FROM dropped WHERE agent = ?1 AND offset = ?2")?
        .exists(params![agent, cursor + 1])?;
    if !next_dropped {
        return Ok(cursor);
    }
    let next: Option<i64> = conn
        .prepare_cached("SELECT MIN(offset) FROM events WHERE agent = ?1 AND offset > ?2")?
        .query_row(params![agent, cursor], |r| r.get(0))?;
    Ok(next.map_or(head, |n| n - 1))
}

/// Keeps the last `retain` acked events (offsets cursor - retain + 1 ..= cursor) and forgets
/// the dropped offsets below them.
fn trim(conn: &Connection, agent: &str, cursor: i64, retain: i64) -> Result<(), StoreError> {
    let below = cursor.saturating_sub(retain);
    conn.prepare_cached("DELETE FROM events WHERE agent = ?1 AND offset <= ?2")?.execute(params![agent, below])?;
    conn.prepare_cached("DELETE FROM dropped WHERE agent = ?1 AND offset <= ?2")?.execute(params![agent, below])?;
    Ok(())
}

/// Pending count, bytes and oldest pending timestamp, or `None` for an unknown agent.
fn read_stats(conn: &Connection, agent: &str) -> Result<Option<Stats>, StoreError> {
    let Some(position) = load_agent(conn, agent)? else {
        return Ok(None);
    };
    let (pending, pending_bytes, oldest): (i64, i64, Option<i64>) = conn
        .prepare_cached(
            "SELECT COUNT(*), COALESCE(SUM(size), 0),
                    (SELECT received_ms FROM events WHERE agent = ?1 AND offset > ?2 ORDER BY offset LIMIT 1)
             FROM events WHERE agent = ?1 AND offset > ?2",
        )?
        .query_row(params![agent, sql_int(position.cursor)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(Some(Stats {
        // Counted, not head - cursor: events an operator dropped are gone from the table.
        pending: pending as u64,
        pending_bytes: pending_bytes as u64,
        oldest_pending_ms: oldest.map(|t| t as u64),
        position,
    }))
}

// ---------------------------------------------------------------------------------------
// Small conversions

/// The error of a rewind past what retention kept.
fn not_retained(agent: &str, to: u64, cursor: u64) -> StoreError {
    StoreError::Rejected(format!(
        "cannot rewind agent {agent:?} to {to}: events {}..={cursor} are no longer retained (raise store.retain_acked)",
        to + 1
    ))
}

/// SQLite integers are i64; our u64s (offsets, milliseconds) stay far below i64::MAX, and a
/// caller's out-of-range value (e.g. `read(after: u64::MAX)`) saturates instead of failing.
fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A TTL in milliseconds, saturating.
fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use concierge_protocol::ChannelRef;

    fn event(agent: &str) -> EventData {
        EventData {
            agent: agent.into(),
            channel: ChannelRef::new("webhook", "t"),
            conversation: "c".into(),
            sender: None,
            dedupe_key: None,
            received_at_ms: 1,
            text: None,
            attachments: vec![],
            content_type: "text/plain".into(),
            raw: b"x".to_vec(),
            meta: vec![],
        }
    }

    #[tokio::test]
    async fn a_failing_job_leaves_no_trace_and_does_not_fail_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db"), StoreOptions::default()).unwrap();
        let bad = store.write(|conn| {
            conn.execute("INSERT INTO agents (agent, epoch, head, cursor) VALUES ('ghost', 1, 7, 0)", [])?;
            Err::<(), _>(StoreError::Corrupt("boom".into()))
        });
        let a = event("a");
        let good = store.append(&a);
        let (bad, good) = tokio::join!(bad, good);
        assert!(matches!(bad, Err(StoreError::Corrupt(_))), "{bad:?}");
        assert_eq!(good.unwrap(), Appended::Stored(1));
        assert_eq!(store.position("ghost").await.unwrap().head, 0, "the failed job was rolled back");
        assert_eq!(store.read("a", 0, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn expired_rows_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions { dedupe_ttl: std::time::Duration::from_millis(1), ..StoreOptions::default() };
        let store = SqliteStore::open(&dir.path().join("db"), opts).unwrap();
        let mut e = event("a");
        e.dedupe_key = Some("k".into());
        store.append(&e).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        for _ in 0..SWEEP_EVERY_COMMITS {
            store.check_writable().await.unwrap();
        }
        let left: i64 =
            store.read_with(|c| Ok(c.query_row("SELECT COUNT(*) FROM dedupe", [], |r| r.get(0))?)).await.unwrap();
        assert_eq!(left, 0);
    }
}
