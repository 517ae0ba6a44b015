//! One conformance suite, run against both backends (`sqlite::*` and `redis::*`), plus the
//! tests only one backend can run (reopening a file, killing a Redis server).
//!
//! The plain Redis suite uses the shared Redis at `CONCIERGE_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`); every test uses its own random agent-id prefix, so parallel
//! tests never collide. Crash and settings tests start their own `redis-server`.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use concierge_protocol::{EventData, SendResult};
use concierge_store::{Appended, RedisStore, SendClaim, SqliteStore, Store, StoreError, StoreOptions};
use tempfile::TempDir;

mod common;
use common::*;

/// Every suite test must finish within this, so a hang is a failure, not a stuck CI job.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Harness

/// A store under test, plus what a backend-specific assertion needs.
struct Harness {
    store: Arc<dyn Store>,
    /// Unique per test: every agent id starts with it.
    prefix: String,
    /// Set for Redis: lets the suite look at raw keys.
    redis_url: Option<String>,
    /// Keeps the SQLite directory alive; dropped after the store.
    _dir: Option<TempDir>,
}

impl Harness {
    fn agent(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// Removes this test's keys from the shared Redis (no-op for SQLite).
    async fn cleanup(&self) {
        let Some(url) = &self.redis_url else { return };
        let mut conn = raw_redis(url).await;
        let mut cursor: u64 = 0;
        for _ in 0..10_000 {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("c:{{{}*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .unwrap();
            if !keys.is_empty() {
                let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.unwrap();
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }
}

type Make = fn(StoreOptions) -> Pin<Box<dyn Future<Output = Harness> + Send>>;

fn make_sqlite(opts: StoreOptions) -> Pin<Box<dyn Future<Output = Harness> + Send>> {
    Box::pin(async move {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("concierge.db"), opts).unwrap();
        Harness { store: Arc::new(store), prefix: random_prefix(), redis_url: None, _dir: Some(dir) }
    })
}

fn make_redis(opts: StoreOptions) -> Pin<Box<dyn Future<Output = Harness> + Send>> {
    Box::pin(async move {
        let url = shared_redis_url();
        let store = RedisStore::connect(&url, opts).await.unwrap();
        Harness { store: Arc::new(store), prefix: random_prefix(), redis_url: Some(url), _dir: None }
    })
}

async fn offsets(store: &dyn Store, agent: &str) -> Vec<u64> {
    store.read(agent, 0, 10_000).await.unwrap().iter().map(|e| e.offset).collect()
}

/// Runs each named suite test against one backend.
macro_rules! conformance {
    ($backend:ident, $make:path, [$($test:ident),* $(,)?]) => {
        mod $backend {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    tokio::time::timeout(TEST_TIMEOUT, suite::$test($make)).await.expect("test timed out");
                }
            )*
        }
    };
}

macro_rules! suite_tests {
    ($backend:ident, $make:path) => {
        conformance!(
            $backend,
            $make,
            [
                offsets_start_at_one_in_order,
                epoch_is_created_once_and_stable,
                dedupe_returns_original_and_stores_nothing,
                dedupe_and_send_keys_expire,
                read_pages_in_order,
                ack_clamps_and_stats_track_exactly,
                retention_keeps_exactly_retain_acked,
                rewind_redelivers_retained_events_only,
                dropped_events_are_skipped_and_stop_counting,
                drained_log_keeps_counting,
                agents_are_isolated_even_with_odd_ids,
                send_claims_per_agent,
                concurrent_appends_have_no_gaps_or_duplicates,
                concurrent_appends_to_many_agents_keep_each_log_exact,
                check_writable_succeeds,
                state_records_round_trip,
            ]
        );
    };
}

suite_tests!(sqlite, make_sqlite);
suite_tests!(redis_shared, make_redis);

// ---------------------------------------------------------------------------------------
// The shared suite

mod suite {
    use super::*;

    pub async fn offsets_start_at_one_in_order(make: Make) {
        let h = make(StoreOptions::default()).await;
        let a = h.agent("a");
        let sent: Vec<EventData> = (1..=3).map(|i| event(&a, None, &format!("m{i}"))).collect();
        for (i, e) in sent.iter().enumerate() {
            assert_eq!(h.store.append(e).await.unwrap(), Appended::Stored(i as u64 + 1));
        }
        let got = h.store.read(&a, 0, 100).await.unwrap();
        assert_eq!(got.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![1, 2, 3]);
        for (stored, original) in got.iter().zip(&sent) {
            assert_eq!(&stored.data, original, "event must come back byte for byte");
        }
        let pos = h.store.position(&a).await.unwrap();
        assert_eq!((pos.cursor, pos.head), (0, 3));
        h.cleanup().await;
    }

    pub async fn epoch_is_created_once_and_stable(make: Make) {
        let h = make(StoreOptions::default()).await;
        let (a, b) = (h.agent("a"), h.agent("b"));
        let first = h.store.position(&a).await.unwrap();
        assert_ne!(first.epoch, 0, "epoch must be non-zero");
        assert_eq!((first.cursor, first.head), (0, 0));
        h.store.append(&event(&a, None, "x")).await.unwrap();
        h.store.ack(&a, 1).await.unwrap();
        let later = h.store.position(&a).await.unwrap();
        assert_eq!(later.epoch, first.epoch, "epoch must not change while the log is intact");
        assert_eq!(h.store.stats(&a).await.unwrap().position, later);
        let other = h.store.stats(&b).await.unwrap().position;
        assert_ne!(other.epoch, 0);
        assert_ne!(other.epoch, first.epoch, "each agent gets its own random epoch");
        assert_eq!(h.store.position(&b).await.unwrap().epoch, other.epoch);
        h.cleanup().await;
    }

