//! Shared harness for the proxy's integration tests: real processes, real sockets, real Redis.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concierge_adapters::{EventSink, Ingested, SinkError};
use concierge_protocol::EventData;
use concierge_protocol::client::{AgentClient, ClientOptions};
use concierge_protocol::tls::Trust;
use concierge_store::{Appended, SqliteStore, Store, StoreOptions};
use serde_json::Value;

pub const TOKEN: &str = "test-token-0123456789";

/// A port free for both TCP and UDP right now.
pub fn free_port() -> u16 {
    for _ in 0..50 {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port found");
}

/// Which store a test runs against.
#[derive(Clone, Debug)]
pub enum Backend {
    Embedded,
    Redis(String),
}

/// Writes a config file: `body` is appended after a `[server]` and `[store]` preamble.
pub fn write_config(dir: &Path, backend: &Backend, ports: [u16; 3], body: &str) -> PathBuf {
    write_config_with(dir, backend, ports, "", body)
}

/// Like [`write_config`], with `server_extra` lines added to the `[server]` table
/// (e.g. `max_frame = 65536` or `admin_token = "..."`).
pub fn write_config_with(dir: &Path, backend: &Backend, ports: [u16; 3], server_extra: &str, body: &str) -> PathBuf {
    let store = match backend {
        Backend::Embedded => format!("backend = \"embedded\"\npath = \"{}\"", dir.join("store.db").display()),
        Backend::Redis(url) => format!("backend = \"redis\"\nurl = \"{url}\""),
    };
    let text = format!(
        "[server]\nquic_listen = \"127.0.0.1:{}\"\nhttp_listen = \"127.0.0.1:{}\"\nadmin_listen = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\nshutdown_grace = \"2s\"\n{server_extra}\n\n[store]\n{store}\n\n{body}",
        ports[0],
        ports[1],
        ports[2],
        dir.join("data").display()
    );
    let path = dir.join("concierge.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A `concierge serve` child process and the addresses it printed.
pub struct Proxy {
    pub child: Child,
    pub quic: String,
    pub http: String,
    pub admin: String,
    pub cert_sha256: String,
    pub log: Arc<Mutex<String>>,
}

impl Proxy {
    pub fn start(config: &Path) -> Proxy {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Proxy {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_concierge"));
        cmd.args(["serve", "--config"]).arg(config).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.env("RUST_LOG", "info,quinn=warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn concierge");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        let ready = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(v) => v,
            Err(_) => {
                let _ = child.kill();
                panic!("concierge did not become ready; log:\n{}", log.lock().unwrap());
            }
        };
        Proxy {
            child,
            quic: ready["quic"].as_str().unwrap().to_string(),
            http: ready["http"].as_str().unwrap().to_string(),
            admin: ready["admin"].as_str().unwrap().to_string(),
            cert_sha256: ready["cert_sha256"].as_str().unwrap().to_string(),
            log,
        }
    }

    pub fn kill9(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "concierge did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn client_options(&self, agent: &str, token: &str) -> ClientOptions {
        let mut o = ClientOptions::new(self.quic.clone(), agent, token, Trust::Pinned(self.cert_sha256.clone()));
        o.reconnect_attempts = 3;
        o
    }

    pub async fn connect(&self, agent: &str) -> AgentClient {
        AgentClient::connect(self.client_options(agent, TOKEN)).await.expect("agent connects")
    }

    pub async fn agents(&self) -> Value {
        let r = reqwest::get(format!("http://{}/api/agents", self.admin)).await.unwrap();
        r.json().await.unwrap()
    }

    pub async fn agent(&self, id: &str) -> Value {
        let all = self.agents().await;
        all["agents"].as_array().unwrap().iter().find(|a| a["id"] == id).cloned().expect("agent listed")
    }

    /// POSTs an unsigned webhook; returns (status, json).
    pub async fn post(&self, agent: &str, route: &str, body: &str, id: Option<&str>) -> (u16, Value) {
        let mut req = reqwest::Client::new()
            .post(format!("http://{}/hooks/{agent}/{route}", self.http))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(id) = id {
            req = req.header("Idempotency-Key", id);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `redis-server` of the test's own, with AOF fsync always, on a free port.
pub struct Redis {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Redis { port: free_port(), dir, child: None };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", "always", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing is answered.
    pub fn pause(&self) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as i32, libc::SIGSTOP) };
        }
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// An HTTP server that records every request body (stands in for a reply target).
pub struct Sink {
    pub url: String,
    pub received: Arc<Mutex<Vec<(axum::http::HeaderMap, String)>>>,
}

impl Sink {
    pub async fn start() -> Sink {
        let received: Arc<Mutex<Vec<(axum::http::HeaderMap, String)>>> = Arc::default();
        let store = received.clone();
        let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap, body: String| {
            let store = store.clone();
            async move {
                store.lock().unwrap().push((headers, body));
                "ok"
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/replies", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Sink { url, received }
    }

    pub fn bodies(&self) -> Vec<Value> {
        self.received.lock().unwrap().iter().map(|(_, b)| serde_json::from_str(b).unwrap()).collect()
    }

    /// Waits until `n` requests arrived (bounded).
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.bodies();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Polls `f` until it returns Some, for at most `within`.
pub async fn eventually<T, F, Fut>(within: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// An agent section with a token and optional extra wake settings.
pub fn agent_section(id: &str, wake: &str) -> String {
    format!("[agents.{id}]\ntoken = \"{TOKEN}\"\n[agents.{id}.wake]\n{wake}\n")
}

/// The exec wake settings that start the built-in echo agent.
pub fn echo_wake(extra: &str) -> String {
    format!(
        "driver = \"exec\"\ncommand = [\"{}\", \"agent\", \"echo\"]\nenv = {{ CONCIERGE_TOKEN = \"{TOKEN}\" }}\nsettle = \"200ms\"\nconnect_timeout = \"10s\"\n{extra}",
        env!("CARGO_BIN_EXE_concierge")
    )
}

/// An agent the test connects itself: no wake driver, never woken.
pub fn self_connecting_agent(id: &str) -> String {
    agent_section(id, "driver = \"none\"\npolicy = \"never\"")
}

/// A `[webhooks.<name>]` route of `agent`; `extra` adds lines (verify, reply_url, max_body...).
/// Without a `verify` line in `extra`, the route is unverified.
pub fn webhook_route(name: &str, agent: &str, extra: &str) -> String {
    let verify = if extra.contains("verify") { "" } else { "verify = \"none\"\n" };
    format!("[webhooks.{name}]\nagent = \"{agent}\"\n{verify}{extra}\n")
}

/// The three fixed ports of a proxy that must come back on the same addresses after a restart.
pub fn fixed_ports() -> [u16; 3] {
    let mut ports = [0u16; 3];
    for i in 0..3 {
        loop {
            let p = free_port();
            if !ports[..i].contains(&p) {
                ports[i] = p;
                break;
            }
        }
    }
    ports
}

/// A webhook response: status, headers and JSON body (Null when not JSON).
#[derive(Debug)]
pub struct HookResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub json: Value,
}

/// A reusable HTTP client whose every request is bounded in time.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).connect_timeout(Duration::from_secs(5)).build().unwrap()
}

impl Proxy {
    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// POSTs `body` with extra headers through `client`; bounded by the client's timeout.
    pub async fn post_with(
        &self,
        client: &reqwest::Client,
        agent: &str,
        route: &str,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> HookResponse {
        let mut req = client
            .post(format!("http://{}/hooks/{agent}/{route}", self.http))
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await.unwrap_or_else(|e| panic!("POST /hooks/{agent}/{route} failed: {e}"));
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let json = r.json().await.unwrap_or(Value::Null);
        HookResponse { status, headers, json }
    }

    /// The admin API's stored events of an agent (no admin token).
    pub async fn events(&self, agent: &str) -> Vec<Value> {
        let r = http_client()
            .get(format!("http://{}/api/agents/{agent}/events?limit=1000", self.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "admin events of {agent}");
        let v: Value = r.json().await.unwrap();
        v["events"].as_array().cloned().unwrap_or_default()
    }

    /// GET on the admin listener; returns the status.
    pub async fn admin_status(&self, path: &str, bearer: Option<&str>) -> u16 {
        let mut req = http_client().get(format!("http://{}{path}", self.admin));
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap().status().as_u16()
    }

    /// Waits until the admin API reports `agent`'s cursor at `offset` (bounded).
    pub async fn wait_cursor(&self, agent: &str, offset: u64, within: Duration) {
        let ok = eventually(within, || async { (self.agent(agent).await["cursor"] == offset).then_some(()) }).await;
        assert!(ok.is_some(), "cursor of {agent} never reached {offset}; log:\n{}", self.log());
    }
}

/// Receives exactly `n` events within `within` (acking each one), failing on a session end.
pub async fn receive_n(client: &mut AgentClient, n: usize, within: Duration) -> Vec<concierge_protocol::Event> {
    receive(client, n, within, true).await
}

/// Like [`receive_n`] without acking anything.
pub async fn receive_n_unacked(client: &mut AgentClient, n: usize, within: Duration) -> Vec<concierge_protocol::Event> {
    receive(client, n, within, false).await
}

async fn receive(client: &mut AgentClient, n: usize, within: Duration, ack: bool) -> Vec<concierge_protocol::Event> {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match tokio::time::timeout_at(deadline, client.next()).await {
            Err(_) => panic!("only {} of {n} events arrived within {within:?}", got.len()),
            Ok(Err(e)) => panic!("session failed after {} of {n} events: {e}", got.len()),
            Ok(Ok(None)) => panic!("session ended after {} of {n} events", got.len()),
            Ok(Ok(Some(e))) => {
                if ack {
                    client.ack(e.offset);
                }
                got.push(e);
            }
        }
    }
    got
}

/// Asserts that no further event arrives for `quiet`.
pub async fn expect_no_more(client: &mut AgentClient, quiet: Duration) {
    if let Ok(Ok(Some(e))) = tokio::time::timeout(quiet, client.next()).await {
        panic!("unexpected extra event at offset {}: {:?}", e.offset, String::from_utf8_lossy(&e.data.raw));
    }
}

/// A fault injector in front of a real SQLite store: while `failing`, every write after the
/// first `ok_writes` fails as if the store had gone away.
pub struct FailingStore {
    pub store: SqliteStore,
    pub ok_writes: usize,
    pub writes: AtomicUsize,
    pub duplicates: AtomicUsize,
    pub failing: AtomicBool,
}

impl FailingStore {
    pub fn open(dir: &std::path::Path, ok_writes: usize) -> Arc<FailingStore> {
        let store = SqliteStore::open(&dir.join("store.db"), StoreOptions::default()).unwrap();
        let (writes, duplicates, failing) = (AtomicUsize::new(0), AtomicUsize::new(0), AtomicBool::new(true));
        Arc::new(FailingStore { store, ok_writes, writes, duplicates, failing })
    }

    pub async fn stored(&self, agent: &str) -> Vec<EventData> {
        self.store.read(agent, 0, 1000).await.unwrap().into_iter().map(|e| e.data).collect()
    }
}

#[async_trait::async_trait]
impl EventSink for FailingStore {
    async fn ingest(&self, event: EventData) -> Result<Ingested, SinkError> {
        if self.failing.load(Ordering::SeqCst) && self.writes.load(Ordering::SeqCst) >= self.ok_writes {
            return Err(SinkError::Unavailable(format!("injected: the store fails after {} writes", self.ok_writes)));
        }
        let appended = self.store.append(&event).await.map_err(|e| SinkError::Unavailable(e.to_string()))?;
        self.writes.fetch_add(1, Ordering::SeqCst);
        match appended {
            Appended::Stored(offset) => Ok(Ingested { offset, duplicate: false }),
            Appended::Duplicate(offset) => {
                self.duplicates.fetch_add(1, Ordering::SeqCst);
                Ok(Ingested { offset, duplicate: true })
            }
        }
    }
}

/// A raw agent session of agent `a` that has sent Hello and read nothing yet: for the cases
/// the SDK hides (close reasons, acks it would never send).
pub async fn raw_hello(
    proxy: &Proxy,
    window: u32,
) -> (quinn::Endpoint, quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    use concierge_protocol::tls::client_config;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(Trust::Pinned(proxy.cert_sha256.clone())).unwrap());
    let conn = endpoint.connect(proxy.quic.parse().unwrap(), "localhost").unwrap().await.unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let hello = concierge_protocol::ToProxy::Hello {
        version: 1,
        agent: "a".into(),
        token: TOKEN.into(),
        client: "raw".into(),
        window,
    };
    concierge_protocol::io::write_frame(&mut send, &hello).await.unwrap();
    (endpoint, conn, send, recv)
}
