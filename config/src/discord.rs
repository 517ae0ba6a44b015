//! `[discord.<bot>]`: one Discord bot (gateway connection + REST sends) per table — its raw
//! serde shape, resolved type and validation. A child of `validate`, sharing its error collection.

use std::collections::BTreeMap;

use figment::value::Value;
use serde::Deserialize;

use super::{ChannelTable, Ctx, Got};
use crate::Secret;
use crate::raw::Text;

/// Discord's gateway, used when `gateway_url` is not set (GET /gateway/bot returns the same).
pub const DEFAULT_GATEWAY_URL: &str = "wss://gateway.discord.gg";
/// Discord's REST API base (v10), used when `api_base` is not set.
pub const DEFAULT_API_BASE: &str = "https://discord.com/api/v10";

/// Gateway intents by their documented names and bits. `privileged` ones must also be switched
/// on in the Developer Portal, or Discord closes the gateway with 4014.
pub const INTENTS: &[(&str, u32, bool)] = &[
    ("GUILDS", 1 << 0, false),
    ("GUILD_MEMBERS", 1 << 1, true),
    ("GUILD_MODERATION", 1 << 2, false),
    ("GUILD_EXPRESSIONS", 1 << 3, false),
    ("GUILD_INTEGRATIONS", 1 << 4, false),
    ("GUILD_WEBHOOKS", 1 << 5, false),
    ("GUILD_INVITES", 1 << 6, false),
    ("GUILD_VOICE_STATES", 1 << 7, false),
    ("GUILD_PRESENCES", 1 << 8, true),
    ("GUILD_MESSAGES", 1 << 9, false),
    ("GUILD_MESSAGE_REACTIONS", 1 << 10, false),
    ("GUILD_MESSAGE_TYPING", 1 << 11, false),
    ("DIRECT_MESSAGES", 1 << 12, false),
    ("DIRECT_MESSAGE_REACTIONS", 1 << 13, false),
    ("DIRECT_MESSAGE_TYPING", 1 << 14, false),
    ("MESSAGE_CONTENT", 1 << 15, true),
    ("GUILD_SCHEDULED_EVENTS", 1 << 16, false),
    ("AUTO_MODERATION_CONFIGURATION", 1 << 20, false),
    ("AUTO_MODERATION_EXECUTION", 1 << 21, false),
    ("GUILD_MESSAGE_POLLS", 1 << 24, false),
    ("DIRECT_MESSAGE_POLLS", 1 << 25, false),
];

/// Intents used when `intents` is not set: messages and reactions in guilds and DMs, with
/// content. MESSAGE_CONTENT is privileged (enable it in the Developer Portal, or drop it and
/// receive content only for DMs and mentions).
pub const DEFAULT_INTENTS: &[&str] = &[
    "GUILDS",
    "GUILD_MESSAGES",
    "GUILD_MESSAGE_REACTIONS",
    "DIRECT_MESSAGES",
    "DIRECT_MESSAGE_REACTIONS",
    "MESSAGE_CONTENT",
];

/// One `[discord.<bot>]` entry: a bot whose gateway events go to one agent.
#[derive(Clone, Debug)]
pub struct DiscordConfig {
    /// Bot name from the table key; also the event's channel name.
    pub name: String,
    /// Agent that receives the bot's events and may send through it.
    pub agent: String,
    /// Bot token (sent as `Authorization: Bot <token>` and in Identify).
    pub token: Secret,
    /// Intent names as configured (for messages and the dashboard).
    pub intents: Vec<String>,
    /// The intents bitfield sent in Identify.
    pub intent_bits: u32,
    /// Gateway WebSocket URL (configurable so tests can point at a fake).
    pub gateway_url: String,
    /// REST API base URL including the version (configurable so tests can point at a fake).
    pub api_base: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawDiscord {
    pub agent: Option<Text>,
    pub token: Option<Text>,
    pub token_env: Option<Text>,
    pub token_file: Option<Text>,
    pub intents: Option<Vec<Text>>,
    pub gateway_url: Option<Text>,
    pub api_base: Option<Text>,
}

impl Ctx<'_> {
    pub(super) fn discord(&mut self, v: Option<&Value>, agent_ids: &[String]) -> BTreeMap<String, DiscordConfig> {
        let spec = ChannelTable {
            section: "discord",
            instances: "bots",
            token_key: "token",
            token_kind: "bot token",
            why_one_owner: "a token must have exactly one gateway owner (two sessions split or duplicate events)",
        };
        let build =
            |ctx: &mut Self, path: &str, name: &str, raw: RawDiscord| ctx.discord_bot(path, name, raw, agent_ids);
        self.channel_table(&spec, v, build, |bot: &DiscordConfig| Some(bot.token.expose()))
    }

    fn discord_bot(&mut self, p: &str, name: &str, raw: RawDiscord, agent_ids: &[String]) -> DiscordConfig {
        let k = |key: &str| format!("{p}.{key}");
        let agent = self.channel_agent(&k("agent"), raw.agent.as_ref(), agent_ids, "this bot's events");
        let token = match self.secret(p, "token", raw.token.as_ref(), raw.token_env.as_ref(), raw.token_file.as_ref()) {
            Got::Found(t) => {
                let v = t.expose();
                if v.len() > 200 || !v.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
                    self.err(
                        &k("token"),
                        "not a bot token: expected the token from the Developer Portal's Bot page (value not shown)",
                    );
                    Secret::new("")
                } else {
                    t
                }
            }
            Got::Bad => Secret::new(""),
            Got::Missing => {
                self.err(&k("token"), "required: set token, token_env or token_file");
                Secret::new("")
            }
        };
        let names: Vec<String> = match raw.intents {
            None => DEFAULT_INTENTS.iter().map(|s| s.to_string()).collect(),
            Some(list) => list.iter().map(|t| t.as_str().trim().to_ascii_uppercase()).collect(),
        };
        let mut intent_bits = 0;
        for (i, n) in names.iter().enumerate() {
            match INTENTS.iter().find(|(name, _, _)| name == n) {
                Some((_, bit, _)) => intent_bits |= bit,
                None => {
                    let known: Vec<&str> = INTENTS.iter().map(|(n, _, _)| *n).collect();
                    self.err(
                        &format!("{}[{i}]", k("intents")),
                        format!("unknown intent {n:?}; expected one of: {}", known.join(", ")),
                    );
                }
            }
        }
        let gateway_url = match raw.gateway_url.as_ref() {
            None => DEFAULT_GATEWAY_URL.to_string(),
            Some(t) => {
                let s = t.as_str().trim();
                let rest = s.strip_prefix("ws://").or_else(|| s.strip_prefix("wss://"));
                match rest {
                    Some(r) if !r.is_empty() && !r.starts_with('/') && !s.chars().any(|c| c.is_whitespace()) => {
                        s.trim_end_matches('/').to_string()
                    }
                    _ => {
                        self.err(&k("gateway_url"), "must be a ws:// or wss:// URL with a host");
                        String::new()
                    }
                }
            }
        };
        let api_base = match raw.api_base.as_ref() {
            None => DEFAULT_API_BASE.to_string(),
            Some(t) => self.http_url(&k("api_base"), t).trim_end_matches('/').to_string(),
        };
        DiscordConfig { name: name.to_string(), agent, token, intents: names, intent_bits, gateway_url, api_base }
    }
}
