//! Loading, validation messages, secrecy and environment overrides of the configuration.
//!
//! Tests that set environment variables or call `load` (which reads `CONCIERGE_*`) run inside
//! `figment::Jail`, which serializes them and restores the environment and the current
//! directory. Tests outside a jail use absolute paths and variable names nobody sets.

// `Jail::expect_with` closures must return `figment::Result<()>`, whose error is large.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;
use common::*;

use concierge_config::{DriverConfig, EXAMPLE, Secret, StoreBackend, Verify, WakePolicy, load, load_str};
use figment::Jail;

const AGENT: &str = "[agents.echo]\ntoken = \"t0ken\"\n";

fn jail_err(e: impl std::fmt::Display) -> figment::Error {
    figment::Error::from(e.to_string())
}

// ---- the example ---------------------------------------------------------------------

#[test]
fn example_loads_from_file_with_env() {
    Jail::expect_with(|jail| {
        jail.create_file("concierge.toml", EXAMPLE)?;
        let path = jail.directory().join("concierge.toml");
        let c = load(&path).map_err(jail_err)?;
        let dir = jail.directory();

        assert_eq!(c.source, path);
        assert_eq!(c.server.quic_listen, "127.0.0.1:4433".parse::<SocketAddr>().unwrap());
        assert_eq!(c.server.http_listen, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(c.server.admin_listen, "127.0.0.1:9090".parse::<SocketAddr>().unwrap());
        assert!(c.server.admin_token.is_none());
        assert_eq!(c.server.public_addr, "127.0.0.1:4433");
        assert_eq!(c.server.server_name, "localhost");
        assert_eq!(c.server.data_dir, dir.join("concierge-data"));
        assert_eq!(c.server.max_frame, 8 * 1024 * 1024);
        assert_eq!(c.server.max_body, 1024 * 1024);
        assert_eq!(c.server.shutdown_grace, Duration::from_secs(10));
        assert!(c.tls.is_none());
        match &c.store.backend {
            StoreBackend::Embedded { path } => {
                assert_eq!(path, &dir.join("concierge-data").join("store.db"))
            }
            other => panic!("unexpected backend {other:?}"),
        }
        assert_eq!(c.store.dedupe_ttl, Duration::from_secs(7 * 86400));
        assert_eq!(c.store.send_ttl, Duration::from_secs(86400));
        assert_eq!(c.store.retain_acked, 0);

        let echo = &c.agents["echo"];
        assert_eq!(echo.id, "echo");
        assert!(echo.token_matches("quickstart-echo-token"));
        assert!(!echo.token_matches("quickstart-echo-tokem"));
        assert!(!echo.token_matches(""));
        assert_eq!(echo.window, 1024);
        assert_eq!(echo.max_pending, 100_000);
        assert_eq!(echo.wake.policy, WakePolicy::Immediate);
        assert_eq!(echo.wake.sleep_after, Some(Duration::from_secs(30)));
        assert_eq!(echo.wake.connect_timeout, Duration::from_secs(30));
        assert_eq!(echo.wake.max_attempts, 5);
        assert_eq!(echo.wake.backoff_initial, Duration::from_millis(500));
        assert_eq!(echo.wake.backoff_max, Duration::from_secs(30));
        assert_eq!(echo.wake.unreachable_retry, Duration::from_secs(300));
        match &echo.wake.driver {
            DriverConfig::Exec { command, env, settle, stop_command } => {
                assert_eq!(command, &["concierge", "agent", "echo"]);
                assert_eq!(env.keys().collect::<Vec<_>>(), ["CONCIERGE_TOKEN"]);
                assert_eq!(*settle, Duration::from_secs(2));
                assert!(stop_command.is_none());
            }
            other => panic!("unexpected driver {other:?}"),
        }

        let demo = &c.webhooks["demo"];
        assert_eq!(demo.route, "demo");
        assert_eq!(demo.agent, "echo");
        assert!(matches!(demo.verify, Verify::None));
        assert_eq!(demo.max_body, 1024 * 1024);
        assert_eq!(demo.reply_url.as_deref(), Some("http://127.0.0.1:8099/replies"));
        assert!(demo.reply_secret.is_none());

        // The token never shows up in Debug output.
        assert!(!format!("{c:?}").contains("quickstart-echo-token"));
        Ok(())
    });
}

// ---- defaults and the full schema -------------------------------------------------------

#[test]
fn empty_config_gets_defaults() {
    let c = ok("");
    assert_eq!(c.server.quic_listen, "127.0.0.1:4433".parse::<SocketAddr>().unwrap());
    assert_eq!(c.server.public_addr, "127.0.0.1:4433");
    assert!(c.server.data_dir.is_absolute());
    assert!(c.server.data_dir.ends_with("concierge-data"));
    assert!(c.agents.is_empty() && c.webhooks.is_empty());
    assert_eq!(c.source, PathBuf::from("test.toml"));
}

#[test]
fn every_key_of_the_schema_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("cert.pem"), "cert").unwrap();
    std::fs::write(d.join("key.pem"), "key").unwrap();
    std::fs::write(d.join("fly.token"), "fly-secret\n").unwrap();
    let toml = format!(
        r#"
[server]
quic_listen = "0.0.0.0:5433"
http_listen = "[::1]:8081"
admin_listen = "0.0.0.0:9091"
admin_token = "admin-secret"
public_addr = "agents.example.com:443"
server_name = "agents.example.com"
data_dir = "{d}/data"
max_frame = 65536
max_body = "64KiB"
shutdown_grace = "3s"

[tls]
cert = "{d}/cert.pem"
key = "{d}/key.pem"

[store]
backend = "redis"
url = "redis://:pw@127.0.0.1:6379/0"
dedupe_ttl = "1h"
retain_acked = 10
send_ttl = "2h"

[agents.exec-agent]
token_sha256 = "{sha}"
window = 16
max_pending = 50
[agents.exec-agent.wake]
driver = "exec"
policy = "coalesce(30s)"
connect_timeout = "5s"
max_attempts = 2
backoff_initial = "100ms"
backoff_max = "1s"
unreachable_retry = "1m"
sleep_after = "10m"
command = ["docker", "start", "agent"]
env = {{ A = "1", B = 2 }}
settle = "0s"
stop_command = ["docker", "stop", "agent"]

[agents.http_agent]
token = "http-token"
[agents.http_agent.wake]
driver = "http"
policy = "never"
url = "https://wake.example.com/hook"
secret = "http-secret"
timeout = "4s"

[agents.FLY]
token = "fly-agent-token"
[agents.FLY.wake]
driver = "fly"
api_base = "http://127.0.0.1:4280"
app = "my-app"
machine = "abc123"
api_token_file = "{d}/fly.token"
wait_timeout = "20s"

[webhooks.std]
agent = "exec-agent"
verify = "standard"
secret = "whsec_a whsec_b"
max_body = "2MB"

[webhooks.gh]
agent = "http_agent"
verify = "hmac"
secret = "hmac-secret"
hmac_header = "X-Hub-Signature-256"
reply_url = "https://reply.example.com/"
reply_secret = "reply-secret"
"#,
        d = d.display(),
        sha = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08" // sha256("test")
    );
    let c = ok(&toml);
    assert_eq!(c.server.admin_token.as_ref().map(Secret::expose), Some("admin-secret"));
    assert_eq!(c.server.public_addr, "agents.example.com:443");
    assert_eq!(c.server.data_dir, d.join("data"));
    assert_eq!(c.server.max_frame, 65536);
    assert_eq!(c.server.max_body, 65536);
    let tls = c.tls.as_ref().unwrap();
    assert_eq!(tls.cert, d.join("cert.pem"));
    assert_eq!(tls.key, d.join("key.pem"));
    match &c.store.backend {
        StoreBackend::Redis { url } => assert_eq!(url.expose(), "redis://:pw@127.0.0.1:6379/0"),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.store.retain_acked, 10);

    let e = &c.agents["exec-agent"];
    assert!(e.token_matches("test"));
    assert_eq!((e.window, e.max_pending), (16, 50));
    assert_eq!(e.wake.policy, WakePolicy::Coalesce(Duration::from_secs(30)));
    assert_eq!(e.wake.max_attempts, 2);
    assert_eq!(e.wake.sleep_after, Some(Duration::from_secs(600)));
    match &e.wake.driver {
        DriverConfig::Exec { command, env, settle, stop_command } => {
            assert_eq!(command, &["docker", "start", "agent"]);
            assert_eq!(env.get("A").map(String::as_str), Some("1"));
            assert_eq!(env.get("B").map(String::as_str), Some("2"));
            assert_eq!(*settle, Duration::ZERO);
            assert_eq!(stop_command.as_deref(), Some(&["docker".to_string(), "stop".into(), "agent".into()][..]));
        }
        other => panic!("{other:?}"),
    }
    match &c.agents["http_agent"].wake.driver {
        DriverConfig::Http { url, secret, timeout } => {
            assert_eq!(url, "https://wake.example.com/hook");
            assert_eq!(secret.as_ref().map(Secret::expose), Some("http-secret"));
            assert_eq!(*timeout, Duration::from_secs(4));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.agents["http_agent"].wake.policy, WakePolicy::Never);
    match &c.agents["FLY"].wake.driver {
        DriverConfig::Fly { api_base, app, machine, api_token, wait_timeout } => {
            assert_eq!(api_base, "http://127.0.0.1:4280");
            assert_eq!((app.as_str(), machine.as_str()), ("my-app", "abc123"));
            assert_eq!(api_token.expose(), "fly-secret");
            assert_eq!(*wait_timeout, Duration::from_secs(20));
        }
        other => panic!("{other:?}"),
    }
    match &c.webhooks["std"].verify {
        Verify::Standard { secret } => assert_eq!(secret.expose(), "whsec_a whsec_b"),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.webhooks["std"].max_body, 2_000_000);
    let gh = &c.webhooks["gh"];
    match &gh.verify {
        Verify::Hmac { header, secret } => {
            assert_eq!(header, "x-hub-signature-256");
            assert_eq!(secret.expose(), "hmac-secret");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(gh.max_body, 65536, "defaults to server.max_body");
    assert_eq!(gh.reply_secret.as_ref().map(Secret::expose), Some("reply-secret"));

    let debug = format!("{c:?}");
    for secret in [
        "admin-secret",
        ":pw@",
        "http-token",
        "http-secret",
        "fly-secret",
        "fly-agent-token",
        "whsec_a",
        "hmac-secret",
        "reply-secret",
        "9f86d081",
    ] {
        assert!(!debug.contains(secret), "{secret} appears in Debug output:\n{debug}");
    }
    assert!(debug.contains("[redacted]"));
}

// ---- one test per error kind ---------------------------------------------------------------

#[test]
fn unknown_keys_name_the_allowed_keys() {
    let e = errs(&format!(
        "[server]\nhttp_listn = \"127.0.0.1:1\"\n[servers]\n{AGENT}[agents.echo.wake]\nsleep_aftr = \"1m\"\n"
    ));
    assert_line(
        &e,
        &[
            "test.toml: server.http_listn: unknown key (did you mean `http_listen`?); allowed keys:",
            "quic_listen",
            "shutdown_grace",
        ],
    );
    assert_line(&e, &["test.toml: servers: unknown key", "server, tls, store, agents, webhooks"]);
    assert_line(&e, &["test.toml: agents.echo.wake.sleep_aftr: unknown key", "sleep_after"]);
}

#[test]
fn bad_duration_names_the_key() {
    let e = errs(&format!("{AGENT}[agents.echo.wake]\nsleep_after = \"5 minutez\"\n"));
    assert_line(&e, &["test.toml: agents.echo.wake.sleep_after: invalid duration \"5 minutez\"", "minutez"]);
    let e = errs("[store]\ndedupe_ttl = 30\n");
    assert_line(&e, &["test.toml: store.dedupe_ttl: invalid duration \"30\""]);
    let e = errs(&format!("{AGENT}[agents.echo.wake]\nconnect_timeout = \"0s\"\n"));
    assert_line(&e, &["agents.echo.wake.connect_timeout: must be greater than zero"]);
}

#[test]
fn webhook_naming_an_unknown_agent() {
    let e = errs(&format!("{AGENT}[webhooks.demo]\nagent = \"ecko\"\n"));
    assert_line(&e, &["test.toml: webhooks.demo.agent: unknown agent \"ecko\"", "configured agents: echo"]);
    let e = errs("[webhooks.demo]\n");
    assert_line(&e, &["test.toml: webhooks.demo.agent: required"]);
}

#[test]
fn missing_env_var_referenced_by_env_key() {
    let e = errs(
        "[agents.echo]\ntoken_env = \"CONCIERGE_TEST_NEVER_SET_7F3A\"\n[server]\nadmin_listen = \"0.0.0.0:9090\"\nadmin_token_env = \"CONCIERGE_TEST_NEVER_SET_8B1C\"\n",
    );
    assert_line(
        &e,
        &["test.toml: agents.echo.token_env: environment variable CONCIERGE_TEST_NEVER_SET_7F3A is not set"],
    );
    assert_line(
        &e,
        &["test.toml: server.admin_token_env: environment variable CONCIERGE_TEST_NEVER_SET_8B1C is not set"],
    );
}

#[test]
fn unreadable_secret_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.token");
    let e = errs(&format!("[agents.echo]\ntoken_file = \"{}\"\n", missing.display()));
    assert_line(&e, &["test.toml: agents.echo.token_file: cannot read", &missing.display().to_string()]);
    // A directory is not a secret file either, and an empty file is refused.
    std::fs::write(dir.path().join("empty"), "\n").unwrap();
    let e = errs(&format!(
        "[agents.a]\ntoken_file = \"{d}\"\n[agents.b]\ntoken_file = \"{d}/empty\"\n",
        d = dir.path().display()
    ));
    assert_line(&e, &["agents.a.token_file: cannot read"]);
    assert_line(&e, &["agents.b.token_file:", "is empty"]);
}

#[test]
fn bad_socket_address() {
    let e = errs("[server]\nquic_listen = \"localhost:4433\"\nhttp_listen = \"127.0.0.1\"\n");
    assert_line(&e, &["test.toml: server.quic_listen: invalid socket address \"localhost:4433\""]);
    assert_line(&e, &["test.toml: server.http_listen: invalid socket address \"127.0.0.1\""]);
    let e = errs("[server]\npublic_addr = \"no-port\"\n");
    assert_line(&e, &["test.toml: server.public_addr: invalid address \"no-port\""]);
}

#[test]
fn bad_policy() {
    let e = errs(&format!("{AGENT}[agents.echo.wake]\npolicy = \"sometimes\"\n"));
    assert_line(&e, &["test.toml: agents.echo.wake.policy: invalid policy \"sometimes\"", "coalesce(<duration>)"]);
    let e = errs(&format!("{AGENT}[agents.echo.wake]\npolicy = \"coalesce(3 fortnights)\"\n"));
    assert_line(&e, &["agents.echo.wake.policy:", "invalid duration"]);
}

#[test]
fn two_sources_for_one_secret_name_both_keys() {
    let e = errs("[agents.echo]\ntoken = \"abc\"\ntoken_env = \"X\"\n");
    assert_line(&e, &["test.toml: agents.echo.token_env: conflicts with `agents.echo.token`", "exactly one"]);
    let e = errs(&format!("[agents.echo]\ntoken = \"abc\"\ntoken_sha256 = \"{}\"\n", "00".repeat(32)));
    assert_line(&e, &["agents.echo.token_sha256: conflicts with `agents.echo.token`"]);
    let e = errs(&format!(
        "{AGENT}[webhooks.w]\nagent = \"echo\"\nverify = \"hmac\"\nsecret_file = \"/x\"\nsecret_env = \"Y\"\n"
    ));
    assert_line(&e, &["webhooks.w.secret_file: conflicts with `webhooks.w.secret_env`"]);
}

#[test]
fn missing_token_and_bad_token_sha256() {
    let e = errs("[agents.echo]\nwindow = 3\n[agents.other]\ntoken_sha256 = \"abc\"\n");
    assert_line(&e, &["test.toml: agents.echo.token: required", "token_sha256"]);
    assert_line(&e, &["test.toml: agents.other.token_sha256: must be 64 hexadecimal characters"]);
}

#[test]
fn invalid_ids_and_values() {
    let e = errs(&format!(
        "[agents.\"has space\"]\ntoken = \"t\"\n{AGENT}window = 0\nmax_pending = \"lots\"\n[agents.echo.wake]\ndriver = \"teleport\"\nmax_attempts = -1\n"
    ));
    assert_line(&e, &["test.toml: agents.\"has space\": invalid agent id"]);
    assert_line(&e, &["agents.echo.window: invalid number \"0\""]);
    assert_line(&e, &["agents.echo.max_pending: invalid number \"lots\""]);
    assert_line(&e, &["agents.echo.wake.driver: unknown value \"teleport\"", "\"none\", \"exec\", \"http\", \"fly\""]);
    assert_line(&e, &["agents.echo.wake.max_attempts: invalid number \"-1\""]);
}

#[test]
fn driver_specific_keys_and_requirements() {
    let e = errs(&format!(
        "{AGENT}[agents.echo.wake]\ndriver = \"exec\"\nurl = \"http://x\"\n[agents.f]\ntoken = \"t\"\n[agents.f.wake]\ndriver = \"fly\"\n[agents.h]\ntoken = \"t\"\n[agents.h.wake]\ndriver = \"http\"\ncommand = []\n[agents.e]\ntoken = \"t\"\n[agents.e.wake]\ndriver = \"exec\"\ncommand = []\n"
    ));
    assert_line(&e, &["agents.echo.wake.command: required for driver = \"exec\""]);
    assert_line(&e, &["agents.echo.wake.url: only valid with driver = \"http\""]);
    assert_line(&e, &["agents.f.wake.app: required"]);
    assert_line(&e, &["agents.f.wake.machine: required"]);
    assert_line(&e, &["agents.f.wake.api_token: required for driver = \"fly\""]);
    assert_line(&e, &["agents.h.wake.url: required for driver = \"http\""]);
    assert_line(&e, &["agents.h.wake.command: only valid with driver = \"exec\""]);
    assert_line(&e, &["agents.e.wake.command: must be a non-empty array"]);
}

#[test]
fn store_backend_checks() {
    let e = errs("[store]\nbackend = \"redis\"\npath = \"x.db\"\n");
    assert_line(&e, &["store.path: only valid with backend = \"embedded\""]);
    assert_line(&e, &["store.url: required when backend = \"redis\""]);
    let e = errs("[store]\nbackend = \"redis\"\nurl = \"http://user:hunter2@host\"\n");
    assert_line(&e, &["store.url: must be a redis://"]);
    assert!(!e.to_string().contains("hunter2"));
    let e = errs("[store]\nurl = \"redis://x\"\nbackend = \"mongo\"\n");
    assert_line(&e, &["store.backend: unknown value \"mongo\""]);
    let e = errs("[store]\nurl = \"redis://x\"\n");
    assert_line(&e, &["store.url: only valid with backend = \"redis\""]);
}

#[test]
fn webhook_verification_checks() {
    let e = errs(&format!(
        "{AGENT}[webhooks.a]\nagent = \"echo\"\nverify = \"standard\"\n[webhooks.b]\nagent = \"echo\"\nsecret = \"s\"\n[webhooks.c]\nagent = \"echo\"\nverify = \"hmac\"\nsecret = \"s\"\nhmac_header = \"bad header\"\n[webhooks.d]\nagent = \"echo\"\nreply_secret = \"r\"\nhmac_header = \"x\"\n"
    ));
    assert_line(&e, &["webhooks.a.secret: required for verify = \"standard\""]);
    assert_line(&e, &["webhooks.b.secret: set, but verify = \"none\""]);
    assert_line(&e, &["webhooks.c.hmac_header: invalid HTTP header name"]);
    assert_line(&e, &["webhooks.d.reply_secret: set, but there is no reply_url"]);
    assert_line(&e, &["webhooks.d.hmac_header: only valid with verify = \"hmac\""]);
}

#[test]
fn sizes_and_frame_limits() {
    let c = ok("[server]\nmax_frame = \"64KiB\"\nmax_body = 1000\n");
    assert_eq!(c.server.max_frame, 65536);
    assert_eq!(c.server.max_body, 1000);
    let e = errs("[server]\nmax_frame = \"8 MegaBytes\"\nmax_body = \"0\"\n");
    assert_line(&e, &["test.toml: server.max_frame: invalid size \"8 MegaBytes\""]);
    assert_line(&e, &["test.toml: server.max_body: 0 bytes is out of range"]);
    let e = errs("[server]\nmax_frame = \"5GiB\"\n");
    assert_line(&e, &["server.max_frame:", "out of range"]);
}

#[test]
fn backoff_max_below_initial() {
    let e = errs(&format!("{AGENT}[agents.echo.wake]\nbackoff_initial = \"10s\"\nbackoff_max = \"1s\"\n"));
    assert_line(&e, &["agents.echo.wake.backoff_max: must be at least backoff_initial (10s)"]);
}

#[test]
fn wrong_types_are_reported_with_their_key() {
    let e = errs("[server]\nhttp_listen = [1, 2]\n[agents.echo]\ntoken = { a = 1 }\nwake = 3\n");
    assert_line(&e, &["test.toml: server.http_listen: expected a string, found an array"]);
    assert_line(&e, &["test.toml: agents.echo.token: expected a string, found a table"]);
    let e = errs("agents = 5\nwebhooks = \"x\"\nserver = []\n");
    assert_line(&e, &["test.toml: agents: expected a table of agents"]);
    assert_line(&e, &["test.toml: webhooks: expected a table of routes"]);
    assert_line(&e, &["test.toml: server: expected a table, found an array"]);
    let e = errs(&format!("{AGENT}wake = 3\n"));
    assert_line(&e, &["test.toml: agents.echo.wake: expected a table, found a number"]);
}

#[test]
fn toml_syntax_errors_give_a_position() {
    let e = errs("[server]\nhttp_listen = \"127.0.0.1:80\n");
    assert_eq!(e.0.len(), 1);
    assert_line(&e, &["test.toml: line 2, column", "invalid TOML"]);
}

#[test]
fn missing_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let e = load(&path).unwrap_err();
    assert_line(&e, &[&path.display().to_string(), "cannot read configuration file"]);
}