    pub async fn dedupe_returns_original_and_stores_nothing(make: Make) {
        let h = make(StoreOptions::default()).await;
        let (a, b) = (h.agent("a"), h.agent("b"));
        assert_eq!(h.store.append(&event(&a, Some("k1"), "original")).await.unwrap(), Appended::Stored(1));
        assert_eq!(h.store.append(&event(&a, Some("k2"), "second")).await.unwrap(), Appended::Stored(2));
        assert_eq!(h.store.append(&event(&a, Some("k1"), "redelivery")).await.unwrap(), Appended::Duplicate(1));
        assert_eq!(h.store.append(&event(&a, None, "no key")).await.unwrap(), Appended::Stored(3));
        assert_eq!(h.store.append(&event(&a, None, "no key")).await.unwrap(), Appended::Stored(4));
        let got = h.store.read(&a, 0, 100).await.unwrap();
        assert_eq!(got.len(), 4, "a duplicate stores nothing");
        assert_eq!(got[0].data.text.as_deref(), Some("original"));
        let stats = h.store.stats(&a).await.unwrap();
        assert_eq!((stats.pending, stats.position.head), (4, 4));
        // The same key from another agent is a different event.
        assert_eq!(h.store.append(&event(&b, Some("k1"), "b")).await.unwrap(), Appended::Stored(1));
        h.cleanup().await;
    }

    pub async fn dedupe_and_send_keys_expire(make: Make) {
        let ttl = Duration::from_millis(300);
        let h = make(StoreOptions { dedupe_ttl: ttl, send_ttl: ttl, ..StoreOptions::default() }).await;
        let a = h.agent("a");
        assert_eq!(h.store.append(&event(&a, Some("k"), "1")).await.unwrap(), Appended::Stored(1));
        assert_eq!(h.store.append(&event(&a, Some("k"), "1")).await.unwrap(), Appended::Duplicate(1));
        assert_eq!(h.store.claim_send(&a, "s").await.unwrap(), SendClaim::Claimed);
        tokio::time::sleep(ttl * 3).await;
        assert_eq!(h.store.append(&event(&a, Some("k"), "1")).await.unwrap(), Appended::Stored(2));
        assert_eq!(h.store.claim_send(&a, "s").await.unwrap(), SendClaim::Claimed);
        h.cleanup().await;
    }

    pub async fn read_pages_in_order(make: Make) {
        let h = make(StoreOptions::default()).await;
        let a = h.agent("a");
        for i in 1..=10 {
            h.store.append(&event(&a, None, &format!("m{i}"))).await.unwrap();
        }
        let page = |after, limit| {
            let store = Arc::clone(&h.store);
            let a = a.clone();
            async move { store.read(&a, after, limit).await.unwrap().iter().map(|e| e.offset).collect::<Vec<_>>() }
        };
        assert_eq!(page(0, 4).await, vec![1, 2, 3, 4]);
        assert_eq!(page(4, 4).await, vec![5, 6, 7, 8]);
        assert_eq!(page(8, 4).await, vec![9, 10]);
        assert_eq!(page(10, 4).await, Vec::<u64>::new());
        assert_eq!(page(0, 0).await, Vec::<u64>::new());
        assert_eq!(page(u64::MAX, 5).await, Vec::<u64>::new());
        assert_eq!(page(3, usize::MAX).await, (4..=10).collect::<Vec<_>>());
        let texts: Vec<_> = h.store.read(&a, 6, 2).await.unwrap().into_iter().map(|e| e.data.text).collect();
        assert_eq!(texts, vec![Some("m7".to_owned()), Some("m8".to_owned())]);
        assert!(h.store.read(&h.agent("nobody"), 0, 10).await.unwrap().is_empty());
        h.cleanup().await;
    }

    pub async fn ack_clamps_and_stats_track_exactly(make: Make) {
        let h = make(StoreOptions::default()).await;
        let a = h.agent("a");
        let fresh = h.store.stats(&a).await.unwrap();
        assert_eq!((fresh.pending, fresh.pending_bytes, fresh.oldest_pending_ms), (0, 0, None));
        assert_eq!(h.store.ack(&a, 5).await.unwrap(), 0, "nothing to ack yet");

        let events: Vec<EventData> =
            (1..=3u64).map(|i| event_at(&a, None, &"x".repeat(i as usize * 10), 1_000 * i)).collect();
        for e in &events {
            h.store.append(e).await.unwrap();
        }
        let size = |i: usize| events[i].size_hint() as u64;

        let s = h.store.stats(&a).await.unwrap();
        assert_eq!(s.pending, 3);
        assert_eq!(s.pending_bytes, size(0) + size(1) + size(2));
        assert_eq!(s.oldest_pending_ms, Some(1_000));

        assert_eq!(h.store.ack(&a, 2).await.unwrap(), 2);
        let s = h.store.stats(&a).await.unwrap();
        assert_eq!((s.pending, s.pending_bytes, s.oldest_pending_ms), (1, size(2), Some(3_000)));

        assert_eq!(h.store.ack(&a, 1).await.unwrap(), 2, "the cursor never goes backwards");
        assert_eq!(h.store.ack(&a, 2).await.unwrap(), 2, "acking twice changes nothing");
        let s = h.store.stats(&a).await.unwrap();
        assert_eq!((s.pending, s.pending_bytes), (1, size(2)), "a backwards ack must not change stats");

        assert_eq!(h.store.ack(&a, 100).await.unwrap(), 3, "the cursor never passes head");
        let s = h.store.stats(&a).await.unwrap();
        assert_eq!((s.pending, s.pending_bytes, s.oldest_pending_ms), (0, 0, None));
        assert_eq!((s.position.cursor, s.position.head), (3, 3));

        let e4 = event_at(&a, None, "four", 4_000);
        assert_eq!(h.store.append(&e4).await.unwrap(), Appended::Stored(4));
        let s = h.store.stats(&a).await.unwrap();
        assert_eq!((s.pending, s.pending_bytes, s.oldest_pending_ms), (1, e4.size_hint() as u64, Some(4_000)));
        assert_eq!(h.store.ack(&a, u64::MAX).await.unwrap(), 4);
        assert_eq!(h.store.position(&a).await.unwrap().cursor, 4);
        h.cleanup().await;
    }

