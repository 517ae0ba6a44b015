//! `[telegram.<bot>]` and `[whatsapp.<name>]`: defaults, validation messages and secrecy.

use std::time::Duration;

mod common;
use common::*;

use concierge_config::{EXAMPLE, TelegramMode, load_str};

const AGENT: &str = "[agents.echo]\ntoken = \"t0ken\"\n";

#[test]
fn telegram_defaults_and_webhook_mode() {
    let c = load_str(
        &format!(
            "{AGENT}[telegram.bot]\nagent = \"echo\"\ntoken = \"123:abc\"\n[telegram.hook]\nagent = \"echo\"\ntoken = \"456:def\"\nmode = \"webhook\"\nwebhook_secret = \"s-1\"\nset_webhook = true\npublic_url = \"https://example.com/\"\nallowed_updates = [\"message\"]\npoll_timeout = \"10s\"\nchat_interval = \"50ms\"\nbot_rate = 5\n"
        ),
        "test.toml",
    )
    .unwrap();
    let bot = &c.telegram["bot"];
    assert_eq!((bot.mode, bot.agent.as_str(), bot.token.expose()), (TelegramMode::Poll, "echo", "123:abc"));
    assert_eq!(bot.api_base, "https://api.telegram.org");
    assert_eq!(bot.poll_timeout, Duration::from_secs(30));
    assert!(bot.allowed_updates.is_empty() && !bot.set_webhook && bot.webhook_secret.is_none());
    assert_eq!((bot.chat_interval, bot.bot_rate), (Duration::from_secs(1), 30));
    let hook = &c.telegram["hook"];
    assert_eq!(hook.mode, TelegramMode::Webhook);
    assert_eq!(hook.public_url.as_deref(), Some("https://example.com"));
    assert_eq!(hook.allowed_updates, ["message"]);
    assert_eq!((hook.chat_interval, hook.bot_rate), (Duration::from_millis(50), 5));
    assert!(!format!("{c:?}").contains("456:def"), "Debug leaks a token");
}

#[test]
fn telegram_errors_name_file_and_key() {
    let e = errs(&format!(
        "{AGENT}[telegram.a]\nagent = \"nobody\"\ntoken = \"123:abc\"\n[telegram.b]\nagent = \"echo\"\ntoken = \"123:abc\"\n[telegram.c]\nagent = \"echo\"\ntoken = \"not-a-token\"\nmode = \"webhook\"\nallowed_updates = [\"mesage\"]\n[telegram.d]\nagent = \"echo\"\ntoken = \"9:x\"\nset_webhook = true\nwebhook_secret = \"bad secret!\"\n"
    ));
    assert_line(&e, &["test.toml: telegram.a.agent: unknown agent \"nobody\"", "echo"]);
    assert_line(&e, &["test.toml: telegram.b.token: the same bot token is already configured for telegram.a"]);
    assert_line(&e, &["telegram.c.token: not a bot token"]);
    assert_line(&e, &["telegram.c.webhook_secret: required for mode = \"webhook\""]);
    assert_line(&e, &["telegram.c.allowed_updates[0]: unknown update kind \"mesage\""]);
    assert_line(&e, &["telegram.d.set_webhook: only valid with mode = \"webhook\""]);
    assert_line(&e, &["telegram.d.webhook_secret: Telegram accepts"]);
    assert_line(&e, &["telegram.d.public_url: required when set_webhook = true"]);
    let text = e.to_string();
    assert!(!text.contains("not-a-token") && !text.contains("bad secret!"), "secrets echoed:\n{text}");
}

/// A poll timeout under one second would make `getUpdates` return at once on an idle bot and
/// the poller re-poll without pause (a hot loop against Telegram), so it is refused at load.
#[test]
fn telegram_poll_timeout_under_a_second_is_refused() {
    let bot = |name: &str, id: u32, timeout: &str| {
        format!("[telegram.{name}]\nagent = \"echo\"\ntoken = \"{id}:abc\"\npoll_timeout = \"{timeout}\"\n")
    };
    let e = errs(&format!("{AGENT}{}{}{}", bot("zero", 1, "0s"), bot("half", 2, "500ms"), bot("long", 3, "3m")));
    assert_line(&e, &["test.toml: telegram.zero.poll_timeout: must be at least 1s"]);
    assert_line(&e, &["test.toml: telegram.half.poll_timeout: must be at least 1s"]);
    assert_line(&e, &["test.toml: telegram.long.poll_timeout: must be at most 2m"]);
    let c = load_str(&format!("{AGENT}{}", bot("one", 4, "1s")), "test.toml").unwrap();
    assert_eq!(c.telegram["one"].poll_timeout, Duration::from_secs(1));
}

#[test]
fn whatsapp_section() {
    let ok = format!(
        "{AGENT}[whatsapp.main]\nagent = \"echo\"\napp_secret = \"as\"\nverify_token = \"vt\"\naccess_token = \"at\"\nphone_number_id = \"1065\"\n"
    );
    let c = load_str(&ok, "test.toml").unwrap();
    let wa = &c.whatsapp["main"];
    assert_eq!((wa.graph_base.as_str(), wa.api_version.as_str()), ("https://graph.facebook.com", "v23.0"));
    assert_eq!((wa.app_secret.expose(), wa.phone_number_id.as_str()), ("as", "1065"));
    assert!(!format!("{c:?}").contains("\"at\""));

    let e = errs(&format!(
        "{AGENT}[whatsapp.main]\nagent = \"ghost\"\nphone_number_id = \"+1 555\"\napi_version = \"23\"\ngraph_base = \"ftp://x\"\n[whatsapp.two]\nagent = \"echo\"\napp_secret = \"a\"\nverify_token = \"v\"\naccess_token = \"t\"\nphone_number_id = \"1\"\n[whatsapp.three]\nagent = \"echo\"\napp_secret = \"a\"\nverify_token = \"v\"\naccess_token = \"t\"\nphone_number_id = \"1\"\n"
    ));
    assert_line(&e, &["test.toml: whatsapp.main.agent: unknown agent \"ghost\""]);
    for key in ["app_secret", "verify_token", "access_token"] {
        assert_line(&e, &[&format!("whatsapp.main.{key}: required")]);
    }
    assert_line(&e, &["whatsapp.main.phone_number_id: must be the numeric phone number id"]);
    assert_line(&e, &["whatsapp.main.api_version: invalid Graph API version"]);
    assert_line(&e, &["whatsapp.main.graph_base: must be an http:// or https:// URL"]);
    assert_line(&e, &["whatsapp.two.phone_number_id: already configured for whatsapp.three"]);
}

#[test]
fn example_mentions_both_channels_commented_out_and_still_loads() {
    assert!(EXAMPLE.contains("# [telegram.support]") && EXAMPLE.contains("# [whatsapp.main]"));
    let c = load_str(EXAMPLE, "example.toml").unwrap();
    assert!(c.telegram.is_empty() && c.whatsapp.is_empty());
}