#[test]
fn admin_off_loopback_requires_a_token() {
    let e = errs("[server]\nadmin_listen = \"0.0.0.0:9090\"\n");
    assert_line(
        &e,
        &[
            "test.toml: server.admin_token: required because server.admin_listen (0.0.0.0:9090) is not a loopback address",
        ],
    );
    let c = ok("[server]\nadmin_listen = \"0.0.0.0:9090\"\nadmin_token = \"adm1n-s3cret\"\n");
    assert_eq!(c.server.admin_token.as_ref().unwrap().expose(), "adm1n-s3cret");
    assert!(!format!("{c:?}").contains("adm1n-s3cret"));
    // Loopback (v4 or v6) needs none.
    ok("[server]\nadmin_listen = \"[::1]:9090\"\n");
}

#[test]
fn many_problems_are_reported_together() {
    let e = errs(
        r#"
bogus = 1
[server]
quic_listen = "nope"
admin_listen = "10.0.0.1:9090"
[agents.echo]
token_env = "CONCIERGE_TEST_NEVER_SET_4D2E"
[agents.echo.wake]
policy = "whenever"
sleep_after = "5 minutez"
[webhooks.demo]
agent = "nobody"
"#,
    );
    let text = e.to_string();
    assert_eq!(e.0.len(), 7, "{text}");
    assert_eq!(text.lines().count(), 7);
    for key in [
        "test.toml: bogus:",
        "test.toml: server.quic_listen:",
        "test.toml: server.admin_token:",
        "test.toml: agents.echo.token_env:",
        "test.toml: agents.echo.wake.policy:",
        "test.toml: agents.echo.wake.sleep_after:",
        "test.toml: webhooks.demo.agent:",
    ] {
        assert!(text.contains(key), "missing {key} in:\n{text}");
    }
    // Each error is also available structurally.
    assert!(e.0.iter().any(|x| x.key == "agents.echo.wake.sleep_after" && x.origin == "test.toml"));
}

