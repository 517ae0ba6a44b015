//! Promise 4 (isolation) and promises 2/3 (dedupe inbound, at most once outbound), through
//! real processes and real QUIC.

mod common;

use std::time::Duration;

use common::*;
use concierge_protocol::client::{AgentClient, ClientError};
use concierge_protocol::{ChannelRef, RejectCode, SendRequest, SendResult};

fn two_agents(sink: &Sink) -> String {
    let reply = format!("reply_url = \"{}\"", sink.url);
    format!(
        "{}{}{}{}",
        self_connecting_agent("a"),
        self_connecting_agent("b"),
        webhook_route("a-hook", "a", &reply),
        webhook_route("b-hook", "b", &reply),
    )
}

fn request(key: &str, route: &str, body: &str) -> SendRequest {
    SendRequest {
        idempotency_key: key.into(),
        channel: ChannelRef::new("webhook", route),
        conversation: route.into(),
        body: body.into(),
        reply_to: None,
    }
}

/// Sink POSTs carrying this idempotency key.
fn sink_count(sink: &Sink, key: &str) -> usize {
    sink.bodies().iter().filter(|b| b["idempotency_key"] == key).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_token_and_unknown_agent_get_the_same_answer() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start().await;
    // Agent `c` has a token of its own: each token opens only its own agent.
    let c_token = "c-token-abcdefghijklmnop";
    let body = format!(
        "{}[agents.c]\ntoken = \"{c_token}\"\n[agents.c.wake]\ndriver = \"none\"\npolicy = \"never\"\n",
        two_agents(&sink)
    );
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body);
    let proxy = Proxy::start(&config);
    let reject = |r: Result<AgentClient, ClientError>| match r {
        Ok(_) => panic!("session accepted"),
        Err(ClientError::Rejected { code, message }) => (code, message),
        Err(other) => panic!("expected a Reject, got {other}"),
    };
    let (code, wrong_token) = reject(AgentClient::connect(proxy.client_options("a", "not-the-token-0123456789")).await);
    assert_eq!(code, RejectCode::Unauthorized);
    let (code, unknown) = reject(AgentClient::connect(proxy.client_options("nobody", TOKEN)).await);
    assert_eq!(code, RejectCode::Unauthorized);
    assert_eq!(wrong_token, unknown, "no probing: the same message for both");
    let (code, cross) = reject(AgentClient::connect(proxy.client_options("a", c_token)).await);
    assert_eq!((code, &cross), (RejectCode::Unauthorized, &unknown), "c's token does not open a");
    let (code, cross) = reject(AgentClient::connect(proxy.client_options("c", TOKEN)).await);
    assert_eq!((code, &cross), (RejectCode::Unauthorized, &unknown), "a's token does not open c");
    let c = AgentClient::connect(proxy.client_options("c", c_token)).await.expect("c's own token works");
    assert_eq!(proxy.agent("c").await["connected"], true);
    c.close().await;
    assert!(!proxy.log().contains(c_token), "tokens never appear in logs");
    assert!(!proxy.agent("a").await["connected"].as_bool().unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_see_and_send_only_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start().await;
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &two_agents(&sink));
    let proxy = Proxy::start(&config);
    let http = http_client();
    let mut a = proxy.connect("a").await;
    let mut b = proxy.connect("b").await;
    for i in 1..=3 {
        for (agent, route) in [("a", "a-hook"), ("b", "b-hook")] {
            let body = format!(r#"{{"for":"{agent}","i":{i}}}"#);
            let r = proxy.post_with(&http, agent, route, body, &[]).await;
            assert_eq!(r.status, 202, "{r:?}");
        }
    }
    for (client, agent, route) in [(&mut a, "a", "a-hook"), (&mut b, "b", "b-hook")] {
        let events = receive_n(client, 3, Duration::from_secs(10)).await;
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.data.agent, agent);
            assert_eq!(e.data.channel, ChannelRef::new("webhook", route));
            assert_eq!(e.data.raw, format!(r#"{{"for":"{agent}","i":{}}}"#, i + 1).as_bytes());
        }
        expect_no_more(client, Duration::from_millis(500)).await;
    }

    // A cannot send through B's route, nor through a route that does not exist.
    for route in ["b-hook", "no-such-route"] {
        let result = a.send(request(&format!("steal-{route}"), route, "hi")).await.unwrap();
        match result {
            SendResult::Err { code, .. } => assert_eq!(code, "channel_not_bound", "route {route}"),
            ok => panic!("A sent through {route}: {ok:?}"),
        }
    }
    // A cannot post into B's route either.
    let r = proxy.post_with(&http, "a", "b-hook", "{}", &[]).await;
    assert_eq!(r.status, 404, "{r:?}");
    let r = proxy.post_with(&http, "b", "a-hook", "{}", &[]).await;
    assert_eq!(r.status, 404, "{r:?}");

    // Its own route works, and only that send reached the sink.
    let result = a.send(request("own-1", "a-hook", "mine")).await.unwrap();
    assert!(matches!(result, SendResult::Ok { .. }), "{result:?}");
    let got = sink.wait_for(1, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got_now = sink.bodies();
    assert_eq!(got_now.len(), 1, "exactly one reply POST: {got:?}");
    assert_eq!(got_now[0]["agent"], "a");
    assert_eq!(got_now[0]["body"], "mine");
    expect_no_more(&mut a, Duration::from_millis(200)).await;
    expect_no_more(&mut b, Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_sends_reach_the_platform_once() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start().await;
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &two_agents(&sink));
    let proxy = Proxy::start(&config);
    let a = proxy.connect("a").await;

    // Sequential retries return the recorded result.
    let first = a.send(request("seq-key", "a-hook", "once")).await.unwrap();
    assert!(matches!(first, SendResult::Ok { .. }), "{first:?}");
    for _ in 0..2 {
        let again = a.send(request("seq-key", "a-hook", "once")).await.unwrap();
        assert_eq!(again, first, "a retry returns the first result");
    }

    // Concurrent duplicates: exactly one reaches the sink; the others get the recorded result
    // or `send_in_flight`.
    let sends = (0..5).map(|_| a.send(request("conc-key", "a-hook", "concurrent")));
    let results: Vec<SendResult> = futures::future::join_all(sends).await.into_iter().map(|r| r.unwrap()).collect();
    let oks: Vec<&SendResult> = results.iter().filter(|r| matches!(r, SendResult::Ok { .. })).collect();
    assert!(!oks.is_empty(), "one of the concurrent sends performs it: {results:?}");
    for r in &results {
        match r {
            SendResult::Ok { .. } => assert_eq!(r, oks[0]),
            SendResult::Err { code, .. } => assert_eq!(code, "send_in_flight", "{results:?}"),
        }
    }
    // After the dust settles, a retry returns the recorded Ok.
    let later = a.send(request("conc-key", "a-hook", "concurrent")).await.unwrap();
    assert_eq!(&later, oks[0]);

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink_count(&sink, "seq-key"), 1, "sink: {:?}", sink.bodies());
    assert_eq!(sink_count(&sink, "conc-key"), 1, "sink: {:?}", sink.bodies());
    assert_eq!(sink.bodies().len(), 2);
    // The receiver can dedupe too: the idempotency key is the webhook-id.
    let ids: Vec<String> = sink
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|(h, _)| h.get("webhook-id").unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec!["seq-key", "conc-key"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_webhook_deliveries_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let body = format!(
        "{}{}{}",
        self_connecting_agent("a"),
        webhook_route("plain", "a", ""),
        webhook_route("signed", "a", &format!("verify = \"standard\"\nsecret = \"{secret}\"")),
    );
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body);
    let proxy = Proxy::start(&config);
    let http = http_client();

    let mut offsets = Vec::new();
    for attempt in 0..3 {
        let r = proxy.post_with(&http, "a", "plain", r#"{"n":1}"#, &[("Idempotency-Key", "dup-1")]).await;
        assert_eq!(r.status, 202, "{r:?}");
        assert_eq!(r.json["duplicate"], attempt > 0, "attempt {attempt}: {r:?}");
        offsets.push(r.json["offset"].as_u64().unwrap());
    }
    assert_eq!(offsets, vec![1, 1, 1]);

    let key = concierge_adapters::signature::secret_bytes(secret);
    let payload = br#"{"n":2}"#;
    let ts = (concierge_protocol::now_ms() / 1000) as i64;
    let headers = concierge_adapters::signature::standard_headers(&key, "msg_dup_2", ts, payload);
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // An unsigned delivery to the signed route is refused and stores nothing.
    let r = proxy.post_with(&http, "a", "signed", payload.to_vec(), &[("webhook-id", "msg_dup_2")]).await;
    assert_eq!(r.status, 401, "{r:?}");
    let mut offsets = Vec::new();
    for attempt in 0..3 {
        let r = proxy.post_with(&http, "a", "signed", payload.to_vec(), &headers).await;
        assert_eq!(r.status, 202, "{r:?}");
        assert_eq!(r.json["duplicate"], attempt > 0, "attempt {attempt}: {r:?}");
        offsets.push(r.json["offset"].as_u64().unwrap());
    }
    assert_eq!(offsets, vec![2, 2, 2]);

    let stored = proxy.events("a").await;
    assert_eq!(stored.len(), 2, "each delivery stored once: {stored:?}");
    assert_eq!(stored[0]["dedupe_key"], "plain:dup-1");
    assert_eq!(stored[1]["dedupe_key"], "signed:msg_dup_2");

    let mut agent = proxy.connect("a").await;
    let events = receive_n(&mut agent, 2, Duration::from_secs(10)).await;
    assert_eq!(events[0].data.raw, br#"{"n":1}"#);
    assert_eq!(events[1].data.raw, payload);
    expect_no_more(&mut agent, Duration::from_secs(1)).await;

    // A redelivery after the agent acked is still a duplicate, and is not delivered again.
    proxy.wait_cursor("a", 2, Duration::from_secs(10)).await;
    let r = proxy.post_with(&http, "a", "plain", r#"{"n":1}"#, &[("Idempotency-Key", "dup-1")]).await;
    assert_eq!((r.status, r.json["duplicate"].as_bool(), r.json["offset"].as_u64()), (202, Some(true), Some(1)));
    expect_no_more(&mut agent, Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_api_requires_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let admin_token = "admin-secret-0123456789";
    let config = write_config_with(
        dir.path(),
        &Backend::Embedded,
        [0, 0, 0],
        &format!("admin_token = \"{admin_token}\""),
        &self_connecting_agent("a"),
    );
    let proxy = Proxy::start(&config);
    assert_eq!(proxy.admin_status("/api/agents", None).await, 401);
    assert_eq!(proxy.admin_status("/api/agents", Some("wrong-token")).await, 401);
    assert_eq!(proxy.admin_status("/api/agents", Some(TOKEN)).await, 401, "an agent token is not the admin token");
    assert_eq!(proxy.admin_status("/api/agents/a/events", None).await, 401);
    let wake = http_client().post(format!("http://{}/api/agents/a/wake", proxy.admin)).send().await.unwrap();
    assert_eq!(wake.status().as_u16(), 401);
    assert_eq!(proxy.admin_status("/api/agents", Some(admin_token)).await, 200);
    assert_eq!(proxy.admin_status("/api/agents/a/events", Some(admin_token)).await, 200);
    assert_eq!(proxy.admin_status("/livez", None).await, 200);
    assert!(!proxy.log().contains(admin_token), "the admin token never appears in logs");
}
