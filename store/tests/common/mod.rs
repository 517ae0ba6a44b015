//! Helpers shared by the store's test binaries.
#![allow(dead_code)]

use concierge_protocol::{ChannelRef, EventData, now_ms};

pub fn random_prefix() -> String {
    format!("t{:016x}", rand::random::<u64>())
}

pub fn shared_redis_url() -> String {
    std::env::var("CONCIERGE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub async fn raw_redis(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

pub fn event(agent: &str, dedupe_key: Option<&str>, text: &str) -> EventData {
    event_at(agent, dedupe_key, text, now_ms())
}

pub fn event_at(agent: &str, dedupe_key: Option<&str>, text: &str, received_at_ms: u64) -> EventData {
    EventData {
        agent: agent.to_owned(),
        channel: ChannelRef::new("webhook", "test"),
        conversation: "conversation-1".to_owned(),
        sender: Some("sender".to_owned()),
        dedupe_key: dedupe_key.map(str::to_owned),
        received_at_ms,
        text: Some(text.to_owned()),
        attachments: vec![],
        content_type: "application/json".to_owned(),
        raw: format!("{{\"text\":{text:?}}}").into_bytes(),
        meta: vec![("k".to_owned(), "v".to_owned())],
    }
}

/// Removes an agent's dedupe keys (`c:{agent}:dd:<key>`) from the shared Redis.
pub async fn delete_dedupe_keys(conn: &mut redis::aio::MultiplexedConnection, agent: &str, dedupe: &[&str]) {
    let keys: Vec<String> = dedupe.iter().map(|k| format!("c:{{{agent}}}:dd:{k}")).collect();
    let _: () = redis::cmd("DEL").arg(&keys[..]).query_async(conn).await.unwrap();
}

/// Removes an agent's log keys (meta, stream, dropped set) from the shared Redis.
pub async fn delete_log_keys(conn: &mut redis::aio::MultiplexedConnection, agent: &str) {
    let keys = ["meta", "evt", "drop"].map(|k| format!("c:{{{agent}}}:{k}"));
    let _: () = redis::cmd("DEL").arg(&keys[..]).query_async(conn).await.unwrap();
}