// ---- secrets ------------------------------------------------------------------------------

#[test]
fn secrets_never_appear_in_errors_or_debug() {
    Jail::expect_with(|jail| {
        jail.set_env("CONCIERGE_TEST_TOKEN_FROM_ENV", "env-s3cret-value");
        jail.create_file("hook.secret", "file-s3cret-value\n")?;
        let cfg = r#"
[server]
admin_token = "inline-admin-s3cret"
[agents.a]
token = "inline-s3cret-value"
[agents.b]
token_env = "CONCIERGE_TEST_TOKEN_FROM_ENV"
[agents.c]
token_file = "hook.secret"
[agents.d]
token = 12345678
[agents.d.wake]
driver = "http"
url = "https://x.example"
secret = "inline-http-s3cret"
[webhooks.w]
agent = "a"
verify = "standard"
secret_file = "hook.secret"
reply_url = "http://127.0.0.1:1/"
reply_secret_env = "CONCIERGE_TEST_TOKEN_FROM_ENV"
"#;
        jail.create_file("ok.toml", cfg)?;
        let c = load(&jail.directory().join("ok.toml")).map_err(jail_err)?;
        assert!(c.agents["a"].token_matches("inline-s3cret-value"));
        assert!(c.agents["b"].token_matches("env-s3cret-value"));
        assert!(c.agents["c"].token_matches("file-s3cret-value"), "trailing newline trimmed");
        assert!(c.agents["d"].token_matches("12345678"), "integer tokens are taken as text");
        match &c.webhooks["w"].verify {
            Verify::Standard { secret } => assert_eq!(secret.expose(), "file-s3cret-value"),
            other => panic!("{other:?}"),
        }
        let debug = format!("{c:?}");
        let secrets = [
            "s3cret",
            "12345678",
            // SHA-256 digests are not shown either.
            "token_sha256: [",
        ];
        for s in secrets {
            assert!(!debug.contains(s), "{s} in Debug:\n{debug}");
        }

        // The same secrets next to errors of every kind: wrong types, conflicts, bad
        // neighbours, unknown keys, syntax errors.
        let bad = format!(
            "{cfg}\n[agents.e]\ntoken = [\"array-s3cret\"]\n[agents.f]\ntoken = \"conflict-s3cret\"\ntoken_env = \"CONCIERGE_TEST_TOKEN_FROM_ENV\"\n[agents.g]\ntoken = \"g-s3cret\"\nwindow = \"many\"\nmystery = \"mystery-s3cret\"\n[agents.d.extra]\nx = 1\n"
        );
        jail.create_file("bad.toml", &bad)?;
        let e = load(&jail.directory().join("bad.toml")).unwrap_err();
        let text = e.to_string();
        assert!(e.0.len() >= 4, "{text}");
        assert!(!text.contains("s3cret"), "secret leaked:\n{text}");
        assert!(!format!("{e:?}").contains("s3cret"));

        for syntax in [
            "[agents.a]\ntoken = \"unterminated-s3cret\n",
            "[agents.a]\ntoken = \"bad-escape-s3cret\\q\"\n",
            "[agents.a]\ntoken = 'x' 'trailing-s3cret'\n",
            "[agents.a]\ntoken = \"dup-s3cret\"\ntoken = \"dup-s3cret\"\n",
        ] {
            let e = load_str(syntax, "syntax.toml").unwrap_err().to_string();
            assert!(!e.contains("s3cret"), "secret leaked by syntax error:\n{e}");
            assert!(e.starts_with("syntax.toml: line "), "{e}");
        }
        Ok(())
    });
}