    pub async fn retention_keeps_exactly_retain_acked(make: Make) {
        let h = make(StoreOptions { retain_acked: 2, ..StoreOptions::default() }).await;
        let a = h.agent("a");
        for i in 1..=5 {
            h.store.append(&event(&a, None, &format!("m{i}"))).await.unwrap();
        }
        h.store.ack(&a, 1).await.unwrap();
        assert_eq!(offsets(&*h.store, &a).await, vec![1, 2, 3, 4, 5], "fewer acked than retained: all kept");
        h.store.ack(&a, 4).await.unwrap();
        assert_eq!(offsets(&*h.store, &a).await, vec![3, 4, 5], "two acked events retained");
        h.store.ack(&a, 5).await.unwrap();
        assert_eq!(offsets(&*h.store, &a).await, vec![4, 5]);
        let s = h.store.stats(&a).await.unwrap();
        assert_eq!((s.pending, s.pending_bytes, s.oldest_pending_ms), (0, 0, None));
        assert_eq!(h.store.append(&event(&a, None, "m6")).await.unwrap(), Appended::Stored(6));
        assert_eq!(offsets(&*h.store, &a).await, vec![4, 5, 6]);
        h.cleanup().await;

        let h = make(StoreOptions { retain_acked: 0, ..StoreOptions::default() }).await;
        let a = h.agent("a");
        for i in 1..=5 {
            h.store.append(&event(&a, None, &format!("m{i}"))).await.unwrap();
        }
        h.store.ack(&a, 4).await.unwrap();
        assert_eq!(offsets(&*h.store, &a).await, vec![5], "retain_acked = 0 keeps only pending events");
        h.cleanup().await;
    }

    pub async fn rewind_redelivers_retained_events_only(make: Make) {
        let h = make(StoreOptions { retain_acked: 2, ..StoreOptions::default() }).await;
        let a = h.agent("a");
        let events: Vec<EventData> = (1..=5).map(|i| event(&a, None, &format!("m{i}"))).collect();
        for e in &events {
            h.store.append(e).await.unwrap();
        }
        assert_eq!(h.store.ack(&a, 4).await.unwrap(), 4);
        assert!(matches!(h.store.rewind(&a, 5).await, Err(StoreError::Rejected(_))), "never forward");
        assert!(matches!(h.store.rewind(&a, 1).await, Err(StoreError::Rejected(_))), "offset 2 was trimmed");
        assert_eq!(h.store.position(&a).await.unwrap().cursor, 4, "a refused rewind changes nothing");
        assert_eq!(h.store.rewind(&a, 4).await.unwrap(), 4, "rewinding to the cursor is a no-op");
        assert_eq!(h.store.rewind(&a, 2).await.unwrap(), 2);
        let s = h.store.stats(&a).await.unwrap();
        let bytes: u64 = events[2..].iter().map(|e| e.size_hint() as u64).sum();
        assert_eq!((s.pending, s.pending_bytes, s.position.cursor), (3, bytes, 2));
        assert_eq!(s.oldest_pending_ms, Some(events[2].received_at_ms));
        let again: Vec<u64> = h.store.read(&a, 2, 10).await.unwrap().iter().map(|e| e.offset).collect();
        assert_eq!(again, vec![3, 4, 5], "rewound events are readable again");
        assert_eq!(h.store.ack(&a, 5).await.unwrap(), 5, "acking after a rewind works as usual");
        assert_eq!(h.store.stats(&a).await.unwrap().pending_bytes, 0);
        h.cleanup().await;
    }

    pub async fn dropped_events_are_skipped_and_stop_counting(make: Make) {
        let h = make(StoreOptions { retain_acked: 10, ..StoreOptions::default() }).await;
        let a = h.agent("a");
        let events: Vec<EventData> =
            (1..=6u64).map(|i| event_at(&a, None, &"x".repeat(i as usize * 10), 1_000 * i)).collect();
        for e in &events {
            h.store.append(e).await.unwrap();
        }
        let size = |offsets: &[usize]| offsets.iter().map(|&o| events[o - 1].size_hint() as u64).sum::<u64>();
        let stats = |s: concierge_store::Stats| (s.pending, s.pending_bytes, s.oldest_pending_ms, s.position.cursor);

        // Unknown and repeated offsets are ignored.
        assert_eq!(h.store.drop_events(&a, &[2, 4, 4, 9]).await.unwrap(), 2);
        assert_eq!(offsets(&*h.store, &a).await, vec![1, 3, 5, 6], "dropped events are never read again");
        assert_eq!(stats(h.store.stats(&a).await.unwrap()), (4, size(&[1, 3, 5, 6]), Some(1_000), 0));

        assert_eq!(h.store.ack(&a, 1).await.unwrap(), 2, "the cursor moves over a dropped event after it");
        assert_eq!(stats(h.store.stats(&a).await.unwrap()), (3, size(&[3, 5, 6]), Some(3_000), 2));

        assert_eq!(h.store.drop_events(&a, &[3]).await.unwrap(), 1);
        assert_eq!(
            stats(h.store.stats(&a).await.unwrap()),
            (2, size(&[5, 6]), Some(5_000), 4),
            "dropping the next pending event moves the cursor over it and the dropped 4"
        );
        assert_eq!(h.store.drop_events(&a, &[1, 2, 3]).await.unwrap(), 0, "acked or dropped already");

        assert_eq!(h.store.rewind(&a, 0).await.unwrap(), 0, "a rewind may cross dropped events");
        assert_eq!(stats(h.store.stats(&a).await.unwrap()), (3, size(&[1, 5, 6]), Some(1_000), 0));
        let again: Vec<u64> = h.store.read(&a, 0, 10).await.unwrap().iter().map(|e| e.offset).collect();
        assert_eq!(again, vec![1, 5, 6]);
        assert_eq!(h.store.ack(&a, 1).await.unwrap(), 4);

        assert_eq!(h.store.drop_events(&a, &[5, 6]).await.unwrap(), 2);
        assert_eq!(stats(h.store.stats(&a).await.unwrap()), (0, 0, None, 6), "all pending dropped: drained");
        assert_eq!(h.store.append(&event(&a, None, "seven")).await.unwrap(), Appended::Stored(7));
        assert_eq!(h.store.read(&a, 6, 10).await.unwrap().len(), 1);
        assert_eq!(h.store.stats(&a).await.unwrap().pending, 1);
        h.cleanup().await;
    }

