//! The Redis store runs its connection and its calls as tasks on the runtime that opened it.
//! A binary of its own, so no other test's stores add or end tasks while this one counts them.

mod common;

use std::time::{Duration, Instant};

use common::*;
use concierge_store::{Appended, RedisStore, Store, StoreError, StoreOptions};

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current().metrics().num_alive_tasks()
}

/// Dropping the store ends its tasks (the connection's and the group commit's), so a process
/// that opens and drops stores does not pile them up.
#[tokio::test]
async fn the_store_tasks_end_when_the_store_is_dropped() {
    let before = alive_tasks();
    let store = RedisStore::connect(&shared_redis_url(), StoreOptions::default()).await.unwrap();
    assert!(alive_tasks() > before, "the store runs tasks of its own on this runtime");
    let agent = random_prefix();
    assert_eq!(store.append(&event(&agent, None, "m1")).await.unwrap(), Appended::Stored(1));
    assert_eq!(store.ack(&agent, 1).await.unwrap(), 1);
    drop(store);
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive_tasks() > before {
        assert!(Instant::now() < deadline, "{} of the store's tasks outlived it", alive_tasks() - before);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    delete_log_keys(&mut raw_redis(&shared_redis_url()).await, &agent).await;
}

/// A store used after the runtime that opened it has stopped answers every call with an
/// error that says so, at once: no call waits forever for a task that will never run.
#[tokio::test]
async fn a_store_whose_runtime_stopped_fails_its_calls_clearly() {
    let url = shared_redis_url();
    let store = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(RedisStore::connect(&url, StoreOptions::default())).unwrap()
        // The runtime is dropped here, with the store's tasks.
    })
    .join()
    .unwrap();
    let agent = random_prefix();
    let within = Duration::from_secs(5);
    let append = tokio::time::timeout(within, store.append(&event(&agent, None, "m1"))).await;
    match append.expect("append answered") {
        Err(StoreError::Unavailable(why)) => assert!(why.contains("shutting down"), "{why}"),
        other => panic!("append on a stopped runtime: {other:?}"),
    }
    let read = tokio::time::timeout(within, store.read_records(&agent, 0, 10)).await;
    match read.expect("read answered") {
        Err(StoreError::Unavailable(why)) => assert!(why.contains("runtime stopped"), "{why}"),
        other => panic!("read on a stopped runtime: {other:?}"),
    }
}