#[test]
fn secret_type_redacts() {
    let s = Secret::new("hunter2");
    assert_eq!(format!("{s:?}"), "[redacted]");
    assert_eq!(format!("{s}"), "[redacted]");
    assert_eq!(s.expose(), "hunter2");
}

// ---- environment overrides -----------------------------------------------------------------

#[test]
fn env_overrides_change_values() {
    Jail::expect_with(|jail| {
        jail.create_file("c.toml", &format!("{AGENT}[agents.echo.wake]\nsleep_after = \"1m\"\n"))?;
        jail.set_env("CONCIERGE_SERVER__HTTP_LISTEN", "0.0.0.0:8081");
        jail.set_env("CONCIERGE_STORE__BACKEND", "redis");
        jail.set_env("CONCIERGE_STORE__URL", "redis://:env-pw@10.1.2.3:6379");
        jail.set_env("CONCIERGE_AGENTS__ECHO__TOKEN", "007");
        jail.set_env("CONCIERGE_AGENTS__ECHO__WAKE__SLEEP_AFTER", "2m");
        jail.set_env("CONCIERGE_AGENTS__ECHO__WAKE__DRIVER", "exec");
        jail.set_env("CONCIERGE_AGENTS__ECHO__WAKE__COMMAND", "[my-agent, --serve]");
        // Not an override (no `__`): must not be read as a key.
        jail.set_env("CONCIERGE_SOMETHING_ELSE", "whatever");
        let c = load(&jail.directory().join("c.toml")).map_err(jail_err)?;
        assert_eq!(c.server.http_listen, "0.0.0.0:8081".parse::<SocketAddr>().unwrap());
        match &c.store.backend {
            StoreBackend::Redis { url } => assert_eq!(url.expose(), "redis://:env-pw@10.1.2.3:6379"),
            other => panic!("{other:?}"),
        }
        let echo = &c.agents["echo"];
        assert!(echo.token_matches("007"), "env values stay strings (no 007 -> 7)");
        assert_eq!(echo.wake.sleep_after, Some(Duration::from_secs(120)));
        match &echo.wake.driver {
            DriverConfig::Exec { command, .. } => assert_eq!(command, &["my-agent", "--serve"]),
            other => panic!("{other:?}"),
        }
        assert!(!format!("{c:?}").contains("env-pw"));
        // load_str ignores CONCIERGE_* overrides.
        let c = load_str(AGENT, "s.toml").map_err(jail_err)?;
        assert_eq!(c.server.http_listen, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
        Ok(())
    });
}

#[test]
fn env_sourced_errors_name_the_variable() {
    Jail::expect_with(|jail| {
        jail.create_file("c.toml", AGENT)?;
        jail.set_env("CONCIERGE_SERVER__HTTP_LISTEN", "not-an-address");
        jail.set_env("CONCIERGE_SERVER__NOPE", "1");
        jail.set_env("CONCIERGE_AGENTS__ECHO__WAKE__POLICY", "later");
        jail.set_env("CONCIERGE_AGENTS__ECHO__TOKEN_ENV", "ALSO_SET");
        let e = load(&jail.directory().join("c.toml")).unwrap_err();
        assert_line(
            &e,
            &[
                "environment variable CONCIERGE_SERVER__HTTP_LISTEN: server.http_listen: invalid socket address \"not-an-address\"",
            ],
        );
        assert_line(&e, &["environment variable CONCIERGE_SERVER__NOPE: server.nope: unknown key"]);
        assert_line(
            &e,
            &[
                "environment variable CONCIERGE_AGENTS__ECHO__WAKE__POLICY: agents.echo.wake.policy: invalid policy \"later\"",
            ],
        );
        assert_line(
            &e,
            &[
                "environment variable CONCIERGE_AGENTS__ECHO__TOKEN_ENV: agents.echo.token_env: conflicts with `agents.echo.token`",
            ],
        );
        Ok(())
    });
}

// ---- paths ---------------------------------------------------------------------------------

#[test]
fn relative_paths_resolve_against_the_config_dir() {
    Jail::expect_with(|jail| {
        let cfg_dir = jail.create_dir("etc/concierge")?;
        jail.create_dir("etc/concierge/tls")?;
        jail.create_file("etc/concierge/tls/cert.pem", "c")?;
        jail.create_file("etc/concierge/tls/key.pem", "k")?;
        jail.create_file("etc/concierge/echo.token", "from-file\r\n")?;
        jail.create_file(
            "etc/concierge/concierge.toml",
            "[server]\ndata_dir = \"./state\"\n[tls]\ncert = \"tls/cert.pem\"\nkey = \"tls/key.pem\"\n[store]\npath = \"db/events.db\"\n[agents.echo]\ntoken_file = \"echo.token\"\n",
        )?;
        // Load from elsewhere: the working directory must not matter.
        jail.create_dir("elsewhere")?;
        jail.change_dir("elsewhere")?;
        let c = load(Path::new("../etc/concierge/concierge.toml")).map_err(jail_err)?;
        let dir = jail.directory().join(&cfg_dir);
        let dir = Path::new(&dir);
        assert!(c.server.data_dir.is_absolute());
        assert!(c.server.data_dir.ends_with("etc/concierge/state"));
        let tls = c.tls.as_ref().unwrap();
        assert_eq!(tls.cert.canonicalize().ok(), dir.join("tls/cert.pem").canonicalize().ok());
        assert_eq!(tls.key.canonicalize().ok(), dir.join("tls/key.pem").canonicalize().ok());
        match &c.store.backend {
            StoreBackend::Embedded { path } => assert!(path.ends_with("etc/concierge/db/events.db")),
            other => panic!("{other:?}"),
        }
        assert!(c.agents["echo"].token_matches("from-file"));
        Ok(())
    });
}

#[test]
fn missing_tls_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let e = errs(&format!("[tls]\ncert = \"{}/nope.pem\"\n", dir.path().display()));
    assert_line(&e, &["test.toml: tls.cert: cannot read", "nope.pem"]);
    assert_line(&e, &["test.toml: tls.key: required when [tls] is present"]);
}

