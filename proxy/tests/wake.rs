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
