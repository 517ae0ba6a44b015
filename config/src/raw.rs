//! Raw serde shapes of the TOML schema. Scalars are read as [`Text`] and parsed during
//! validation, so one bad value does not hide the other problems of its section. These types
//! hold secrets as given, so they deliberately do not implement `Debug`.

use std::collections::BTreeMap;
use std::fmt;

use figment::value::Value;
use serde::Deserialize;
use serde::de::{self, Visitor};

/// Any scalar (string, integer, float, bool) kept as text. Integers from TOML and strings
/// from the environment look the same here; validation parses them.
#[derive(Clone)]
pub(crate) struct Text(pub(crate) String);

impl Text {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text, E> {
                Ok(Text(v))
            }
            fn visit_char<E: de::Error>(self, v: char) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Text, E> {
                // `{:?}` keeps the decimal point, so `1.0` is not mistaken for an integer.
                Ok(Text(format!("{v:?}")))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawServer {
    pub quic_listen: Option<Text>,
    pub http_listen: Option<Text>,
    pub admin_listen: Option<Text>,
    pub admin_token: Option<Text>,
    pub admin_token_env: Option<Text>,
    pub admin_token_file: Option<Text>,
    pub admin_read_token: Option<Text>,
    pub admin_read_token_env: Option<Text>,
    pub admin_read_token_file: Option<Text>,
    pub metrics_agent_labels: Option<Text>,
    pub public_addr: Option<Text>,
    pub server_name: Option<Text>,
    pub data_dir: Option<Text>,
    pub max_frame: Option<Text>,
    pub max_body: Option<Text>,
    pub shutdown_grace: Option<Text>,
    pub shutdown_delay: Option<Text>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawTls {
    pub cert: Option<Text>,
    pub key: Option<Text>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawStore {
    pub backend: Option<Text>,
    pub path: Option<Text>,
    pub url: Option<Text>,
    pub url_env: Option<Text>,
    pub url_file: Option<Text>,
    pub dedupe_ttl: Option<Text>,
    pub retain_acked: Option<Text>,
    pub send_ttl: Option<Text>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawAgent {
    pub token: Option<Text>,
    pub token_env: Option<Text>,
    pub token_file: Option<Text>,
    pub token_sha256: Option<Text>,
    pub window: Option<Text>,
    pub max_pending: Option<Text>,
    /// Parsed separately into [`RawWake`] so its errors are reported alongside the agent's.
    pub wake: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawWake {
    pub driver: Option<Text>,
    pub policy: Option<Text>,
    pub connect_timeout: Option<Text>,
    pub max_attempts: Option<Text>,
    pub backoff_initial: Option<Text>,
    pub backoff_max: Option<Text>,
    pub unreachable_retry: Option<Text>,
    pub sleep_after: Option<Text>,
    // exec
    pub command: Option<Vec<Text>>,
    pub env: Option<BTreeMap<String, Text>>,
    pub settle: Option<Text>,
    pub stop_command: Option<Vec<Text>>,
    // http
    pub url: Option<Text>,
    pub secret: Option<Text>,
    pub secret_env: Option<Text>,
    pub secret_file: Option<Text>,
    pub timeout: Option<Text>,
    // fly
    pub api_base: Option<Text>,
    pub app: Option<Text>,
    pub machine: Option<Text>,
    pub api_token: Option<Text>,
    pub api_token_env: Option<Text>,
    pub api_token_file: Option<Text>,
    pub wait_timeout: Option<Text>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawWebhook {
    pub agent: Option<Text>,
    pub verify: Option<Text>,
    pub secret: Option<Text>,
    pub secret_env: Option<Text>,
    pub secret_file: Option<Text>,
    pub hmac_header: Option<Text>,
    pub max_body: Option<Text>,
    pub reply_url: Option<Text>,
    pub reply_secret: Option<Text>,
    pub reply_secret_env: Option<Text>,
    pub reply_secret_file: Option<Text>,
}