// ---- robustness ----------------------------------------------------------------------------

#[test]
fn garbage_input_is_an_error_not_a_panic() {
    for garbage in [
        "\u{0}\u{1}\u{2}",
        "[[[",
        "= = =",
        "[agents]\n[agents]\n",
        "agents = [1, 2, 3]",
        "[agents.echo]\ntoken = \"t\"\n[[agents.echo.wake]]\ndriver = \"exec\"\n",
        "[agents.\"a.b\"]\ntoken = \"t\"\n",
        "[agents.\"\"]\n",
        "[webhooks.\"é\"]\nagent = \"x\"\n",
        "[server]\nmax_frame = -5\nmax_body = 1e400\n",
        "[server]\nmax_frame = 99999999999999999999999999\n",
        "[server]\nshutdown_grace = \"99999999999999999999999y\"\n",
        "[store]\nretain_acked = 1.5\n",
        "[agents.x]\ntoken = \"t\"\n[agents.x.wake]\ndriver = \"exec\"\ncommand = [[\"nested\"]]\nenv = { \"\" = \"v\", \"A=B\" = \"v\", C = [1] }\n",
        "[agents.x]\ntoken = \"t\"\n[agents.x.wake]\npolicy = \"coalesce(\"\n",
        "x = 1979-05-27T07:32:00Z\n",
        "[server]\ndata_dir = 1979-05-27\n",
        "\u{feff}[server\n",
    ] {
        assert!(load_str(garbage, "g.toml").is_err(), "accepted garbage: {garbage:?}");
    }
}

#[test]
fn mutated_example_never_panics() {
    // Deterministic pseudo-random edits of the example (delete, duplicate, swap in a
    // troublesome character); every result must be Ok or Err, never a panic.
    let chars: Vec<char> = EXAMPLE.chars().collect();
    let specials = ['"', '[', ']', '=', '\n', '.', '{', '}', '\\', '#', 'é', '0', ' ', ','];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..300 {
        let mut text = chars.clone();
        for _ in 0..(next() % 4 + 1) {
            let at = (next() as usize) % text.len();
            match next() % 3 {
                0 => {
                    text.remove(at);
                }
                1 => text.insert(at, text[at]),
                _ => text[at] = specials[(next() as usize) % specials.len()],
            }
        }
        let s: String = text.into_iter().collect();
        let _ = load_str(&s, "mutated.toml");
    }
}
