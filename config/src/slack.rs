//! `[slack.<name>]`: one Slack app per table — its raw serde shape, resolved type and
//! validation. Declared as a child of `validate` so it shares that module's error collection.

use std::collections::BTreeMap;
use std::time::Duration;

use figment::value::Value;
use serde::Deserialize;

use super::{ChannelTable, Ctx, Got};
use crate::Secret;
use crate::raw::Text;

/// Slack's Web API base URL, used when `api_base` is not set.
pub const DEFAULT_API_BASE: &str = "https://slack.com/api";

/// Longest `chat_interval` accepted.
const MAX_CHAT_INTERVAL: Duration = Duration::from_secs(60);

/// How a Slack app receives events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlackMode {
    /// Concierge holds a Socket Mode WebSocket itself (no public address needed).
    Socket,
    /// Slack POSTs events to `POST /slack/<name>` on the HTTP ingress (Events API).
    Events,
}

/// One `[slack.<name>]` entry: a Slack app whose events go to one agent.
#[derive(Clone, Debug)]
pub struct SlackConfig {
    /// Instance name from the table key; also the event's channel name and the URL segment of
    /// `/slack/<name>`.
    pub name: String,
    /// Agent that receives the app's events and may send through it.
    pub agent: String,
    /// App-level token (`xapp-...`) for `apps.connections.open`; required in socket mode.
    pub app_token: Option<Secret>,
    /// Bot token (`xoxb-...`) for Web API sends.
    pub bot_token: Secret,
    /// Signing secret for the Events API's v0 signatures; required in events mode.
    pub signing_secret: Option<Secret>,
    /// Socket Mode or the HTTP Events API.
    pub mode: SlackMode,
    /// Web API base URL (configurable so tests can point at a fake).
    pub api_base: String,
    /// Least time between two `chat.postMessage` calls to one channel (Slack: about one per
    /// second per channel); zero keeps only the per-channel order. Same key as Telegram's.
    pub chat_interval: Duration,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawSlack {
    pub agent: Option<Text>,
    pub app_token: Option<Text>,
    pub app_token_env: Option<Text>,
    pub app_token_file: Option<Text>,
    pub bot_token: Option<Text>,
    pub bot_token_env: Option<Text>,
    pub bot_token_file: Option<Text>,
    pub signing_secret: Option<Text>,
    pub signing_secret_env: Option<Text>,
    pub signing_secret_file: Option<Text>,
    pub mode: Option<Text>,
    pub api_base: Option<Text>,
    pub chat_interval: Option<Text>,
}

impl Ctx<'_> {
    pub(super) fn slack(&mut self, v: Option<&Value>, agent_ids: &[String]) -> BTreeMap<String, SlackConfig> {
        let spec = ChannelTable {
            section: "slack",
            instances: "Slack apps",
            token_key: "app_token",
            token_kind: "app token",
            why_one_owner: "one owner per Slack app (Slack spreads events over every open socket)",
        };
        let build = |ctx: &mut Self, path: &str, name: &str, raw: RawSlack| ctx.slack_app(path, name, raw, agent_ids);
        self.channel_table(&spec, v, build, |app: &SlackConfig| app.app_token.as_ref().map(|t| t.expose()))
    }

    fn slack_app(&mut self, p: &str, name: &str, raw: RawSlack, agent_ids: &[String]) -> SlackConfig {
        let k = |key: &str| format!("{p}.{key}");
        let agent = self.channel_agent(&k("agent"), raw.agent.as_ref(), agent_ids, "this app's events");
        let mode = match self.choice(&k("mode"), raw.mode.as_ref(), &["socket", "events"]) {
            Some("events") => SlackMode::Events,
            _ => SlackMode::Socket,
        };
        let token = |cx: &mut Self, key: &str, prefix: &str, inline: Option<&Text>, env, file| match cx
            .secret(p, key, inline, env, file)
        {
            Got::Found(s) => {
                let ok = s.expose().starts_with(prefix)
                    && s.expose().len() <= 512
                    && s.expose().chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                if !ok {
                    cx.err(&k(key), format!("not a Slack {key}: expected \"{prefix}...\" (value not shown)"));
                }
                Some(s)
            }
            Got::Bad | Got::Missing => None,
        };
        let app_token = token(
            self,
            "app_token",
            "xapp-",
            raw.app_token.as_ref(),
            raw.app_token_env.as_ref(),
            raw.app_token_file.as_ref(),
        );
        let bot_token = token(
            self,
            "bot_token",
            "xoxb-",
            raw.bot_token.as_ref(),
            raw.bot_token_env.as_ref(),
            raw.bot_token_file.as_ref(),
        );
        let bot_token = bot_token.unwrap_or_else(|| {
            self.err(&k("bot_token"), "required: set bot_token, bot_token_env or bot_token_file (xoxb-..., for sends)");
            Secret::new("")
        });
        if mode == SlackMode::Socket && app_token.is_none() {
            self.err(
                &k("app_token"),
                "required for mode = \"socket\": set app_token, app_token_env or app_token_file (xapp-..., with connections:write)",
            );
        }
        let signing_secret = match self.secret(
            p,
            "signing_secret",
            raw.signing_secret.as_ref(),
            raw.signing_secret_env.as_ref(),
            raw.signing_secret_file.as_ref(),
        ) {
            Got::Found(s) => Some(s),
            Got::Bad => None,
            Got::Missing => {
                if mode == SlackMode::Events {
                    self.err(
                        &k("signing_secret"),
                        "required for mode = \"events\": set signing_secret, signing_secret_env or signing_secret_file (the app's Signing Secret)",
                    );
                }
                None
            }
        };
        let api_base = match raw.api_base.as_ref() {
            None => DEFAULT_API_BASE.to_string(),
            Some(t) => self.http_url(&k("api_base"), t).trim_end_matches('/').to_string(),
        };
        // Zero is allowed (as for Telegram): sends to one channel still leave in order, the
        // app-wide rate still applies and Slack's 429s are still waited out.
        let chat_interval =
            self.duration(&k("chat_interval"), raw.chat_interval.as_ref(), Duration::from_secs(1), true);
        if chat_interval > MAX_CHAT_INTERVAL {
            self.err(
                &k("chat_interval"),
                "must be at most 1m (Slack's pace is about one message per second per channel; a longer wait only stalls the agent's sends)",
            );
        }
        SlackConfig {
            name: name.to_string(),
            agent,
            app_token,
            bot_token,
            signing_secret,
            mode,
            api_base,
            chat_interval: chat_interval.min(MAX_CHAT_INTERVAL),
        }
    }
}