    pub async fn drained_log_keeps_counting(make: Make) {
        let h = make(StoreOptions { retain_acked: 0, ..StoreOptions::default() }).await;
        let a = h.agent("a");
        for i in 1..=3 {
            h.store.append(&event(&a, Some(&format!("k{i}")), "x")).await.unwrap();
        }
        let epoch = h.store.position(&a).await.unwrap().epoch;
        assert_eq!(h.store.ack(&a, 3).await.unwrap(), 3);
        assert!(offsets(&*h.store, &a).await.is_empty());
        if let Some(url) = &h.redis_url {
            let mut conn = raw_redis(url).await;
            let exists: u64 = redis::cmd("EXISTS").arg(format!("c:{{{a}}}:evt")).query_async(&mut conn).await.unwrap();
            assert_eq!(exists, 0, "a drained stream must be deleted (an empty one costs ~4.7 KB)");
            let meta: u64 = redis::cmd("EXISTS").arg(format!("c:{{{a}}}:meta")).query_async(&mut conn).await.unwrap();
            assert_eq!(meta, 1, "the meta hash must survive, or offsets would restart");
        }
        let pos = h.store.position(&a).await.unwrap();
        assert_eq!((pos.epoch, pos.cursor, pos.head), (epoch, 3, 3), "draining is not losing the log");
        assert_eq!(h.store.append(&event(&a, Some("k3"), "x")).await.unwrap(), Appended::Duplicate(3));
        assert_eq!(h.store.append(&event(&a, Some("k4"), "x")).await.unwrap(), Appended::Stored(4));
        assert_eq!(h.store.append(&event(&a, None, "x")).await.unwrap(), Appended::Stored(5));
        assert_eq!(offsets(&*h.store, &a).await, vec![4, 5]);
        let s = h.store.stats(&a).await.unwrap();
        assert_eq!((s.pending, s.position.epoch), (2, epoch));
        h.cleanup().await;
    }

    pub async fn agents_are_isolated_even_with_odd_ids(make: Make) {
        let h = make(StoreOptions::default()).await;
        // With naive keys, `x`'s dedupe key `y}:evt` would be `c:{P-x}:dd:y}:evt`, which is
        // exactly the stream key of agent `x}:dd:y`.
        let agents = [h.agent("x"), h.agent("x}:dd:y"), h.agent("{x}"), h.agent("x:evt"), h.agent("x%7D")];
        for (i, agent) in agents.iter().enumerate() {
            for n in 1..=(i + 1) {
                let key = format!("y}}:evt{n}");
                let key = if n == 1 { "y}:evt" } else { key.as_str() };
                let got = h.store.append(&event(agent, Some(key), &format!("{agent}#{n}"))).await.unwrap();
                assert_eq!(got, Appended::Stored(n as u64), "agent {agent:?} event {n}");
            }
        }
        for (i, agent) in agents.iter().enumerate() {
            let got = h.store.read(agent, 0, 100).await.unwrap();
            assert_eq!(got.len(), i + 1, "agent {agent:?} sees exactly its own events");
            for (n, e) in got.iter().enumerate() {
                assert_eq!(&e.data.agent, agent);
                assert_eq!(e.data.text.as_deref(), Some(format!("{agent}#{}", n + 1).as_str()));
            }
            assert_eq!(h.store.stats(agent).await.unwrap().pending, i as u64 + 1);
        }
        h.store.ack(&agents[0], 1).await.unwrap();
        assert_eq!(h.store.position(&agents[1]).await.unwrap().cursor, 0, "acks are per agent");
        assert_eq!(h.store.position(&agents[0]).await.unwrap().cursor, 1);
        h.cleanup().await;
    }

    pub async fn send_claims_per_agent(make: Make) {
        let h = make(StoreOptions::default()).await;
        let (a, b) = (h.agent("a"), h.agent("b"));
        let key = "idem:{1}:x";
        assert_eq!(h.store.claim_send(&a, key).await.unwrap(), SendClaim::Claimed);
        assert_eq!(h.store.claim_send(&a, key).await.unwrap(), SendClaim::InFlight);
        assert_eq!(h.store.claim_send(&b, key).await.unwrap(), SendClaim::Claimed, "keys are per agent");

        let ok = SendResult::Ok { platform_ids: vec!["m-1".to_owned(), "m-2".to_owned()] };
        h.store.finish_send(&a, key, &ok).await.unwrap();
        assert_eq!(h.store.claim_send(&a, key).await.unwrap(), SendClaim::Done(ok.clone()));
        assert_eq!(h.store.claim_send(&a, key).await.unwrap(), SendClaim::Done(ok), "a retry stays Done");
        assert_eq!(h.store.claim_send(&b, key).await.unwrap(), SendClaim::InFlight);

        let failed = SendResult::err("rate_limited", "slow down", true);
        h.store.finish_send(&b, key, &failed).await.unwrap();
        assert_eq!(h.store.claim_send(&b, key).await.unwrap(), SendClaim::Done(failed));
        assert_eq!(h.store.claim_send(&a, "other").await.unwrap(), SendClaim::Claimed);
        h.cleanup().await;
    }

