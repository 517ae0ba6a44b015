//! `[slack.<name>]`: defaults, mode-dependent requirements, token shapes, secrecy and send pacing.

use std::time::Duration;

use concierge_config::{SlackMode, load_str};

mod common;
use common::*;

const AGENT: &str = "[agents.echo]\ntoken = \"t0ken\"\n";

#[test]
fn socket_and_events_modes() {
    let c = load_str(
        &format!(
            "{AGENT}[slack.ws]\nagent = \"echo\"\napp_token = \"xapp-1-A1-xyz\"\nbot_token = \"xoxb-123-abc\"\n[slack.ev]\nagent = \"echo\"\nbot_token = \"xoxb-456-def\"\nsigning_secret = \"sig\"\nmode = \"events\"\napi_base = \"http://127.0.0.1:9/api/\"\n"
        ),
        "test.toml",
    )
    .unwrap();
    let ws = &c.slack["ws"];
    assert_eq!((ws.mode, ws.api_base.as_str()), (SlackMode::Socket, "https://slack.com/api"));
    let ev = &c.slack["ev"];
    assert_eq!((ev.mode, ev.api_base.as_str()), (SlackMode::Events, "http://127.0.0.1:9/api"));
    assert_eq!(ev.signing_secret.as_ref().map(|s| s.expose()), Some("sig"));
    assert!(!format!("{c:?}").contains("xoxb-123-abc"), "a token appears in Debug output");
}

#[test]
fn missing_and_malformed_credentials_are_named() {
    let e = errs(&format!(
        "{AGENT}[slack.a]\nagent = \"ghost\"\n[slack.b]\nagent = \"echo\"\nmode = \"events\"\nbot_token = \"xoxp-user\"\n[slack.c]\nagent = \"echo\"\napp_token = \"xapp-1\"\nbot_token = \"xoxb-1\"\n[slack.d]\nagent = \"echo\"\napp_token = \"xapp-1\"\nbot_token = \"xoxb-2\"\n"
    ));
    assert_line(&e, &["slack.a.agent: unknown agent \"ghost\""]);
    assert_line(&e, &["slack.a.bot_token: required"]);
    assert_line(&e, &["slack.a.app_token: required for mode = \"socket\""]);
    assert_line(&e, &["slack.b.signing_secret: required for mode = \"events\""]);
    assert_line(&e, &["slack.b.bot_token: not a Slack bot_token"]);
    assert_line(&e, &["slack.d.app_token: the same app token is already configured for slack.c"]);
    assert!(!e.to_string().contains("xoxp-user"), "a token was echoed:\n{e}");
}

#[test]
fn chat_interval_defaults_parses_and_is_bounded() {
    let app = |name: &str, n: u32, extra: &str| {
        format!("[slack.{name}]\nagent = \"echo\"\napp_token = \"xapp-1-A{n}\"\nbot_token = \"xoxb-{n}\"\n{extra}\n")
    };
    let c = ok(&format!(
        "{AGENT}{}{}{}",
        app("plain", 1, ""),
        app("fast", 2, "chat_interval = \"200ms\""),
        app("off", 3, "chat_interval = \"0s\"")
    ));
    assert_eq!(c.slack["plain"].chat_interval, Duration::from_secs(1), "Slack's 1 message/s per channel");
    assert_eq!(c.slack["fast"].chat_interval, Duration::from_millis(200));
    assert_eq!(c.slack["off"].chat_interval, Duration::ZERO, "zero keeps only the order");

    let e = errs(&format!(
        "{AGENT}{}{}",
        app("typo", 1, "chat_interval = \"1 sec please\""),
        app("slow", 2, "chat_interval = \"2m\"")
    ));
    assert_line(&e, &["test.toml: slack.typo.chat_interval: invalid duration \"1 sec please\""]);
    assert_line(&e, &["test.toml: slack.slow.chat_interval: must be at most 1m"]);
    assert_eq!(e.0.len(), 2, "{e}");
}
