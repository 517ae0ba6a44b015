//! The Redis store runs its connection on a thread of its own. A binary of its own, so no
//! other test's stores start or stop threads while this one counts them.

use std::time::{Duration, Instant};

use concierge_protocol::{ChannelRef, EventData};
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
    let url = std::env::var("CONCIERGE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    assert_eq!(store_threads(), 0);
    let store = RedisStore::connect(&url, StoreOptions::default()).await.unwrap();
    assert_eq!(store_threads(), 1, "one thread per store");
    let agent = format!("t{:016x}", rand::random::<u64>());
    let event = EventData {
        agent: agent.clone(),
        channel: ChannelRef::new("webhook", "test"),
        conversation: "c".into(),
        sender: None,
        dedupe_key: None,
        received_at_ms: 1,
        text: None,
        attachments: vec![],
        content_type: "text/plain".into(),
        raw: b"x".to_vec(),
        meta: vec![],
    };
    assert_eq!(store.append(&event).await.unwrap(), Appended::Stored(1));
    assert_eq!(store.ack(&agent, 1).await.unwrap(), 1);
    drop(store);
    let deadline = Instant::now() + Duration::from_secs(5);
    while store_threads() > 0 {
        assert!(Instant::now() < deadline, "the store's thread outlived the store");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let keys = ["meta", "evt", "drop"].map(|k| format!("c:{{{agent}}}:{k}"));
    let _: () = redis::cmd("DEL").arg(&keys[..]).query_async(&mut conn).await.unwrap();
}