    pub async fn concurrent_appends_have_no_gaps_or_duplicates(make: Make) {
        let h = make(StoreOptions::default()).await;
        let a = h.agent("a");
        let mut tasks = Vec::new();
        for i in 0..200 {
            let store = Arc::clone(&h.store);
            // Half carry a dedupe key, half do not; all are distinct events.
            let e = event(&a, (i % 2 == 0).then(|| format!("k{i}")).as_deref(), &format!("t{i}"));
            tasks.push(tokio::spawn(async move { (i, store.append(&e).await.unwrap()) }));
        }
        let mut by_offset = std::collections::BTreeMap::new();
        for task in tasks {
            let (i, appended) = task.await.unwrap();
            let Appended::Stored(offset) = appended else { panic!("task {i}: {appended:?}") };
            assert!(by_offset.insert(offset, i).is_none(), "offset {offset} handed out twice");
        }
        assert_eq!(by_offset.keys().copied().collect::<Vec<_>>(), (1..=200).collect::<Vec<_>>());
        let stored = h.store.read(&a, 0, 1000).await.unwrap();
        assert_eq!(stored.len(), 200);
        for e in &stored {
            assert_eq!(e.data.text, Some(format!("t{}", by_offset[&e.offset])), "offset {}", e.offset);
        }

        // Concurrent redeliveries of one event: exactly one is stored.
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let store = Arc::clone(&h.store);
            let e = event(&a, Some("same"), "redelivered");
            tasks.push(tokio::spawn(async move { store.append(&e).await.unwrap() }));
        }
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }
        assert_eq!(results.iter().filter(|r| matches!(r, Appended::Stored(_))).count(), 1);
        assert!(results.iter().all(|r| r.offset() == 201), "{results:?}");
        assert_eq!(h.store.position(&a).await.unwrap().head, 201);
        h.cleanup().await;
    }

    /// Appends to several agents at once (one group-commit round may carry all of them):
    /// each agent's offsets are contiguous, its pending bytes are exactly what it was sent,
    /// and a redelivery answers the offset of the first copy.
    pub async fn concurrent_appends_to_many_agents_keep_each_log_exact(make: Make) {
        let h = make(StoreOptions::default()).await;
        let agents: Vec<String> = (0..3).map(|i| h.agent(&format!("m{i}"))).collect();
        let mut tasks = Vec::new();
        for i in 0..150usize {
            let store = Arc::clone(&h.store);
            let agent = agents[i % 3].clone();
            // Every fifth event is sent twice with one dedupe key.
            let copies = if i % 5 == 0 { 2 } else { 1 };
            for _ in 0..copies {
                let e = event(&agent, Some(&format!("d{i}")), &"x".repeat(i));
                let store = Arc::clone(&store);
                tasks.push(tokio::spawn(async move { (i, e.size_hint() as u64, store.append(&e).await.unwrap()) }));
            }
        }
        let mut offsets: Vec<std::collections::BTreeMap<u64, usize>> = vec![Default::default(); 3];
        let mut bytes = [0u64; 3];
        let mut answers: std::collections::HashMap<usize, Vec<Appended>> = Default::default();
        for task in tasks {
            let (i, size, appended) = task.await.unwrap();
            answers.entry(i).or_default().push(appended);
            if let Appended::Stored(offset) = appended {
                assert!(offsets[i % 3].insert(offset, i).is_none(), "offset {offset} of agent {} twice", i % 3);
                bytes[i % 3] += size;
            }
        }
        for (i, got) in &answers {
            assert_eq!(got.iter().filter(|a| matches!(a, Appended::Stored(_))).count(), 1, "event {i}: {got:?}");
            assert!(got.iter().all(|a| a.offset() == got[0].offset()), "event {i}: copies disagree: {got:?}");
        }
        for (n, agent) in agents.iter().enumerate() {
            assert_eq!(offsets[n].keys().copied().collect::<Vec<_>>(), (1..=50).collect::<Vec<_>>(), "agent {n}");
            let stats = h.store.stats(agent).await.unwrap();
            assert_eq!((stats.pending, stats.pending_bytes), (50, bytes[n]), "agent {n}");
            for e in h.store.read(agent, 0, 100).await.unwrap() {
                assert_eq!(e.data.text.map(|t| t.len()), Some(offsets[n][&e.offset]), "agent {n} offset {}", e.offset);
            }
        }
        h.cleanup().await;
    }

    pub async fn state_records_round_trip(make: Make) {
        let h = make(StoreOptions::default()).await;
        let key = format!("{}discord:{{odd}}:bot", random_prefix());
        assert_eq!(h.store.get_state(&key).await.unwrap(), None);
        h.store.put_state(&key, b"first").await.unwrap();
        h.store.put_state(&key, b"second\0bytes").await.unwrap();
        assert_eq!(h.store.get_state(&key).await.unwrap().as_deref(), Some(&b"second\0bytes"[..]));
        let other = format!("{key}-other");
        assert_eq!(h.store.get_state(&other).await.unwrap(), None);
        h.cleanup().await;
    }

    pub async fn check_writable_succeeds(make: Make) {
        let h = make(StoreOptions::default()).await;
        h.store.check_writable().await.unwrap();
        h.store.check_writable().await.unwrap();
        h.cleanup().await;
    }
}

// ---------------------------------------------------------------------------------------
// SQLite only

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_reopen_sees_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("concierge.db");
    let opts = StoreOptions { retain_acked: 1, ..StoreOptions::default() };
    let store = SqliteStore::open(&path, opts.clone()).unwrap();
    let sent: Vec<EventData> = (1..=5).map(|i| event("a", Some(&format!("k{i}")), &format!("m{i}"))).collect();
    for e in &sent {
        store.append(e).await.unwrap();
    }
    store.ack("a", 3).await.unwrap();
    let ok = SendResult::Ok { platform_ids: vec!["p1".to_owned()] };
    store.claim_send("a", "s1").await.unwrap();
    store.finish_send("a", "s1", &ok).await.unwrap();
    store.claim_send("a", "s2").await.unwrap();
    let before = store.stats("a").await.unwrap();
    drop(store);

    let store = SqliteStore::open(&path, opts).unwrap();
    assert_eq!(store.stats("a").await.unwrap(), before, "position and stats survive a restart");
    let got = store.read("a", 0, 100).await.unwrap();
    assert_eq!(got.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![3, 4, 5]);
    assert_eq!(got.iter().map(|e| &e.data).collect::<Vec<_>>(), sent[2..].iter().collect::<Vec<_>>());
    assert_eq!(store.append(&sent[4]).await.unwrap(), Appended::Duplicate(5), "dedupe keys survive");
    assert_eq!(store.append(&event("a", None, "m6")).await.unwrap(), Appended::Stored(6));
    assert_eq!(store.claim_send("a", "s1").await.unwrap(), SendClaim::Done(ok));
    assert_eq!(store.claim_send("a", "s2").await.unwrap(), SendClaim::InFlight);
}

#[tokio::test]
async fn sqlite_refuses_a_second_open_while_the_first_is_alive() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("concierge.db");
    let first = SqliteStore::open(&path, StoreOptions::default()).unwrap();
    first.append(&event("a", None, "x")).await.unwrap();

    let Err(StoreError::Config(message)) = SqliteStore::open(&path, StoreOptions::default()) else {
        panic!("a second open must fail with a configuration error");
    };
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("another Concierge"), "{message}");
    assert!(!lock_free_for_another_process(&path), "another process must see the lock too");

    drop(first);
    assert!(lock_free_for_another_process(&path), "dropping the store releases the lock");
    let second = SqliteStore::open(&path, StoreOptions::default()).unwrap();
    assert_eq!(second.position("a").await.unwrap().head, 1);
}

/// Asks flock(1), a separate process, whether it could take the store's lock right now.
fn lock_free_for_another_process(db: &Path) -> bool {
    let status = Command::new("flock")
        .args(["--nonblock", "--conflict-exit-code", "42"])
        .arg(lock_path(db))
        .arg("true")
        .status()
        .unwrap();
    match status.code() {
        Some(0) => true,
        Some(42) => false,
        other => panic!("flock failed: {other:?}"),
    }
}

fn lock_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Env var that turns [`sqlite_crash_child`] into a writer to be killed.
const CRASH_CHILD_ENV: &str = "CONCIERGE_STORE_CRASH_CHILD_DB";

