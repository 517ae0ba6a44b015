//! Operations surface: the dashboard in headless Chromium, admin auth on every action, and
//! the Prometheus exposition as events flow.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const ADMIN: &str = "admin-token-0123456789";
const READER: &str = "read-token-0123456789";

// ---------------------------------------------------------------------------------------
// A minimal DevTools-protocol driver for Debian's `chromium` (no browser download, no Node).

struct Browser {
    child: Child,
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    session: String,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn launch() -> Browser {
        let binary = ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok())
            .expect("headless Chromium is required: apt-get install chromium (scripts/test installs it)");
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(binary)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
            .args(["--remote-debugging-port=0", "--window-size=1366,900", "--hide-scrollbars"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(30)).expect("chromium printed its DevTools address");
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("DevTools websocket");
        let mut b = Browser { child, ws, session: String::new(), next_id: 0, _profile: profile };
        let target = b.call("Target.createTarget", json!({ "url": "about:blank" })).await;
        let attached =
            b.call("Target.attachToTarget", json!({ "targetId": target["targetId"], "flatten": true })).await;
        b.session = attached["sessionId"].as_str().expect("session id").to_string();
        b.call("Page.enable", json!({})).await;
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1366, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await;
        b
    }

    /// Sends one command (on the page session once attached) and waits for its answer.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws.send(Message::text(msg.to_string())).await.expect("send to DevTools");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("DevTools closed")
                .expect("DevTools read");
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method} failed: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression (awaiting promises) and returns its value.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call("Runtime.evaluate", json!({ "expression": expr, "awaitPromise": true, "returnByValue": true }))
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{expr} threw: {r}");
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is `true`, for at most `within`.
    async fn wait_for(&mut self, expr: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.eval(&format!("(() => {{ try {{ return !!({expr}); }} catch (e) {{ return false; }} }})()")).await
                == Value::Bool(true)
            {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
    }

    async fn screenshot(&mut self, name: &str) -> PathBuf {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png", "captureBeyondViewport": true })).await;
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        let dir = artifacts_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `target/test-artifacts/` of this workspace (or of `CARGO_TARGET_DIR`).
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("test-artifacts")
}

fn text_of(selector: &str) -> String {
    format!("(document.querySelector({selector:?}) || {{}}).textContent")
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_shows_the_fleet_and_wakes_an_agent_live() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start().await;
    let body = format!(
        "{}\n{}\n{}\n{}",
        agent_section("alpha", &echo_wake("policy = \"never\"")),
        self_connecting_agent("beta"),
        webhook_route("alpha-hook", "alpha", &format!("reply_url = \"{}\"", sink.url)),
        webhook_route("beta-hook", "beta", ""),
    );
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body);
    // Keep acked events so the event view can show one after delivery.
    let text = std::fs::read_to_string(&config).unwrap().replace("[store]\n", "[store]\nretain_acked = 100\n");
    std::fs::write(&config, text).unwrap();
    let proxy = Proxy::start(&config);
    for i in 0..3 {
        assert_eq!(proxy.post("alpha", "alpha-hook", &format!(r#"{{"text":"a{i}"}}"#), None).await.0, 202);
    }
    for i in 0..2 {
        assert_eq!(proxy.post("beta", "beta-hook", &format!(r#"{{"text":"b{i}"}}"#), None).await.0, 202);
    }

    let mut browser = Browser::launch().await;
    browser.goto(&format!("http://{}/", proxy.admin)).await;
    let alpha = r#"tr[data-agent="alpha"] td[data-col="pending"]"#;
    let beta = r#"tr[data-agent="beta"] td[data-col="pending"]"#;
    let counts =
        format!("{} === '3' && {} === '2' && {} === '5'", text_of(alpha), text_of(beta), text_of("#total-pending"));
    let shown = browser.wait_for(&counts, Duration::from_secs(15)).await;
    let fleet_shot = browser.screenshot("dashboard-fleet.png").await;
    assert!(
        shown,
        "fleet table shows 3 and 2 buffered events; page: {}",
        browser.eval("document.body.innerText").await
    );
    assert_eq!(browser.eval(&text_of(r#"tr[data-agent="alpha"] td[data-col="state"]"#)).await, "asleep");
    // Each row lists its channels with the health of what holds them (webhook routes listen).
    let hook = r#"tr[data-agent="alpha"] li[data-channel="webhook/alpha-hook"]"#;
    assert_eq!(browser.eval(&format!("document.querySelector({hook:?}).dataset.health")).await, "ok");
    assert_eq!(browser.eval(&format!("{}.trim()", text_of(&format!("{hook} .chan-state")))).await, "listening");
    // Sorting by a column header reorders the rows and marks the column: the default order
    // (most buffered first) is alpha, beta; the id column ascending, then descending.
    let order = "[...document.querySelectorAll('#fleet-table tbody tr')].map((r) => r.dataset.agent).join(',')";
    assert_eq!(browser.eval(order).await, "alpha,beta");
    let sort_by_id = r#"document.querySelector('th[data-key="id"] button').click()"#;
    browser.eval(sort_by_id).await;
    assert_eq!(
        browser.eval(r#"document.querySelector('th[data-key="id"]').getAttribute('aria-sort')"#).await,
        "ascending"
    );
    assert_eq!(browser.eval(order).await, "alpha,beta");
    browser.eval(sort_by_id).await;
    assert_eq!(
        browser.eval(r#"document.querySelector('th[data-key="id"]').getAttribute('aria-sort')"#).await,
        "descending"
    );
    assert_eq!(browser.eval(order).await, "beta,alpha", "descending by id puts beta first");
    // Filtering by text and by state.
    let type_filter = |text: &str| {
        format!(
            "(() => {{ const i = document.querySelector('#filter-text'); i.value = {text:?}; i.dispatchEvent(new Event('input')); }})()"
        )
    };
    browser.eval(&type_filter("bet")).await;
    assert_eq!(browser.eval(order).await, "beta", "the text filter keeps matching agents only");
    browser.eval(&type_filter("alpha-hook")).await;
    assert_eq!(browser.eval(order).await, "alpha", "the text filter matches channel names too");
    browser.eval(&type_filter("")).await;
    let pick_state = |state: &str| {
        format!(
            "(() => {{ const s = document.querySelector('#filter-state'); s.value = {state:?}; s.dispatchEvent(new Event('change')); }})()"
        )
    };
    browser.eval(&pick_state("awake")).await;
    assert_eq!(browser.eval(order).await, "", "no agent is awake");
    browser.eval(&pick_state("")).await;
    assert_eq!(browser.eval(order).await, "beta,alpha");
    // Pausing live updates: a new event does not show until updates resume.
    browser.eval("document.querySelector('#live-toggle').click()").await;
    assert_eq!(browser.eval(&text_of("#live-status")).await, "Updates paused");
    assert_eq!(proxy.post("beta", "beta-hook", r#"{"text":"b2"}"#, None).await.0, 202);
    let beta_three = format!("{} === '3'", text_of(beta));
    // Several stream ticks (1 s each) pass without the row changing.
    assert!(!browser.wait_for(&beta_three, Duration::from_secs(4)).await, "paused: the row must not update");
    browser.eval("document.querySelector('#live-toggle').click()").await;
    assert!(browser.wait_for(&beta_three, Duration::from_secs(15)).await, "resumed: the row updates");
    assert_eq!(browser.eval(&text_of("#live-status")).await, "Live");

    // Open the agent, wake it now (with confirmation) and see it become awake and drain.
    browser.eval(r##"document.querySelector('tr[data-agent="alpha"] a').click()"##).await;
    assert!(
        browser
            .wait_for(
                "document.querySelector('#act-wake') && document.querySelector('#agent-state')",
                Duration::from_secs(10)
            )
            .await
    );
    assert_eq!(browser.eval(&text_of("#agent-state")).await, "asleep");
    assert!(
        browser
            .wait_for("document.querySelectorAll('#events-table tbody tr').length === 3", Duration::from_secs(10))
            .await
    );
    browser.eval("document.querySelector('#act-wake').click()").await;
    assert!(
        browser.wait_for("document.querySelector('#confirm').open", Duration::from_secs(5)).await,
        "confirmation asked"
    );
    browser.eval("document.querySelector('#confirm-ok').click()").await;
    let awake = browser
        .wait_for(
            &format!("{} === 'awake' && {}.startsWith('0 events')", text_of("#agent-state"), text_of("#agent-pending")),
            Duration::from_secs(30),
        )
        .await;
    let agent_shot = browser.screenshot("dashboard-agent.png").await;
    assert!(
        awake,
        "agent view shows the wake live; page: {}\nlog:\n{}",
        browser.eval("document.body.innerText").await,
        proxy.log()
    );
    assert_eq!(sink.wait_for(3, Duration::from_secs(10)).await.len(), 3, "the woken agent replied to all three");
    // The timeline draws the awake period and the minute's three arrivals.
    assert!(
        browser.wait_for("document.querySelector('#wake-strip rect.span-awake')", Duration::from_secs(10)).await,
        "an awake period in the timeline"
    );
    assert!(browser.eval("document.querySelectorAll('#wake-strip line.arrival').length").await.as_u64() >= Some(1));
    // The event view counts deliveries.
    browser.goto(&format!("http://{}/#/agent/alpha/event/1", proxy.admin)).await;
    assert!(
        browser.wait_for(&format!("{}.startsWith('1 ')", text_of("#event-attempts")), Duration::from_secs(10)).await,
        "event 1 was delivered once: {}",
        browser.eval("document.body.innerText").await
    );
    let audit: Value =
        http_client().get(format!("http://{}/api/audit", proxy.admin)).send().await.unwrap().json().await.unwrap();
    assert_eq!(audit["entries"][0]["action"], "wake", "{audit}");
    for shot in [fleet_shot, agent_shot] {
        assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "screenshot {} has content", shot.display());
    }
}

// ---------------------------------------------------------------------------------------
// Auth

async fn call(proxy: &Proxy, method: &str, path: &str, body: Option<Value>, bearer: Option<&str>) -> u16 {
    let url = format!("http://{}{path}", proxy.admin);
    let mut req = if method == "POST" { http_client().post(url) } else { http_client().get(url) };
    if let Some(b) = body {
        req = req.json(&b);
    }
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_action_needs_the_admin_token_and_the_read_token_only_reads() {
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("admin_token = \"{ADMIN}\"\nadmin_read_token = \"{READER}\"");
    let body = format!("{}\n{}", self_connecting_agent("a"), webhook_route("hook", "a", ""));
    let config = write_config_with(dir.path(), &Backend::Embedded, [0, 0, 0], &extra, &body);
    // Keep acked events so redeliver has something to rewind to.
    let text = std::fs::read_to_string(&config).unwrap().replace("[store]\n", "[store]\nretain_acked = 100\n");
    std::fs::write(&config, text).unwrap();
    let proxy = Proxy::start(&config);
    for i in 0..4 {
        assert_eq!(proxy.post("a", "hook", &format!(r#"{{"n":{i}}}"#), None).await.0, 202);
    }
    let actions: Vec<(&str, Option<Value>)> = vec![
        ("/api/agents/a/wake", None),
        ("/api/agents/a/pause", None),
        ("/api/agents/a/resume", None),
        ("/api/agents/a/drop", Some(json!({ "up_to": 2, "preview": true }))),
        ("/api/agents/a/drop", Some(json!({ "up_to": 2 }))),
        ("/api/agents/a/redeliver", Some(json!({ "from": 1 }))),
        ("/api/agents/a/drop", Some(json!({ "filter": { "channel": "hook" }, "preview": true }))),
        ("/api/agents/a/drop", Some(json!({ "offsets": [4], "preview": true }))),
        ("/api/agents/a/drop", Some(json!({ "offsets": [4] }))),
    ];
    for (path, body) in &actions {
        assert_eq!(call(&proxy, "POST", path, body.clone(), None).await, 401, "{path} without a token");
        assert_eq!(call(&proxy, "POST", path, body.clone(), Some("wrong")).await, 401, "{path} with a wrong token");
        assert_eq!(call(&proxy, "POST", path, body.clone(), Some(READER)).await, 403, "{path} with the read token");
    }
    // Nothing happened so far: no audit entries, nothing dropped.
    let audit = |token: &'static str| {
        let url = format!("http://{}/api/audit", proxy.admin);
        async move { http_client().get(url).bearer_auth(token).send().await.unwrap().json::<Value>().await.unwrap() }
    };
    assert_eq!(audit(READER).await["entries"].as_array().unwrap().len(), 0);
    for (path, body) in &actions {
        let status = call(&proxy, "POST", path, body.clone(), Some(ADMIN)).await;
        assert!((200..300).contains(&status), "{path} with the admin token: {status}");
    }
    let entries = audit(ADMIN).await["entries"].as_array().unwrap().clone();
    let actions_logged: Vec<&str> = entries.iter().rev().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(actions_logged, ["wake", "pause", "resume", "drop", "redeliver", "drop"], "previews are not actions");
    assert!(entries[0]["detail"].as_str().unwrap().contains("offsets 4 (1 events)"), "{}", entries[0]);
    // The first drop acked 1..=2, the redeliver moved the cursor back to 0, the last drop
    // removed event 4: 3 pending.
    let agent: Value = http_client()
        .get(format!("http://{}/api/agents/a", proxy.admin))
        .bearer_auth(READER)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((agent["cursor"].as_u64(), agent["pending"].as_u64()), (Some(0), Some(3)), "{agent}");
    // The detail page looks up the state of this agent's held connections (its route listens).
    assert_eq!(agent["channels"][0]["name"], "hook", "{agent}");
    assert_eq!(agent["channels"][0]["state"], "listening", "{agent}");
    // Reads: open to both tokens, closed without one; the page itself needs none.
    for path in ["/api/fleet", "/api/agents", "/api/agents/a/events", "/api/channels", "/api/audit", "/metrics"] {
        assert_eq!(call(&proxy, "GET", path, None, None).await, 401, "{path} without a token");
        assert_eq!(call(&proxy, "GET", path, None, Some(READER)).await, 200, "{path} with the read token");
        assert_eq!(call(&proxy, "GET", path, None, Some(ADMIN)).await, 200, "{path} with the admin token");
    }
    assert_eq!(call(&proxy, "GET", "/", None, None).await, 200);
    assert_eq!(call(&proxy, "GET", "/assets/app.js", None, None).await, 200);
    let who: Value = http_client()
        .get(format!("http://{}/api/whoami", proxy.admin))
        .bearer_auth(READER)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(who["can_act"], false);
}

// ---------------------------------------------------------------------------------------
// Metrics

async fn scrape(proxy: &Proxy) -> prometheus_parse::Scrape {
    let r = http_client().get(format!("http://{}/metrics", proxy.admin)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    assert!(text.trim_end().ends_with("# EOF"), "OpenMetrics exposition ends with # EOF");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("exposition parses");
    assert!(!scrape.samples.is_empty());
    scrape
}

/// The value of `metric` with these labels (0 when the series does not exist yet).
fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(b) => b.iter().map(|c| c.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_and_move_as_events_flow() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}\n{}", self_connecting_agent("m"), webhook_route("hook", "m", ""));
    let proxy = Proxy::start(&write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body));
    let before = eventually(Duration::from_secs(10), || async {
        let s = scrape(&proxy).await;
        (value(&s, "concierge_agents", &[("state", "asleep")]) == 1.0).then_some(s)
    })
    .await
    .expect("the first snapshot counts one asleep agent");
    let stored = [("channel", "webhook"), ("outcome", "stored")];
    assert_eq!(value(&before, "concierge_ingress_requests_total", &stored), 0.0);
    assert_eq!(value(&before, "concierge_build_info", &[]), 1.0);
    assert_eq!(value(&before, "concierge_connections", &[("channel", "webhook"), ("state", "listening")]), 1.0);

    for i in 0..3 {
        assert_eq!(proxy.post("m", "hook", &format!(r#"{{"n":{i}}}"#), Some(&format!("k{i}"))).await.0, 202);
    }
    let dup = proxy.post("m", "hook", r#"{"n":0}"#, Some("k0")).await;
    assert_eq!(dup.1["duplicate"], true, "a duplicate: {:?}", dup);
    let after = scrape(&proxy).await;
    assert_eq!(value(&after, "concierge_ingress_requests_total", &stored), 3.0);
    assert_eq!(
        value(&after, "concierge_ingress_requests_total", &[("channel", "webhook"), ("outcome", "duplicate")]),
        1.0
    );
    assert_eq!(value(&after, "concierge_ingress_durable_ack_seconds_count", &[("channel", "webhook")]), 4.0);
    assert!(value(&after, "concierge_store_command_duration_seconds_count", &[("op", "append")]) >= 4.0);
    // Buffered figures come from the periodic snapshot.
    let buffered = eventually(Duration::from_secs(15), || async {
        let s = scrape(&proxy).await;
        (value(&s, "concierge_buffered_events", &[]) == 3.0).then_some(s)
    })
    .await
    .expect("the snapshot reports 3 buffered events");
    assert_eq!(value(&buffered, "concierge_agent_buffered_events", &[("agent", "m")]), 3.0);
    assert!(value(&buffered, "concierge_buffered_bytes", &[]) > 0.0);
    assert!(value(&buffered, "concierge_buffered_oldest_event_timestamp_seconds", &[]) > 1.0e9);

    let mut client = proxy.connect("m").await;
    receive_n(&mut client, 3, Duration::from_secs(10)).await;
    let delivered = eventually(Duration::from_secs(15), || async {
        let s = scrape(&proxy).await;
        (value(&s, "concierge_buffered_events", &[]) == 0.0).then_some(s)
    })
    .await
    .expect("buffer drains in the snapshot");
    assert_eq!(value(&delivered, "concierge_events_delivered_total", &[]), 3.0);
    assert_eq!(value(&delivered, "concierge_events_redelivered_total", &[]), 0.0);
    assert_eq!(value(&delivered, "concierge_delivery_latency_seconds_count", &[]), 3.0);
    assert_eq!(value(&delivered, "concierge_agents", &[("state", "awake")]), 1.0);
    assert_eq!(
        value(&delivered, "concierge_agent_buffered_events", &[("agent", "m")]),
        0.0,
        "drained agents lose their series"
    );
}

/// A session writes each ack to the store once: the companion persists acks as they come,
/// and the flush when the session ends skips a cursor already written (it used to write it
/// again: one store script call more per session, a thousand in a wake storm).
#[tokio::test(flavor = "multi_thread")]
async fn a_session_writes_each_ack_to_the_store_once() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}\n{}", self_connecting_agent("m"), webhook_route("hook", "m", ""));
    let proxy = Proxy::start(&write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body));
    for i in 0..3 {
        assert_eq!(proxy.post("m", "hook", &format!(r#"{{"n":{i}}}"#), None).await.0, 202);
    }
    let mut client = proxy.connect("m").await;
    let events = receive_n_unacked(&mut client, 3, Duration::from_secs(10)).await;
    client.ack(events[2].offset);
    let persisted =
        eventually(Duration::from_secs(10), || async { (proxy.agent("m").await["cursor"] == 3).then_some(()) }).await;
    assert!(persisted.is_some(), "the ack never reached the store");
    client.close().await;
    let ended =
        eventually(Duration::from_secs(10), || async { (proxy.agent("m").await["connected"] == false).then_some(()) })
            .await;
    assert!(ended.is_some(), "the session never ended");
    let s = scrape(&proxy).await;
    assert_eq!(value(&s, "concierge_store_command_duration_seconds_count", &[("op", "ack")]), 1.0);
    assert_eq!(proxy.agent("m").await["cursor"], 3);
}

/// An awake agent's new events go from the webhook to its session in memory: the store is read
/// for none of them (each read is a store round trip on the event's way). What was stored
/// while no session was attached is read from the store, as before.
#[tokio::test(flavor = "multi_thread")]
async fn an_awake_agent_gets_new_events_without_a_store_read() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}\n{}", self_connecting_agent("f"), webhook_route("hook", "f", ""));
    let proxy = Proxy::start(&write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body));
    for i in 0..2 {
        assert_eq!(proxy.post("f", "hook", &format!(r#"{{"n":{i}}}"#), None).await.0, 202);
    }
    let mut client = proxy.connect("f").await;
    let backlog = receive_n(&mut client, 2, Duration::from_secs(10)).await;
    assert_eq!(backlog.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![1, 2]);
    let reads =
        || async { value(&scrape(&proxy).await, "concierge_store_command_duration_seconds_count", &[("op", "read")]) };
    let backlog_reads = reads().await;
    assert!(backlog_reads >= 1.0, "the backlog came from the store");
    for i in 2..12 {
        assert_eq!(proxy.post("f", "hook", &format!(r#"{{"n":{i}}}"#), None).await.0, 202);
        let got = receive_n(&mut client, 1, Duration::from_secs(10)).await;
        assert_eq!(got[0].offset, i + 1, "in order, none skipped");
        assert_eq!(got[0].data.raw, format!(r#"{{"n":{i}}}"#).into_bytes(), "the stored event itself");
    }
    assert_eq!(reads().await, backlog_reads, "ten live events, no store read");
    client.close().await;
}

// ---------------------------------------------------------------------------------------
// Delivery attempts, durable audit log, live store warnings

async fn get_json(proxy: &Proxy, path: &str) -> Value {
    let r = http_client().get(format!("http://{}{path}", proxy.admin)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "GET {path}");
    r.json().await.unwrap()
}

async fn post_json(proxy: &Proxy, path: &str) -> u16 {
    http_client().post(format!("http://{}{path}", proxy.admin)).send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn event_view_counts_each_delivery_of_an_event() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}\n{}", self_connecting_agent("a"), webhook_route("hook", "a", ""));
    let proxy = Proxy::start(&write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body));
    assert_eq!(proxy.post("a", "hook", r#"{"text":"once"}"#, None).await.0, 202);
    let detail = || get_json(&proxy, "/api/agents/a/events/1");
    assert_eq!(detail().await["delivery_attempts"], 0, "not delivered yet");

    // Delivered, then the agent goes away without acknowledging it.
    let mut first = proxy.connect("a").await;
    receive_n_unacked(&mut first, 1, Duration::from_secs(10)).await;
    assert_eq!(detail().await["delivery_attempts"], 1);
    drop(first);
    let gone =
        eventually(Duration::from_secs(15), || async { (proxy.agent("a").await["connected"] == false).then_some(()) });
    assert!(gone.await.is_some(), "the first session ended");

    // The next session delivers it again. Not acked either: an acked event is trimmed
    // (`retain_acked` = 0), and its detail would be gone.
    let mut second = proxy.connect("a").await;
    receive_n_unacked(&mut second, 1, Duration::from_secs(10)).await;
    let e = detail().await;
    assert_eq!(e["delivery_attempts"], 2, "{e}");
    assert_eq!(e["delivery_attempts_complete"], true);
    let deliveries = e["deliveries"].as_array().unwrap();
    assert_ne!(deliveries[0]["session"], deliveries[1]["session"], "two sessions delivered it: {e}");
    assert!(deliveries.iter().all(|d| d["at_ms"].as_u64().unwrap_or(0) > 1_600_000_000_000), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_log_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}\n{}", self_connecting_agent("a"), webhook_route("hook", "a", ""));
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body);
    let mut proxy = Proxy::start(&config);
    assert_eq!(post_json(&proxy, "/api/agents/a/pause").await, 200);
    assert_eq!(post_json(&proxy, "/api/agents/a/wake").await, 202);
    assert!(proxy.terminate().success());
    let proxy = Proxy::start(&config);
    let audit = get_json(&proxy, "/api/audit").await;
    let actions: Vec<&str> = audit["entries"].as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(actions, ["wake", "pause"], "entries from before the restart, newest first: {audit}");
    assert_eq!(audit["stored"], true);
    // New entries go after the stored ones.
    assert_eq!(post_json(&proxy, "/api/agents/a/resume").await, 200);
    let audit = get_json(&proxy, "/api/audit").await;
    assert_eq!(audit["entries"][0]["action"], "resume", "{audit}");
    assert_eq!(audit["entries"].as_array().unwrap().len(), 3, "{audit}");
}

fn redis_config_set(redis: &Redis, name: &str, value: &str) {
    let out = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "CONFIG", "SET", name, value])
        .output()
        .expect("redis-cli is installed");
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"), "CONFIG SET {name} {value}: {out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_warnings_follow_runtime_config_and_show_a_banner() {
    // Our own Redis (AOF on, fsync always): the shared one runs with AOF off.
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}\n{}", self_connecting_agent("w"), webhook_route("hook", "w", ""));
    let config = write_config(dir.path(), &Backend::Redis(redis.url()), [0, 0, 0], &body);
    let mut proxy = Proxy::start(&config);
    let warnings = |proxy: &Proxy| {
        let url = format!("http://{}/api/fleet", proxy.admin);
        async move {
            let v: Value = http_client().get(url).send().await.unwrap().json().await.unwrap();
            v["status"]["warnings"].as_array().cloned().unwrap_or_default()
        }
    };
    let first = eventually(Duration::from_secs(15), || async {
        let s: Value = get_json(&proxy, "/api/fleet").await;
        (s["status"]["stats_at_ms"].as_u64() > Some(0)).then_some(())
    })
    .await;
    assert!(first.is_some(), "a first snapshot");
    assert_eq!(warnings(&proxy).await, Vec::<Value>::new(), "AOF on, fsync always, noeviction: no warning");

    // Turned off at run time: the warning appears without a restart, in the API and the page.
    redis_config_set(&redis, "appendonly", "no");
    let appeared = eventually(Duration::from_secs(20), || async {
        let w = warnings(&proxy).await;
        w.iter().any(|w| w.as_str().is_some_and(|t| t.contains("appendonly"))).then_some(w)
    })
    .await;
    assert!(appeared.is_some(), "the AOF warning appears after CONFIG SET; log:\n{}", proxy.log());
    let mut browser = Browser::launch().await;
    browser.goto(&format!("http://{}/", proxy.admin)).await;
    let banner = "!document.querySelector('#banner').hidden && \
                  document.querySelector('#banner').getBoundingClientRect().height > 0 && \
                  document.querySelector('#banner').textContent.includes('appendonly')";
    let shown = browser.wait_for(banner, Duration::from_secs(15)).await;
    browser.screenshot("dashboard-warning.png").await;
    assert!(shown, "a visible banner names the setting: {}", browser.eval("document.body.innerText").await);

    // Fixed at run time: the warning and the banner go away.
    redis_config_set(&redis, "appendonly", "yes");
    let cleared = eventually(Duration::from_secs(20), || async { warnings(&proxy).await.is_empty().then_some(()) });
    assert!(cleared.await.is_some(), "the warning clears after CONFIG SET appendonly yes");
    assert!(browser.wait_for("document.querySelector('#banner').hidden", Duration::from_secs(15)).await);

    // The audit log is kept in Redis too.
    assert_eq!(post_json(&proxy, "/api/agents/w/wake").await, 202);
    assert!(proxy.terminate().success());
    let proxy = Proxy::start(&config);
    let audit = get_json(&proxy, "/api/audit").await;
    assert_eq!(audit["entries"][0]["action"], "wake", "{audit}");
    assert_eq!(audit["entries"][0]["agent"], "w", "{audit}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_cap_agent_labels_and_count_refused_webhooks() {
    let dir = tempfile::tempdir().unwrap();
    let signed = "verify = \"hmac\"\nsecret = \"s3cret-s3cret-s3cret\"\nhmac_header = \"x-signature\"";
    let body = format!(
        "{}\n{}\n{}\n{}\n{}",
        self_connecting_agent("big"),
        self_connecting_agent("small"),
        webhook_route("signed", "big", signed),
        webhook_route("bighook", "big", "max_body = 1024"),
        webhook_route("smallhook", "small", ""),
    );
    let config = write_config_with(dir.path(), &Backend::Embedded, [0, 0, 0], "metrics_agent_labels = 1", &body);
    let proxy = Proxy::start(&config);
    let client = http_client();
    // Refused before the store: a bad signature (401) and a body over max_body (413).
    let bad = proxy.post_with(&client, "big", "signed", r#"{"n":1}"#, &[("x-signature", "sha256=00")]).await;
    assert_eq!(bad.status, 401, "{bad:?}");
    let large = proxy.post_with(&client, "big", "bighook", vec![b'x'; 4096], &[]).await;
    assert_eq!(large.status, 413, "{large:?}");
    for i in 0..2 {
        assert_eq!(proxy.post("small", "smallhook", &format!(r#"{{"n":{i}}}"#), None).await.0, 202);
    }
    let s = scrape(&proxy).await;
    let refused =
        |outcome: &str| value(&s, "concierge_ingress_requests_total", &[("channel", "webhook"), ("outcome", outcome)]);
    assert_eq!((refused("unauthorized"), refused("too_large"), refused("stored")), (1.0, 1.0, 2.0));

    // Only the agent with the most buffered events gets per-agent series (cap 1): "small"
    // (2 events) while "big" has none, then "big" once it has more.
    let series = |s: &prometheus_parse::Scrape| -> Vec<String> {
        s.samples
            .iter()
            .filter(|x| x.metric == "concierge_agent_buffered_events")
            .filter_map(|x| x.labels.get("agent").map(str::to_string))
            .collect()
    };
    let one = eventually(Duration::from_secs(15), || async {
        let s = scrape(&proxy).await;
        (value(&s, "concierge_buffered_events", &[]) == 2.0).then_some(s)
    })
    .await
    .expect("2 buffered events in the snapshot");
    assert_eq!(series(&one), ["small"]);
    for i in 0..3 {
        assert_eq!(proxy.post("big", "bighook", &format!(r#"{{"n":{i}}}"#), None).await.0, 202);
    }
    let both = eventually(Duration::from_secs(15), || async {
        let s = scrape(&proxy).await;
        (value(&s, "concierge_buffered_events", &[]) == 5.0).then_some(s)
    })
    .await
    .expect("5 buffered events in the snapshot");
    assert_eq!(series(&both), ["big"], "one series at cap 1, for the agent with the most");
    assert!(value(&both, "concierge_buffered_bytes", &[]) > 0.0, "fleet totals are always exported");
}

#[tokio::test(flavor = "multi_thread")]
async fn selected_and_filtered_events_are_dropped_and_never_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{}\n{}\n{}",
        self_connecting_agent("d"),
        webhook_route("xhook", "d", ""),
        webhook_route("yhook", "d", "")
    );
    let proxy = Proxy::start(&write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body));
    // Offsets 1-3 through xhook, 4-5 through yhook, 6 through xhook.
    for (route, n) in [("xhook", 1), ("xhook", 2), ("xhook", 3), ("yhook", 4), ("yhook", 5), ("xhook", 6)] {
        assert_eq!(proxy.post("d", route, &format!(r#"{{"n":{n}}}"#), None).await.0, 202);
    }
    let drop = |body: Value| {
        let url = format!("http://{}/api/agents/d/drop", proxy.admin);
        async move {
            let r = http_client().post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200, "{body}");
            r.json::<Value>().await.unwrap()
        }
    };
    // A filter preview counts the matches and drops nothing.
    let preview = drop(json!({ "filter": { "channel": "yhook" }, "preview": true })).await;
    assert_eq!((preview["would_drop"].as_u64(), preview["complete"].as_bool()), (Some(2), Some(true)), "{preview}");
    assert_eq!(preview["offsets"], json!([4, 5]));
    let detail = |proxy: &Proxy| {
        let url = format!("http://{}/api/agents/d", proxy.admin);
        async move { http_client().get(url).send().await.unwrap().json::<Value>().await.unwrap() }
    };
    assert_eq!(detail(&proxy).await["pending"], 6);
    // Bounded: one request names at most 10,000 offsets, and a larger one drops nothing.
    let too_many: Vec<u64> = (1..=10_001).collect();
    let url = format!("http://{}/api/agents/d/drop", proxy.admin);
    let r = http_client().post(url).json(&json!({ "offsets": too_many })).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(detail(&proxy).await["pending"], 6);
    assert_eq!(drop(json!({ "filter": { "channel": "yhook" } })).await["dropped"], 2);
    assert_eq!(drop(json!({ "offsets": [2, 99] })).await["dropped"], 1, "unknown offsets are ignored");
    assert_eq!(detail(&proxy).await["pending"], 3, "stats shrink");
    let audit = get_json(&proxy, "/api/audit").await;
    let details: Vec<&str> = audit["entries"].as_array().unwrap().iter().filter_map(|e| e["detail"].as_str()).collect();
    assert_eq!(details, ["offsets 2 (1 events)", "filter: channel contains \"yhook\" (2 events)"], "{audit}");

    // The dashboard: tick event 3, drop it with confirmation.
    let mut browser = Browser::launch().await;
    browser.goto(&format!("http://{}/#/agent/d", proxy.admin)).await;
    let rows = "[...document.querySelectorAll('#events-table tbody tr')].map((r) => r.dataset.offset).join(',')";
    assert!(
        browser.wait_for(&format!("{rows} === '1,3,6'"), Duration::from_secs(10)).await,
        "dropped events are gone from the list: {}",
        browser.eval(rows).await
    );
    browser.eval("document.querySelector('#events-table tr[data-offset=\"3\"] .ev-select').click()").await;
    browser.eval("document.querySelector('#drop-selected').click()").await;
    assert!(browser.wait_for("document.querySelector('#confirm').open", Duration::from_secs(5)).await);
    assert!(
        browser
            .eval(&text_of("#confirm-text"))
            .await
            .as_str()
            .unwrap()
            .starts_with("Drop 1 pending event(s) of d at offset(s) 3")
    );
    browser.eval("document.querySelector('#confirm-ok').click()").await;
    assert!(
        browser.wait_for(&format!("{rows} === '1,6'"), Duration::from_secs(10)).await,
        "the list reloads without event 3: {}",
        browser.eval("document.body.innerText").await
    );

    // The agent receives only what was not dropped.
    let mut client = proxy.connect("d").await;
    let got: Vec<u64> = receive_n(&mut client, 2, Duration::from_secs(10)).await.iter().map(|e| e.offset).collect();
    assert_eq!(got, [1, 6]);
    expect_no_more(&mut client, Duration::from_millis(500)).await;
}
