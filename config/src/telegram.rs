//! `[telegram.<bot>]`: one Telegram bot per table — its raw serde shape, resolved type and
//! validation. Declared as a child of `validate` so it shares that module's error collection.

use std::collections::BTreeMap;
use std::time::Duration;

use figment::value::Value;
use serde::Deserialize;

use super::{ChannelTable, Ctx, Got, display_key};
use crate::Secret;
use crate::raw::Text;

/// Telegram's Bot API base URL, used when `api_base` is not set.
pub const DEFAULT_API_BASE: &str = "https://api.telegram.org";

/// How a bot receives updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TelegramMode {
    /// Concierge long-polls `getUpdates` itself (no public address needed).
    Poll,
    /// Telegram POSTs updates to `POST /telegram/<bot>` on the HTTP ingress.
    Webhook,
}

/// One `[telegram.<bot>]` entry: a bot whose updates go to one agent.
#[derive(Clone, Debug)]
pub struct TelegramConfig {
    /// Bot name from the table key (`[A-Za-z0-9_-]{1,64}`); also the event's channel name.
    pub name: String,
    /// Agent that receives the bot's updates and may send through it.
    pub agent: String,
    /// Bot token `<bot id>:<secret>`.
    pub token: Secret,
    /// Long polling or webhook.
    pub mode: TelegramMode,
    /// Bot API base URL (configurable so tests can point at a fake).
    pub api_base: String,
    /// Update kinds to receive; empty = Telegram's default set (always sent explicitly,
    /// because an omitted list means "whatever was set last").
    pub allowed_updates: Vec<String>,
    /// Long-poll timeout passed to `getUpdates` (whole seconds, at least 1: short polling would
    /// spin on an idle bot).
    pub poll_timeout: Duration,
    /// Expected `X-Telegram-Bot-Api-Secret-Token` in webhook mode.
    pub webhook_secret: Option<Secret>,
    /// Whether Concierge calls `setWebhook` itself at start-up (webhook mode).
    pub set_webhook: bool,
    /// Public base URL of the HTTP ingress, for `setWebhook` (`<public_url>/telegram/<bot>`).
    pub public_url: Option<String>,
    /// Least time between two messages to one chat (Telegram: about one per second).
    pub chat_interval: Duration,
    /// Most API calls per second for the whole bot (Telegram: about 30).
    pub bot_rate: u32,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawTelegram {
    pub agent: Option<Text>,
    pub token: Option<Text>,
    pub token_env: Option<Text>,
    pub token_file: Option<Text>,
    pub mode: Option<Text>,
    pub api_base: Option<Text>,
    pub allowed_updates: Option<Vec<Text>>,
    pub poll_timeout: Option<Text>,
    pub webhook_secret: Option<Text>,
    pub webhook_secret_env: Option<Text>,
    pub webhook_secret_file: Option<Text>,
    pub set_webhook: Option<Text>,
    pub public_url: Option<Text>,
    pub chat_interval: Option<Text>,
    pub bot_rate: Option<Text>,
}

/// Update kinds the Bot API documents (`allowed_updates` values).
const UPDATE_KINDS: &[&str] = &[
    "message",
    "edited_message",
    "channel_post",
    "edited_channel_post",
    "business_connection",
    "business_message",
    "edited_business_message",
    "deleted_business_messages",
    "message_reaction",
    "message_reaction_count",
    "inline_query",
    "chosen_inline_result",
    "callback_query",
    "shipping_query",
    "pre_checkout_query",
    "purchased_paid_media",
    "poll",
    "poll_answer",
    "my_chat_member",
    "chat_member",
    "chat_join_request",
    "chat_boost",
    "removed_chat_boost",
];

impl Ctx<'_> {
    pub(super) fn telegram(&mut self, v: Option<&Value>, agent_ids: &[String]) -> BTreeMap<String, TelegramConfig> {
        let spec = ChannelTable {
            section: "telegram",
            instances: "bots",
            token_key: "token",
            token_kind: "bot token",
            why_one_owner: "a token must have exactly one owner (Telegram answers 409 Conflict to a second poller)",
        };
        let build =
            |ctx: &mut Self, path: &str, name: &str, raw: RawTelegram| ctx.telegram_bot(path, name, raw, agent_ids);
        self.channel_table(&spec, v, build, |bot: &TelegramConfig| Some(bot.token.expose()))
    }

