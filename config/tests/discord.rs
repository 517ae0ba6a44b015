//! `[discord.<bot>]`: defaults, intents, URLs and error messages.

use concierge_config::load_str;

mod common;
use common::*;

const AGENT: &str = "[agents.echo]\ntoken = \"t0ken\"\n";

#[test]
fn discord_defaults_and_overrides() {
    let c = load_str(
        &format!(
            "{AGENT}[discord.bot]\nagent = \"echo\"\ntoken = \"MTA.secret-x\"\n[discord.fake]\nagent = \"echo\"\ntoken = \"other\"\nintents = [\"guild_messages\", \"DIRECT_MESSAGES\"]\ngateway_url = \"ws://127.0.0.1:9/\"\napi_base = \"http://127.0.0.1:9/api/v10/\"\n"
        ),
        "test.toml",
    )
    .unwrap();
    let bot = &c.discord["bot"];
    assert_eq!((bot.agent.as_str(), bot.token.expose()), ("echo", "MTA.secret-x"));
    assert_eq!(bot.gateway_url, "wss://gateway.discord.gg");
    assert_eq!(bot.api_base, "https://discord.com/api/v10");
    // GUILDS | GUILD_MESSAGES | GUILD_MESSAGE_REACTIONS | DIRECT_MESSAGES | DIRECT_MESSAGE_REACTIONS | MESSAGE_CONTENT
    assert_eq!(bot.intent_bits, 1 | 1 << 9 | 1 << 10 | 1 << 12 | 1 << 13 | 1 << 15);
    let fake = &c.discord["fake"];
    assert_eq!(fake.intent_bits, 1 << 9 | 1 << 12);
    assert_eq!((fake.gateway_url.as_str(), fake.api_base.as_str()), ("ws://127.0.0.1:9", "http://127.0.0.1:9/api/v10"));
    assert!(!format!("{c:?}").contains("secret-x"), "Debug leaks a token");
}

#[test]
fn discord_errors_name_the_key() {
    let e = errs(&format!(
        "{AGENT}[discord.a]\nagent = \"nobody\"\ntoken = \"tok\"\n[discord.b]\nagent = \"echo\"\ntoken = \"tok\"\n[discord.c]\nagent = \"echo\"\ntoken = \"bad token!\"\nintents = [\"MESAGE_CONTENT\"]\ngateway_url = \"https://gateway.discord.gg\"\n[discord.d]\nagent = \"echo\"\n"
    ));
    assert_line(&e, &["test.toml: discord.a.agent: unknown agent \"nobody\""]);
    assert_line(&e, &["discord.b.token: the same bot token is already configured for discord.a"]);
    assert_line(&e, &["discord.c.token: not a bot token"]);
    assert_line(&e, &["discord.c.intents[0]: unknown intent \"MESAGE_CONTENT\""]);
    assert_line(&e, &["discord.c.gateway_url: must be a ws:// or wss:// URL"]);
    assert_line(&e, &["discord.d.token: required"]);
    assert!(!e.to_string().contains("bad token!"), "token echoed");
}