/// Kills a process in the middle of group commits and checks that every append it reported
/// as stored is there, and that no partial batch is visible: offsets are exactly 1..=head,
/// every record decodes, and dedupe keys point at their events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_survives_sigkill_mid_batch() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("concierge.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "sqlite_crash_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CRASH_CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // Read acknowledgements on a thread; kill once enough were acked.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut acked = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked.len() < 500 && std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100))
            && let Some(rest) = line.strip_prefix("stored ")
        {
            acked.push(rest.to_owned());
        }
    }
    assert!(acked.len() >= 500, "the child never got going ({} acks)", acked.len());
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap();
    // Lines that made it through the pipe before the kill were acked too.
    acked.extend(rx.try_iter().filter_map(|l| l.strip_prefix("stored ").map(str::to_owned)));

    let store = SqliteStore::open(&path, StoreOptions::default()).unwrap();
    let head = store.position("crash").await.unwrap().head;
    let events = store.read("crash", 0, 1_000_000).await.unwrap();
    assert_eq!(events.iter().map(|e| e.offset).collect::<Vec<_>>(), (1..=head).collect::<Vec<_>>());
    let texts: std::collections::HashMap<u64, String> =
        events.iter().map(|e| (e.offset, e.data.text.clone().unwrap())).collect();
    for line in &acked {
        let (offset, text) = line.split_once(' ').unwrap();
        let offset: u64 = offset.parse().unwrap();
        assert_eq!(texts.get(&offset), Some(&text.to_owned()), "acked offset {offset} lost or altered");
    }
    for e in events.iter().take(200) {
        let key = e.data.dedupe_key.as_deref().unwrap();
        let again = event("crash", Some(key), "again");
        assert_eq!(store.append(&again).await.unwrap(), Appended::Duplicate(e.offset));
    }
}

/// Not a test on its own: the writer process that `sqlite_survives_sigkill_mid_batch` kills.
#[test]
#[ignore = "helper process for sqlite_survives_sigkill_mid_batch"]
fn sqlite_crash_child() {
    let Ok(path) = std::env::var(CRASH_CHILD_ENV) else { return };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        let store = Arc::new(SqliteStore::open(Path::new(&path), StoreOptions::default()).unwrap());
        let mut tasks = Vec::new();
        for t in 0..16 {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                for n in 0..100_000 {
                    let text = format!("t{t}-n{n}");
                    let Ok(appended) = store.append(&event("crash", Some(&text), &text)).await else { return };
                    println!("stored {} {text}", appended.offset());
                }
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
    });
}

// ---------------------------------------------------------------------------------------
// Redis only

/// A `redis-server` of our own, killed when dropped.
struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    args: Vec<String>,
}

