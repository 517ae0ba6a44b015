//! `[telemetry]`: optional export of the proxy's `tracing` spans (ingest -> store, wake,
//! replay) to an OpenTelemetry collector over OTLP/HTTP (protobuf). Absent = no export.
//! A child of `validate`, sharing its error collection.

use figment::value::Value;
use serde::Deserialize;

use super::Ctx;
use crate::raw::Text;

/// `service.name` reported with every span when `service_name` is not set.
pub const DEFAULT_SERVICE_NAME: &str = "concierge";
/// Path of the OTLP/HTTP traces endpoint under a collector's base URL.
pub const OTLP_TRACES_PATH: &str = "/v1/traces";

/// The `[telemetry]` section.
#[derive(Clone, Debug, Default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP collector base URL (`http://127.0.0.1:4318`); `None` = spans are not exported.
    pub otlp_endpoint: Option<String>,
    /// `service.name` resource attribute (default `concierge`).
    pub service_name: String,
}

impl TelemetryConfig {
    /// The URL spans are POSTed to: `otlp_endpoint` + `/v1/traces` (unless it already ends so),
    /// as OTLP's `OTEL_EXPORTER_OTLP_ENDPOINT` does. `None` when export is off.
    pub fn otlp_traces_url(&self) -> Option<String> {
        let base = self.otlp_endpoint.as_deref()?.trim_end_matches('/');
        if base.ends_with(OTLP_TRACES_PATH) {
            Some(base.to_string())
        } else {
            Some(format!("{base}{OTLP_TRACES_PATH}"))
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawTelemetry {
    pub otlp_endpoint: Option<Text>,
    pub service_name: Option<Text>,
}

impl Ctx<'_> {
    pub(super) fn telemetry(&mut self, v: Option<&Value>) -> TelemetryConfig {
        let raw: RawTelemetry = self.section("telemetry", v).unwrap_or_default();
        let otlp_endpoint = raw.otlp_endpoint.as_ref().map(|t| self.http_url("telemetry.otlp_endpoint", t));
        let service_name = self.string("telemetry.service_name", raw.service_name.as_ref(), DEFAULT_SERVICE_NAME);
        TelemetryConfig { otlp_endpoint: otlp_endpoint.filter(|u| !u.is_empty()), service_name }
    }
}
