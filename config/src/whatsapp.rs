//! `[whatsapp.<name>]`: one WhatsApp Business phone number per table — its raw serde shape,
//! resolved type and validation. Declared as a child of `validate` to share its error collection.

use std::collections::BTreeMap;

use figment::value::Value;
use serde::Deserialize;

use super::{Ctx, Got, display_key, valid_name};
use crate::Secret;
use crate::raw::Text;

/// Meta's Graph API base URL, used when `graph_base` is not set.
pub const DEFAULT_GRAPH_BASE: &str = "https://graph.facebook.com";
/// Graph API version used when `api_version` is not set.
pub const DEFAULT_API_VERSION: &str = "v23.0";

/// One `[whatsapp.<name>]` entry: a Cloud API phone number whose messages go to one agent.
#[derive(Clone, Debug)]
pub struct WhatsAppConfig {
    /// Instance name from the table key; also the event's channel name and the URL segment of
    /// `/whatsapp/<name>`.
    pub name: String,
    /// Agent that receives the messages and may send through this number.
    pub agent: String,
    /// App secret: key of the `X-Hub-Signature-256` HMAC over each webhook body.
    pub app_secret: Secret,
    /// Token echoed back in the `GET` verification handshake (`hub.verify_token`).
    pub verify_token: Secret,
    /// Bearer token for Graph API sends.
    pub access_token: Secret,
    /// The business phone number id sends go out from.
    pub phone_number_id: String,
    /// Graph API base URL (configurable so tests can point at a fake).
    pub graph_base: String,
    /// Graph API version path segment (`v23.0`).
    pub api_version: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawWhatsApp {
    pub agent: Option<Text>,
    pub app_secret: Option<Text>,
    pub app_secret_env: Option<Text>,
    pub app_secret_file: Option<Text>,
    pub verify_token: Option<Text>,
    pub verify_token_env: Option<Text>,
    pub verify_token_file: Option<Text>,
    pub access_token: Option<Text>,
    pub access_token_env: Option<Text>,
    pub access_token_file: Option<Text>,
    pub phone_number_id: Option<Text>,
    pub graph_base: Option<Text>,
    pub api_version: Option<Text>,
}

impl Ctx<'_> {
    pub(super) fn whatsapp(&mut self, v: Option<&Value>, agent_ids: &[String]) -> BTreeMap<String, WhatsAppConfig> {
        let mut out = BTreeMap::new();
        let Some(v) = v else { return out };
        let Some(dict) = v.as_dict() else {
            self.err("whatsapp", "expected a table of phone numbers ([whatsapp.<name>])");
            return out;
        };
        let mut numbers: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in dict {
            let path = display_key("whatsapp", name);
            if !valid_name(name) {
                self.err(&path, "invalid name: use 1 to 64 characters from A-Z, a-z, 0-9, `_` and `-`");
                continue;
            }
            let Some(raw) = self.section::<RawWhatsApp>(&path, Some(value)) else {
                continue;
            };
            let wa = self.whatsapp_number(&path, name, raw, agent_ids);
            if !wa.phone_number_id.is_empty() {
                if let Some(first) = numbers.get(&wa.phone_number_id) {
                    self.err(
                        &format!("{path}.phone_number_id"),
                        format!(
                            "already configured for {}: one owner per phone number",
                            display_key("whatsapp", first)
                        ),
                    );
                    continue;
                }
                numbers.insert(wa.phone_number_id.clone(), name.clone());
            }
            out.insert(name.clone(), wa);
        }
        out
    }

    fn whatsapp_number(&mut self, p: &str, name: &str, raw: RawWhatsApp, agent_ids: &[String]) -> WhatsAppConfig {
        let k = |key: &str| format!("{p}.{key}");
        let agent = self.channel_agent(&k("agent"), raw.agent.as_ref(), agent_ids, "this number's messages");
        let required =
            |cx: &mut Self, key: &str, inline: Option<&Text>, env: Option<&Text>, file: Option<&Text>| match cx
                .secret(p, key, inline, env, file)
            {
                Got::Found(s) => s,
                Got::Bad => Secret::new(""),
                Got::Missing => {
                    cx.err(&k(key), format!("required: set {key}, {key}_env or {key}_file"));
                    Secret::new("")
                }
            };
        let app_secret = required(
            self,
            "app_secret",
            raw.app_secret.as_ref(),
            raw.app_secret_env.as_ref(),
            raw.app_secret_file.as_ref(),
        );
        let verify_token = required(
            self,
            "verify_token",
            raw.verify_token.as_ref(),
            raw.verify_token_env.as_ref(),
            raw.verify_token_file.as_ref(),
        );
        let access_token = required(
            self,
            "access_token",
            raw.access_token.as_ref(),
            raw.access_token_env.as_ref(),
            raw.access_token_file.as_ref(),
        );
        let phone_number_id = self.required_string(
            &k("phone_number_id"),
            raw.phone_number_id.as_ref(),
            "(the Cloud API phone number id sends go out from)",
        );
        if !phone_number_id.is_empty() && !phone_number_id.chars().all(|c| c.is_ascii_digit()) {
            self.err(&k("phone_number_id"), "must be the numeric phone number id (not the phone number itself)");
        }
        let graph_base = match raw.graph_base.as_ref() {
            None => DEFAULT_GRAPH_BASE.to_string(),
            Some(t) => self.http_url(&k("graph_base"), t).trim_end_matches('/').to_string(),
        };
        let api_version = self.string(&k("api_version"), raw.api_version.as_ref(), DEFAULT_API_VERSION);
        let version_ok = api_version.strip_prefix('v').and_then(|r| r.split_once('.')).is_some_and(|(a, b)| {
            !a.is_empty() && !b.is_empty() && (a.to_string() + b).chars().all(|c| c.is_ascii_digit())
        });
        if !version_ok {
            self.err(&k("api_version"), format!("invalid Graph API version {api_version:?}: expected e.g. \"v23.0\""));
        }
        WhatsAppConfig {
            name: name.to_string(),
            agent,
            app_secret,
            verify_token,
            access_token,
            phone_number_id,
            graph_base,
            api_version,
        }
    }
}
