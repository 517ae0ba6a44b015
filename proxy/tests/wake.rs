//! Wake is verified (promise 6): single-flight, retried with backoff, done only when the agent
//! actually connected; unreachable agents keep buffering and keep being retried.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0)
}

/// An exec wake whose command is a shell script (the echo agent is `$CONCIERGE_BIN agent echo`).
fn script_wake(script: &str, extra: &str) -> String {
    let script = script.replace('"', "\\\"");
    format!(
        "driver = \"exec\"\ncommand = [\"sh\", \"-c\", \"{script}\"]\nenv = {{ CONCIERGE_TOKEN = \"{TOKEN}\", CONCIERGE_BIN = \"{}\" }}\nsettle = \"200ms\"\nbackoff_initial = \"50ms\"\nbackoff_max = \"200ms\"\n{extra}",
        env!("CARGO_BIN_EXE_concierge")
    )
}

async fn start(dir: &Path, wake: &str, sink: &Sink) -> Proxy {
    start_on(dir, &Backend::Embedded, wake, sink)
}

/// Agent `echo` with route `demo`, whose replies go to `sink`, on `backend`.
fn start_on(dir: &Path, backend: &Backend, wake: &str, sink: &Sink) -> Proxy {
    let body = format!(
        "{}\n[webhooks.demo]\nagent = \"echo\"\nverify = \"none\"\nreply_url = \"{}\"\n",
        agent_section("echo", wake),
        sink.url
    );
    Proxy::start(&write_config(dir, backend, [0, 0, 0], &body))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_driver_that_fails_twice_then_succeeds_delivers_after_three_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("attempts");
    let script = format!(
        "echo x >> {0}; if [ $(wc -l < {0}) -le 2 ]; then echo 'machine not ready' >&2; exit 3; fi; exec \"$CONCIERGE_BIN\" agent echo",
        count.display()
    );
    let sink = Sink::start().await;
    let proxy = start(dir.path(), &script_wake(&script, ""), &sink).await;
    assert_eq!(proxy.post("echo", "demo", r#"{"text":"hi"}"#, None).await.0, 202);
    let replies = sink.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(replies.len(), 1, "delivered after retries; log:\n{}", proxy.log());
    assert_eq!(lines(&count), 3);
    let agent = proxy.agent("echo").await;
    assert_eq!(agent["last_wake"]["attempts"], 3);
    assert_eq!(agent["last_wake"]["outcome"], "connected");
    assert!(proxy.log().contains("machine not ready"), "the driver's stderr tail is reported");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_driver_that_succeeds_without_an_agent_ends_unreachable_and_keeps_retrying() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("attempts");
    let script = format!("echo x >> {}", count.display());
    let extra = "connect_timeout = \"300ms\"\nmax_attempts = 2\nunreachable_retry = \"700ms\"";
    let sink = Sink::start().await;
    let proxy = start(dir.path(), &script_wake(&script, extra), &sink).await;
    assert_eq!(proxy.post("echo", "demo", r#"{"text":"hi"}"#, None).await.0, 202);
    let agent = eventually(Duration::from_secs(10), || async {
        let a = proxy.agent("echo").await;
        (a["state"] == "unreachable").then_some(a)
    })
    .await
    .expect("ends unreachable");
    assert!(agent["last_error"].as_str().unwrap().contains("did not connect"), "{agent}");
    assert_eq!(agent["pending"], 1, "the event stays buffered");
    assert_eq!(lines(&count), 2);
    // Periodic retries continue while unreachable.
    let more = eventually(Duration::from_secs(10), || async { (lines(&count) >= 3).then_some(()) }).await;
    assert!(more.is_some(), "no retry after becoming unreachable");
    // More events buffer without extra wakes in between.
    assert_eq!(proxy.post("echo", "demo", r#"{"text":"more"}"#, None).await.0, 202);
    assert_eq!(proxy.agent("echo").await["pending"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_events_produce_one_wake() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("spawns");
    let script = format!("echo x >> {}; exec \"$CONCIERGE_BIN\" agent echo", count.display());
    let sink = Sink::start().await;
    let proxy = start(dir.path(), &script_wake(&script, ""), &sink).await;
    let posts = (0..40).map(|i| {
        let url = format!("http://{}/hooks/echo/demo", proxy.http);
        async move {
            reqwest::Client::new()
                .post(url)
                .body(format!("{{\"text\":\"m{i}\"}}"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    let statuses = futures::future::join_all(posts).await;
    assert!(statuses.iter().all(|s| *s == 202), "{statuses:?}");
    let replies = sink.wait_for(40, Duration::from_secs(30)).await;
    assert_eq!(replies.len(), 40);
    assert_eq!(lines(&count), 1, "single-flight: one spawn for 40 concurrent events");
}

#[tokio::test(flavor = "multi_thread")]
async fn coalesce_gathers_events_into_one_wake_and_idle_agents_are_put_to_sleep() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("spawns");
    let script = format!("echo x >> {}; exec \"$CONCIERGE_BIN\" agent echo", count.display());
    let extra = "policy = \"coalesce(700ms)\"\nsleep_after = \"300ms\"";
    let sink = Sink::start().await;
    let proxy = start(dir.path(), &script_wake(&script, extra), &sink).await;
    let t0 = Instant::now();
    for i in 0..5 {
        assert_eq!(proxy.post("echo", "demo", &format!("{{\"text\":\"m{i}\"}}"), None).await.0, 202);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let replies = sink.wait_for(5, Duration::from_secs(20)).await;
    assert_eq!(replies.len(), 5);
    assert!(t0.elapsed() >= Duration::from_millis(700), "the wake waited for the coalescing window");
    assert_eq!(lines(&count), 1);
    // Idle: the proxy drains the agent and it goes back to sleep.
    let asleep = eventually(Duration::from_secs(10), || async {
        (proxy.agent("echo").await["state"] == "asleep").then_some(())
    })
    .await;
    assert!(asleep.is_some(), "agent never went back to sleep; log:\n{}", proxy.log());
    // The next event wakes it again (after the coalescing window).
    assert_eq!(proxy.post("echo", "demo", r#"{"text":"later"}"#, None).await.0, 202);
    assert_eq!(sink.wait_for(6, Duration::from_secs(20)).await.len(), 6);
    assert_eq!(lines(&count), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_can_wake_an_agent_with_policy_never() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("spawns");
    let script = format!("echo x >> {}; exec \"$CONCIERGE_BIN\" agent echo", count.display());
    let sink = Sink::start().await;
    let proxy = start(dir.path(), &script_wake(&script, "policy = \"never\""), &sink).await;
    assert_eq!(proxy.post("echo", "demo", r#"{"text":"hi"}"#, None).await.0, 202);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(lines(&count), 0, "policy never: no wake on events");
    let r = reqwest::Client::new().post(format!("http://{}/api/agents/echo/wake", proxy.admin)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(sink.wait_for(1, Duration::from_secs(20)).await.len(), 1);
    assert_eq!(proxy.agent("echo").await["last_wake"]["reason"], "operator");
}

/// An agent's start-up overlaps the durable write of the event that wakes it: with Redis
/// frozen mid-write, the driver is called although the webhook is not answered yet (write
/// before ack still holds), and once Redis thaws the POST gets its 202 and the woken agent
/// receives the event, with one wake in all.
#[tokio::test(flavor = "multi_thread")]
async fn the_wake_starts_while_its_event_is_still_being_written() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start();
    let spawns = dir.path().join("spawns");
    let script = format!("echo x >> {}; exec \"$CONCIERGE_BIN\" agent echo", spawns.display());
    let sink = Sink::start().await;
    let proxy = start_on(dir.path(), &Backend::Redis(redis.url()), &script_wake(&script, ""), &sink);

    redis.pause();
    let url = format!("http://{}/hooks/echo/demo", proxy.http);
    let post = tokio::spawn(async move {
        let response = reqwest::Client::new().post(url).body(r#"{"text":"wake up"}"#).send().await.unwrap();
        response.status().as_u16()
    });
    let woken = eventually(Duration::from_secs(4), || async { (lines(&spawns) == 1).then_some(()) }).await;
    let answered_while_frozen = post.is_finished();
    redis.resume();

    assert!(woken.is_some(), "the driver was not called while the event was being written; log:\n{}", proxy.log());
    assert!(!answered_while_frozen, "the webhook was answered before its event was durable");
    assert_eq!(post.await.unwrap(), 202);
    let replies = sink.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(replies.len(), 1, "the woken agent received the event; log:\n{}", proxy.log());
    assert_eq!(lines(&spawns), 1, "one wake for the event");
}

// ---------------------------------------------------------------------------------------
// Warm start: what a woken agent gets first is read while it boots

/// A proxy on its own Redis whose agent `echo` was just woken for `n` events, with the start
/// prepared during that wake. The driver only records the wake: the test is the agent. (The
/// temp dir, Redis and reply sink must outlive the proxy.)
async fn woken(policy: &str, n: usize) -> (tempfile::TempDir, Redis, Sink, Proxy) {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start();
    let sink = Sink::start().await;
    let spawns = dir.path().join("spawns");
    let script = format!("echo x >> {}; exec sleep 30", spawns.display());
    let extra = format!("connect_timeout = \"30s\"\npolicy = \"{policy}\"");
    let proxy = start_on(dir.path(), &Backend::Redis(redis.url()), &script_wake(&script, &extra), &sink);
    for i in 1..=n {
        assert_eq!(proxy.post("echo", "demo", &format!(r#"{{"text":"m{i}"}}"#), None).await.0, 202);
    }
    let woken = eventually(Duration::from_secs(5), || async { (lines(&spawns) == 1).then_some(()) }).await;
    assert!(woken.is_some(), "no wake; log:\n{}", proxy.log());
    // The wake's read ahead is the only store read before a session.
    let prepared =
        eventually(Duration::from_secs(5), || async { (store_reads(&proxy).await >= 1.0).then_some(()) }).await;
    assert!(prepared.is_some(), "the wake read nothing ahead; log:\n{}", proxy.log());
    (dir, redis, sink, proxy)
}

async fn store_reads(proxy: &Proxy) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", proxy.admin)).await.unwrap().text().await.unwrap();
    text.lines()
        .find(|l| l.starts_with("concierge_store_command_duration_seconds_count{op=\"read\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The woken agent's Hello is answered, and its first event delivered, from what the proxy
/// read while the agent booted: here Redis is frozen when the agent connects.
#[tokio::test(flavor = "multi_thread")]
async fn a_woken_agent_gets_its_first_event_without_waiting_for_the_store() {
    let (_dir, redis, _sink, proxy) = woken("immediate", 1).await;

    redis.pause();
    let first = tokio::time::timeout(Duration::from_secs(5), async {
        let mut client = proxy.connect("echo").await;
        let event = client.next().await;
        (client, event)
    })
    .await;
    redis.resume();
    let (client, event) = first.expect("no Welcome and first event while the store was frozen");
    let event = event.unwrap().unwrap();
    assert_eq!((event.offset, event.data.text.as_deref()), (1, Some("m1")));
    // The store agrees with the prepared start: the session carries on and the ack lands.
    client.ack(1);
    let acked =
        eventually(Duration::from_secs(10), || async { (proxy.agent("echo").await["cursor"] == 1).then_some(()) })
            .await;
    assert!(acked.is_some(), "the ack never reached the store; log:\n{}", proxy.log());
    assert_eq!(client.welcome().cursor, 0, "no reconnect: still the first session");
    assert!(!proxy.log().contains("log position moved"), "log:\n{}", proxy.log());
}

/// A prepared start that went stale before the agent connected (another replica's ack, here
/// written straight into Redis) ends its session as soon as the store answers; the agent
/// reconnects and resumes from the store's cursor.
#[tokio::test(flavor = "multi_thread")]
async fn a_stale_warm_start_is_corrected_by_a_reconnect_from_the_stores_cursor() {
    let (_dir, redis, _sink, proxy) = woken("immediate", 3).await;
    let moved = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "HSET", "c:{echo}:meta", "cursor", "2"])
        .output()
        .expect("redis-cli runs");
    assert!(moved.status.success());

    let mut client = proxy.connect("echo").await;
    assert_eq!(client.welcome().cursor, 0, "the prepared start states the cursor of the wake");
    let first = tokio::time::timeout(Duration::from_secs(5), client.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.offset, 1);
    let corrected =
        eventually(Duration::from_secs(10), || async { (client.welcome().cursor == 2).then_some(()) }).await;
    assert!(corrected.is_some(), "the session was not restarted from the store's cursor; log:\n{}", proxy.log());
    assert!(proxy.log().contains("log position moved"), "log:\n{}", proxy.log());
}

/// An operator's drop between the wake and the agent's Hello discards the prepared start:
/// the dropped event is never delivered. (Coalesced, so all three events are stored when the
/// wake reads ahead, and the drop leaves the cursor where it was.)
#[tokio::test(flavor = "multi_thread")]
async fn a_drop_while_the_agent_boots_is_respected() {
    let (_dir, _redis, _sink, proxy) = woken("coalesce(500ms)", 3).await;
    let dropped = reqwest::Client::new()
        .post(format!("http://{}/api/agents/echo/drop", proxy.admin))
        .json(&serde_json::json!({ "offsets": [2] }))
        .send()
        .await
        .unwrap();
    assert_eq!(dropped.status().as_u16(), 200);

    let mut client = proxy.connect("echo").await;
    let mut offsets = Vec::new();
    for _ in 0..2 {
        let e = tokio::time::timeout(Duration::from_secs(5), client.next()).await.unwrap().unwrap().unwrap();
        offsets.push(e.offset);
    }
    assert_eq!(offsets, [1, 3], "the dropped event was delivered");
}
