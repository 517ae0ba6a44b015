//! Store append micro-benchmarks: concurrent appends of 1 KiB events (each with a unique
//! dedupe key, as webhooks carry) to the embedded SQLite store in a temp dir (group commit,
//! WAL, `synchronous=FULL`) and to Redis at 127.0.0.1:6379 (atomic script, pipelined) under a
//! unique agent id whose keys are deleted afterwards. Without a reachable Redis the Redis
//! bench is skipped with a message.
//! Run with `cargo bench -p concierge-store --bench append`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use concierge_protocol::{ChannelRef, EventData};
use concierge_store::{RedisStore, SqliteStore, Store, StoreOptions};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// Concurrent appenders (webhook requests in flight).
const CONCURRENCY: u64 = 64;
const REDIS_URL: &str = "redis://127.0.0.1:6379";

fn event(agent: &str, n: u64) -> EventData {
    EventData {
        agent: agent.to_string(),
        channel: ChannelRef::new("webhook", "bench"),
        conversation: "bench".into(),
        sender: None,
        dedupe_key: Some(format!("bench-{n}")),
        received_at_ms: concierge_protocol::now_ms(),
        text: None,
        attachments: Vec::new(),
        content_type: "application/json".into(),
        raw: vec![b'x'; 1024],
        meta: Vec::new(),
    }
}

/// Times `iters` appends spread over [`CONCURRENCY`] tasks.
fn run_appends(
    rt: &tokio::runtime::Runtime,
    store: Arc<dyn Store>,
    agent: &str,
    seq: &Arc<AtomicU64>,
    iters: u64,
) -> Duration {
    rt.block_on(async {
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..CONCURRENCY {
            let n = iters / CONCURRENCY + u64::from(w < iters % CONCURRENCY);
            let (store, agent, seq) = (store.clone(), agent.to_string(), seq.clone());
            tasks.spawn(async move {
                for _ in 0..n {
                    let e = event(&agent, seq.fetch_add(1, Ordering::Relaxed));
                    store.append(&e).await.expect("append");
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("append task");
        }
        started.elapsed()
    })
}

fn bench_sqlite(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = {
        let _guard = rt.enter();
        Arc::new(SqliteStore::open(&dir.path().join("bench.db"), StoreOptions::default()).expect("open sqlite"))
    };
    let seq = Arc::new(AtomicU64::new(0));
    let mut g = c.benchmark_group("append_1KiB_x64_concurrent");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sqlite", |b| b.iter_custom(|iters| run_appends(&rt, store.clone(), "bench-sqlite", &seq, iters)));
    g.finish();
    drop(store);
}

fn bench_redis(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let store = match rt.block_on(RedisStore::connect(REDIS_URL, StoreOptions::default())) {
        Ok(s) => Arc::new(s) as Arc<dyn Store>,
        Err(e) => {
            eprintln!("SKIPPED append/redis: no Redis at {REDIS_URL} ({e}); start one (apt-get install redis-server)");
            return;
        }
    };
    let agent = format!("bench-{}-{}", std::process::id(), concierge_protocol::now_ms());
    let seq = Arc::new(AtomicU64::new(0));
    let mut g = c.benchmark_group("append_1KiB_x64_concurrent");
    g.throughput(Throughput::Elements(1));
    g.bench_function("redis", |b| b.iter_custom(|iters| run_appends(&rt, store.clone(), &agent, &seq, iters)));
    g.finish();
    drop(store);
    if let Err(e) = rt.block_on(delete_keys(&agent)) {
        eprintln!("warning: could not delete the Redis keys of {agent}: {e}");
    }
}

/// Deletes every key of `agent` (hash-tagged `c:{agent}:...`).
async fn delete_keys(agent: &str) -> redis::RedisResult<()> {
    let client = redis::Client::open(REDIS_URL)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let pattern = format!("c:{{{agent}}}:*");
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let _: u64 = redis::cmd("UNLINK").arg(&keys).query_async(&mut conn).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

fn config() -> Criterion {
    Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(10)
}

criterion_group! { name = benches; config = config(); targets = bench_sqlite, bench_redis }
criterion_main!(benches);