impl RedisServer {
    fn start(args: &[&str]) -> Self {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut server = RedisServer {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        server.spawn();
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on the same port and directory, waiting until it answers.
    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed for the Redis tests");
        self.child = Some(child);
        for _ in 0..200 {
            let ping = Command::new("redis-cli")
                .args(["-p", &self.port.to_string(), "PING"])
                .stderr(Stdio::null())
                .output()
                .unwrap();
            if String::from_utf8_lossy(&ping.stdout).trim() == "PONG" {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server on port {} did not come up", self.port);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL: no shutdown save, no AOF rewrite
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_survives_sigkill_with_aof_always() {
    let mut server = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let opts = StoreOptions { retain_acked: 2, ..StoreOptions::default() };
    let store = RedisStore::connect(&server.url(), opts).await.unwrap();
    assert!(store.warnings().await.is_empty(), "{:?}", store.warnings().await);
    let sent: Vec<EventData> = (1..=20).map(|i| event("a", Some(&format!("k{i}")), &format!("m{i}"))).collect();
    for e in &sent {
        store.append(e).await.unwrap();
    }
    assert_eq!(store.ack("a", 5).await.unwrap(), 5);
    let ok = SendResult::Ok { platform_ids: vec!["p".to_owned()] };
    store.claim_send("a", "s").await.unwrap();
    store.finish_send("a", "s", &ok).await.unwrap();
    let before = store.stats("a").await.unwrap();

    server.kill();
    // While Redis is down every call fails promptly instead of hanging.
    let down = tokio::time::timeout(Duration::from_secs(20), store.append(&event("a", Some("down"), "down")))
        .await
        .expect("append must fail, not hang, while Redis is down");
    assert!(matches!(down, Err(StoreError::Unavailable(_))), "{down:?}");
    let down = tokio::time::timeout(Duration::from_secs(20), store.check_writable()).await.unwrap();
    assert!(matches!(down, Err(StoreError::Unavailable(_))), "{down:?}");

    server.spawn();
    // The same store reconnects by itself.
    let probe = event("a", Some("after-restart"), "m21");
    let mut appended = None;
    for _ in 0..100 {
        if let Ok(Ok(a)) = tokio::time::timeout(Duration::from_secs(10), store.append(&probe)).await {
            appended = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let appended = appended.expect("the store never reconnected after Redis restarted");
    assert_eq!(appended.offset(), 21, "offsets continue after a restart");

    let after = store.stats("a").await.unwrap();
    assert_eq!(after.position.epoch, before.position.epoch, "nothing was lost, so the epoch stays");
    assert_eq!(after.position.cursor, 5);
    assert_eq!(after.pending_bytes, before.pending_bytes + probe.size_hint() as u64);
    let got = store.read("a", 0, 100).await.unwrap();
    assert_eq!(got.iter().map(|e| e.offset).collect::<Vec<_>>(), (4..=21).collect::<Vec<_>>());
    assert_eq!(got.iter().take(17).map(|e| &e.data).collect::<Vec<_>>(), sent[3..].iter().collect::<Vec<_>>());
    assert_eq!(store.append(&sent[0]).await.unwrap(), Appended::Duplicate(1), "dedupe keys survive");
    assert_eq!(store.claim_send("a", "s").await.unwrap(), SendClaim::Done(ok), "send results survive");
}

#[tokio::test]
async fn redis_warns_about_settings_that_lose_acked_events() {
    let server = RedisServer::start(&["--appendonly", "no", "--maxmemory-policy", "allkeys-lru"]);
    let store = RedisStore::connect(&server.url(), StoreOptions::default()).await.unwrap();
    let warnings = store.warnings().await;
    let appendonly = warnings.iter().find(|w| w.contains("appendonly")).expect("appendonly warning");
    assert!(appendonly.contains("\"no\"") && appendonly.contains("write-before-ack"), "{appendonly}");
    let eviction = warnings.iter().find(|w| w.contains("maxmemory-policy")).expect("eviction warning");
    assert!(eviction.contains("allkeys-lru") && eviction.contains("noeviction"), "{eviction}");
    let fsync = warnings.iter().find(|w| w.contains("appendfsync")).expect("appendfsync warning");
    assert!(fsync.contains("everysec") && fsync.contains("1 s"), "{fsync}");
}

#[tokio::test]
async fn redis_warns_when_config_is_disabled() {
    let server = RedisServer::start(&["--rename-command", "CONFIG", ""]);
    let store = RedisStore::connect(&server.url(), StoreOptions::default()).await.unwrap();
    let warnings = store.warnings().await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("CONFIG") && warnings[0].contains("appendonly"), "{warnings:?}");
}

#[tokio::test]
async fn redis_connect_fails_fast_when_nothing_listens() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("redis://127.0.0.1:{port}");
    let result = tokio::time::timeout(Duration::from_secs(20), RedisStore::connect(&url, StoreOptions::default()))
        .await
        .expect("connect must not hang");
    let Err(StoreError::Unavailable(message)) = result else { panic!("connect must fail") };
    assert!(message.contains(&url), "{message}");
    assert!(matches!(RedisStore::connect("not a url", StoreOptions::default()).await, Err(StoreError::Config(_))));
}

#[tokio::test]
async fn redis_new_epoch_when_the_log_is_lost() {
    let url = shared_redis_url();
    let store = RedisStore::connect(&url, StoreOptions::default()).await.unwrap();
    let agent = random_prefix();
    for i in 1..=2 {
        store.append(&event(&agent, None, &format!("m{i}"))).await.unwrap();
    }
    let before = store.position(&agent).await.unwrap();
    let mut conn = raw_redis(&url).await;
    let _: () = redis::cmd("DEL")
        .arg(format!("c:{{{agent}}}:meta"))
        .arg(format!("c:{{{agent}}}:evt"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let after = store.position(&agent).await.unwrap();
    assert_ne!(after.epoch, before.epoch, "a lost log must show as a new epoch");
    assert_ne!(after.epoch, 0);
    assert_eq!((after.cursor, after.head), (0, 0));
    assert_eq!(store.append(&event(&agent, None, "m")).await.unwrap(), Appended::Stored(1));
    let _: () = redis::cmd("DEL")
        .arg(format!("c:{{{agent}}}:meta"))
        .arg(format!("c:{{{agent}}}:evt"))
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn redis_lost_meta_with_surviving_stream_redelivers_instead_of_overwriting() {
    let url = shared_redis_url();
    let store = RedisStore::connect(&url, StoreOptions { retain_acked: 1, ..StoreOptions::default() }).await.unwrap();
    let agent = random_prefix();
    let sent: Vec<EventData> = (1..=3).map(|i| event(&agent, None, &format!("m{i}"))).collect();
    for e in &sent {
        store.append(e).await.unwrap();
    }
    store.ack(&agent, 2).await.unwrap(); // keeps offset 2 (retained) and 3 (pending)
    let before = store.position(&agent).await.unwrap();
    let mut conn = raw_redis(&url).await;
    let _: () = redis::cmd("DEL").arg(format!("c:{{{agent}}}:meta")).query_async(&mut conn).await.unwrap();

    let stats = store.stats(&agent).await.unwrap();
    assert_ne!(stats.position.epoch, before.epoch);
    assert_eq!((stats.position.cursor, stats.position.head), (1, 3), "surviving entries become pending");
    assert_eq!(stats.pending_bytes, (sent[1].size_hint() + sent[2].size_hint()) as u64);
    assert_eq!(store.append(&event(&agent, None, "m4")).await.unwrap(), Appended::Stored(4));
    let _: () = redis::cmd("DEL")
        .arg(format!("c:{{{agent}}}:meta"))
        .arg(format!("c:{{{agent}}}:evt"))
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// Dropped events leave gaps in the stream; when the meta hash is lost those gaps are
/// recognised again, so the rebuilt pending count and bytes are exact.
#[tokio::test]
async fn redis_lost_meta_with_dropped_events_counts_exactly() {
    let url = shared_redis_url();
    let store = RedisStore::connect(&url, StoreOptions::default()).await.unwrap();
    let agent = random_prefix();
    let sent: Vec<EventData> = (1..=4).map(|i| event(&agent, None, &"y".repeat(i * 7))).collect();
    for e in &sent {
        store.append(e).await.unwrap();
    }
    assert_eq!(store.drop_events(&agent, &[2]).await.unwrap(), 1);
    let mut conn = raw_redis(&url).await;
    let _: () = redis::cmd("DEL")
        .arg(format!("c:{{{agent}}}:meta"))
        .arg(format!("c:{{{agent}}}:drop"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let stats = store.stats(&agent).await.unwrap();
    assert_eq!((stats.position.cursor, stats.position.head, stats.pending), (0, 4, 3));
    assert_eq!(stats.pending_bytes, (sent[0].size_hint() + sent[2].size_hint() + sent[3].size_hint()) as u64);
    assert_eq!(store.ack(&agent, 1).await.unwrap(), 2, "the rebuilt gap is a dropped event");
    assert_eq!(store.stats(&agent).await.unwrap().pending_bytes, (sent[2].size_hint() + sent[3].size_hint()) as u64);
    delete_log_keys(&mut conn, &agent).await;
}

/// The stream layouts written by earlier versions (see `store/src/redis.rs`).
#[derive(Clone, Copy, Debug)]
enum OldLayout {
    /// `record`, `received_ms`, `size`, `cb` as four fields.
    FourFields,
    /// One field `e` = `<received_ms> <size> <cb>\n<record>`.
    HeaderLine,
}

/// Streams written in an earlier layout keep working: read, stats, ack, drop and meta rebuild
/// read them, and new appends continue the same log.
#[tokio::test]
async fn redis_reads_logs_written_in_earlier_layouts() {
    for layout in [OldLayout::FourFields, OldLayout::HeaderLine] {
        reads_log_written_in(layout).await;
    }
}

async fn reads_log_written_in(layout: OldLayout) {
    let url = shared_redis_url();
    let store = RedisStore::connect(&url, StoreOptions::default()).await.unwrap();
    let agent = random_prefix();
    let old: Vec<EventData> = (1..=3).map(|i| event_at(&agent, None, &"o".repeat(i * 5), 1_000 + i as u64)).collect();
    let mut conn = raw_redis(&url).await;
    let mut appended = 0;
    for (i, e) in old.iter().enumerate() {
        let size = e.size_hint();
        let mut xadd = redis::cmd("XADD");
        xadd.arg(format!("c:{{{agent}}}:evt")).arg(format!("0-{}", i + 1));
        match layout {
            OldLayout::FourFields => {
                xadd.arg("record").arg(e.to_record());
                xadd.arg("received_ms").arg(e.received_at_ms).arg("size").arg(size).arg("cb").arg(appended);
            }
            OldLayout::HeaderLine => {
                let mut value = format!("{} {size} {appended}\n", e.received_at_ms).into_bytes();
                value.extend(e.to_record());
                xadd.arg("e").arg(value);
            }
        }
        let _: String = xadd.query_async(&mut conn).await.unwrap();
        appended += size;
    }
    // No meta hash: the first call rebuilds it from the old entries.
    let stats = store.stats(&agent).await.unwrap();
    assert_eq!((stats.position.cursor, stats.position.head, stats.pending), (0, 3, 3), "{layout:?}");
    assert_eq!(stats.pending_bytes, appended as u64, "{layout:?}");
    assert_eq!(stats.oldest_pending_ms, Some(1_001), "{layout:?}");
    let new = event_at(&agent, None, "new", 2_000);
    assert_eq!(store.append(&new).await.unwrap(), Appended::Stored(4), "{layout:?}");
    let read = store.read(&agent, 0, 10).await.unwrap();
    let datas: Vec<&EventData> = read.iter().map(|e| &e.data).collect();
    assert_eq!(datas, old.iter().chain([&new]).collect::<Vec<_>>(), "{layout:?}");
    let records = store.read_records(&agent, 0, 10).await.unwrap();
    assert_eq!(records.iter().map(|r| r.received_at_ms).collect::<Vec<_>>(), [1_001, 1_002, 1_003, 2_000]);
    assert_eq!(store.drop_events(&agent, &[2]).await.unwrap(), 1, "{layout:?}");
    assert_eq!(store.ack(&agent, 1).await.unwrap(), 2, "the cursor moves over the dropped old entry");
    let stats = store.stats(&agent).await.unwrap();
    assert_eq!(stats.pending_bytes, (old[2].size_hint() + new.size_hint()) as u64, "{layout:?}");
    assert_eq!(stats.oldest_pending_ms, Some(1_003), "{layout:?}");
    delete_log_keys(&mut conn, &agent).await;
}

/// The append claims an event's dedupe key before it writes the event. When the write fails
/// the claim must be released: otherwise the platform's retry of that event would be answered
/// "duplicate" and the event never stored. Here the write fails because the stream already
/// holds an entry past the head (Redis refuses an XADD id below its last one).
#[tokio::test]
async fn redis_failed_append_leaves_no_dedupe_claim_behind() {
    let url = shared_redis_url();
    let store = RedisStore::connect(&url, StoreOptions::default()).await.unwrap();
    let agent = random_prefix();
    assert_eq!(store.append(&event(&agent, Some("k1"), "m1")).await.unwrap(), Appended::Stored(1));
    let mut conn = raw_redis(&url).await;
    let stream = format!("c:{{{agent}}}:evt");
    let _: String =
        redis::cmd("XADD").arg(&stream).arg("0-100").arg("x").arg("y").query_async(&mut conn).await.unwrap();

    let err = store.append(&event(&agent, Some("k2"), "m2")).await.unwrap_err();
    assert!(err.to_string().contains("XADD of offset 2 failed"), "{err}");
    let claim: Option<String> =
        redis::cmd("GET").arg(format!("c:{{{agent}}}:dd:k2")).query_async(&mut conn).await.unwrap();
    assert_eq!(claim, None, "the failed append released its dedupe claim");
    assert_eq!(store.position(&agent).await.unwrap().head, 1, "the head did not move");

    // Once the stray entry is gone (with the stream: a stream remembers its last id even after
    // XDEL), the retry is stored, not answered as a duplicate.
    let _: u64 = redis::cmd("DEL").arg(&stream).query_async(&mut conn).await.unwrap();
    assert_eq!(store.append(&event(&agent, Some("k2"), "m2")).await.unwrap(), Appended::Stored(2));
    delete_dedupe_keys(&mut conn, &agent, &["k1", "k2"]).await;
    delete_log_keys(&mut conn, &agent).await;
}

/// Redis forgets scripts on restart or `SCRIPT FLUSH`; every script call must reload and
/// succeed rather than fail with NOSCRIPT (the store sends EVALSHA itself).
#[tokio::test]
async fn redis_reloads_scripts_after_script_flush() {
    let url = shared_redis_url();
    let store = RedisStore::connect(&url, StoreOptions::default()).await.unwrap();
    let agent = random_prefix();
    assert_eq!(store.append(&event(&agent, Some("k1"), "m1")).await.unwrap(), Appended::Stored(1));
    let mut conn = raw_redis(&url).await;
    let flush = || redis::cmd("SCRIPT").arg("FLUSH").clone();
    let _: () = flush().query_async(&mut conn).await.unwrap();
    assert_eq!(store.append(&event(&agent, Some("k2"), "m2")).await.unwrap(), Appended::Stored(2));
    let _: () = flush().query_async(&mut conn).await.unwrap();
    assert_eq!(store.append(&event(&agent, Some("k2"), "again")).await.unwrap(), Appended::Duplicate(2));
    let _: () = flush().query_async(&mut conn).await.unwrap();
    assert_eq!(store.stats(&agent).await.unwrap().pending, 2);
    let _: () = flush().query_async(&mut conn).await.unwrap();
    assert_eq!(store.ack(&agent, 2).await.unwrap(), 2);
    let _: () = flush().query_async(&mut conn).await.unwrap();
    assert_eq!(store.position(&agent).await.unwrap().cursor, 2);
    delete_dedupe_keys(&mut conn, &agent, &["k1", "k2"]).await;
    delete_log_keys(&mut conn, &agent).await;
}
