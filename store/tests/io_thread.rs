//! The Redis store runs its connection on a thread of its own. A binary of its own, so no
//! other test's stores start or stop threads while this one counts them.

mod common;

use std::time::{Duration, Instant};

use common::*;
use concierge_store::{Appended, RedisStore, Store, StoreOptions};

fn store_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "concierge-redis")
        .count()
}

/// Dropping the store ends its thread, so a process that opens and drops stores does not pile
/// up threads; and the thread carries the store's work while it lives.
#[tokio::test]
async fn the_store_thread_ends_when_the_store_is_dropped() {
    assert_eq!(store_threads(), 0);
    let store = RedisStore::connect(&shared_redis_url(), StoreOptions::default()).await.unwrap();
    assert_eq!(store_threads(), 1, "one thread per store");
    let agent = random_prefix();
    assert_eq!(store.append(&event(&agent, None, "m1")).await.unwrap(), Appended::Stored(1));
    assert_eq!(store.ack(&agent, 1).await.unwrap(), 1);
    drop(store);
    let deadline = Instant::now() + Duration::from_secs(5);
    while store_threads() > 0 {
        assert!(Instant::now() < deadline, "the store's thread outlived the store");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    delete_log_keys(&mut raw_redis(&shared_redis_url()).await, &agent).await;
}