    fn telegram_bot(&mut self, p: &str, name: &str, raw: RawTelegram, agent_ids: &[String]) -> TelegramConfig {
        let k = |key: &str| format!("{p}.{key}");
        let agent = self.channel_agent(&k("agent"), raw.agent.as_ref(), agent_ids, "this bot's updates");
        let token = match self.secret(p, "token", raw.token.as_ref(), raw.token_env.as_ref(), raw.token_file.as_ref()) {
            Got::Found(t) => {
                if !valid_bot_token(t.expose()) {
                    self.err(
                        &k("token"),
                        "not a bot token: expected \"<bot id>:<secret>\" as given by @BotFather (value not shown)",
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
        let mode = match self.choice(&k("mode"), raw.mode.as_ref(), &["poll", "webhook"]) {
            Some("webhook") => TelegramMode::Webhook,
            _ => TelegramMode::Poll,
        };
        let api_base = match raw.api_base.as_ref() {
            None => DEFAULT_API_BASE.to_string(),
            Some(t) => self.http_url(&k("api_base"), t).trim_end_matches('/').to_string(),
        };
        let mut allowed_updates = Vec::new();
        for (i, t) in raw.allowed_updates.iter().flatten().enumerate() {
            let kind = t.as_str().trim();
            if UPDATE_KINDS.contains(&kind) {
                allowed_updates.push(kind.to_string());
            } else {
                self.err(
                    &format!("{}[{i}]", k("allowed_updates")),
                    format!("unknown update kind {:?}; expected one of: {}", kind, UPDATE_KINDS.join(", ")),
                );
            }
        }
        let poll_timeout = self.duration(&k("poll_timeout"), raw.poll_timeout.as_ref(), Duration::from_secs(30), true);
        if poll_timeout > Duration::from_secs(120) {
            self.err(&k("poll_timeout"), "must be at most 2m (Telegram holds a long poll for at most about 50s)");
        } else if poll_timeout < Duration::from_secs(1) {
            self.err(
                &k("poll_timeout"),
                "must be at least 1s: getUpdates takes whole seconds, and 0 (short polling) would re-poll an idle bot without pause",
            );
        }
        let webhook_secret = match self.secret(
            p,
            "webhook_secret",
            raw.webhook_secret.as_ref(),
            raw.webhook_secret_env.as_ref(),
            raw.webhook_secret_file.as_ref(),
        ) {
            Got::Found(s) => {
                let v = s.expose();
                let ok = (1..=256).contains(&v.len())
                    && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if !ok {
                    self.err(
                        &k("webhook_secret"),
                        "Telegram accepts 1 to 256 characters from A-Z, a-z, 0-9, `_` and `-` (value not shown)",
                    );
                }
                if mode == TelegramMode::Poll {
                    self.err(&k("webhook_secret"), "only valid with mode = \"webhook\"");
                }
                Some(s)
            }
            Got::Bad => None,
            Got::Missing => {
                if mode == TelegramMode::Webhook {
                    self.err(
                        &k("webhook_secret"),
                        "required for mode = \"webhook\": set webhook_secret, webhook_secret_env or webhook_secret_file (Telegram echoes it in X-Telegram-Bot-Api-Secret-Token)",
                    );
                }
                None
            }
        };
        let set_webhook = self.boolean(&k("set_webhook"), raw.set_webhook.as_ref(), false);
        if set_webhook && mode == TelegramMode::Poll {
            self.err(&k("set_webhook"), "only valid with mode = \"webhook\"");
        }
        let public_url = raw.public_url.as_ref().map(|t| self.http_url(&k("public_url"), t));
        if set_webhook && public_url.is_none() {
            self.err(
                &k("public_url"),
                "required when set_webhook = true: the public base URL of the HTTP ingress (https://...)",
            );
        }
        let chat_interval =
            self.duration(&k("chat_interval"), raw.chat_interval.as_ref(), Duration::from_secs(1), true);
        let bot_rate = self.uint(&k("bot_rate"), raw.bot_rate.as_ref(), 30, 1, 10_000);
        TelegramConfig {
            name: name.to_string(),
            agent,
            token,
            mode,
            api_base,
            allowed_updates,
            poll_timeout: Duration::from_secs(poll_timeout.as_secs()),
            webhook_secret,
            set_webhook,
            public_url: public_url.map(|u| u.trim_end_matches('/').to_string()),
            chat_interval,
            bot_rate: u32::try_from(bot_rate).unwrap_or(30),
        }
    }

    /// A channel's `agent` key: required, and naming a configured agent.
    pub(super) fn channel_agent(&mut self, key: &str, t: Option<&Text>, agent_ids: &[String], what: &str) -> String {
        let Some(t) = t else {
            self.err(key, format!("required: the id of the agent that receives {what}"));
            return String::new();
        };
        let a = t.as_str().trim().to_string();
        if !agent_ids.contains(&a) {
            let known = if agent_ids.is_empty() {
                "no agents are configured".to_string()
            } else {
                let ids: Vec<String> = agent_ids.iter().map(|id| display_key("", id)).collect();
                format!("configured agents: {}", ids.join(", "))
            };
            self.err(key, format!("unknown agent {a:?}; {known}"));
        }
        a
    }

    /// `true` / `false` (TOML booleans, or strings from the environment).
    pub(super) fn boolean(&mut self, key: &str, t: Option<&Text>, default: bool) -> bool {
        let Some(t) = t else { return default };
        match t.as_str().trim().to_ascii_lowercase().as_str() {
            "true" => true,
            "false" => false,
            other => {
                self.err(key, format!("invalid boolean {other:?}: expected true or false"));
                default
            }
        }
    }
}

/// `<digits>:<[A-Za-z0-9_-]+>`: the shape @BotFather hands out. Checked because the token
/// becomes a URL path segment (`/bot<token>/getUpdates`).
fn valid_bot_token(t: &str) -> bool {
    match t.split_once(':') {
        Some((id, secret)) => {
            !id.is_empty()
                && id.len() <= 20
                && id.chars().all(|c| c.is_ascii_digit())
                && !secret.is_empty()
                && secret.len() <= 200
                && secret.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::valid_bot_token;

    #[test]
    fn bot_token_shape() {
        assert!(valid_bot_token("123456:ABC-def_1"));
        assert!(!valid_bot_token("123456"));
        assert!(!valid_bot_token("abc:def"));
        assert!(!valid_bot_token("1:a/b"));
        assert!(!valid_bot_token(":x"));
    }
}
