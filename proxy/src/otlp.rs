//! The binary's logging set-up, with optional OTLP span export (`[telemetry] otlp_endpoint`).
//!
//! Logs always go to stderr (`RUST_LOG`, default `info,quinn=warn`). When an endpoint is
//! configured, Concierge's own spans (ingest -> store, wake, replay; debug-level ones
//! included) and the events inside them are also batched and POSTed as OTLP/HTTP protobuf to
//! `<otlp_endpoint>/v1/traces`. Batching follows the standard `OTEL_BSP_*` environment
//! variables (e.g. `OTEL_BSP_SCHEDULE_DELAY`, milliseconds, default 5000).
//!
//! While exporting, each stored event carries its ingest span's W3C `traceparent` in its
//! `meta` (so the agent can continue the trace too), and the replay span that delivers it
//! links to it — also when the replay happens after a restart or on another replica.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How long shutdown waits for the last spans to be exported.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The `meta` key of an event's ingest span context (the W3C Trace Context header name).
pub const TRACEPARENT: &str = "traceparent";

/// Set once the exporter runs: only then is span context worth storing and decoding.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are being exported (the hot paths skip all trace bookkeeping otherwise).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// `span`'s context as a W3C `traceparent` (`00-<trace>-<span>-<flags>`), if it has one.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_ref = context.span();
    let sc = span_ref.span_context();
    sc.is_valid().then(|| format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
}

/// Parses a version-00 `traceparent`; `None` for anything malformed or all-zero.
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.split('-');
    let (Some("00"), Some(trace), Some(span), Some(flags), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?);
    let sc = SpanContext::new(trace, span, flags, true, TraceState::default());
    sc.is_valid().then_some(sc)
}

/// Links `span` to the ingest spans of the events it delivers (their stored `traceparent`s).
pub fn link_to_ingest<'a>(span: &tracing::Span, traceparents: impl IntoIterator<Item = &'a str>) {
    for sc in traceparents.into_iter().filter_map(parse_traceparent) {
        span.add_link(sc);
    }
}

fn env_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,quinn=warn".into())
}

/// Logging only (every command but `serve` with telemetry).
pub fn init_logging() {
    tracing_subscriber::fmt().with_env_filter(env_filter()).with_writer(std::io::stderr).init();
}

/// Logging plus, when `telemetry.otlp_endpoint` is set, the OTLP exporter (errors name `source`,
/// the configuration file). Must run inside
/// the Tokio runtime (the batch exporter is a Tokio task). Returns the provider to flush
/// with [`shutdown`].
pub fn init(
    source: &std::path::Path,
    telemetry: &concierge_config::TelemetryConfig,
) -> anyhow::Result<Option<SdkTracerProvider>> {
    let Some(url) = telemetry.otlp_traces_url() else {
        init_logging();
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url.as_str())
        .build()
        .map_err(|e| {
            let origin = source.display();
            match e {
                // Not echoed: the URL may carry credentials.
                opentelemetry_otlp::ExporterBuildError::InvalidUri(..) => {
                    anyhow::anyhow!("{origin}: telemetry.otlp_endpoint: not a valid URL")
                }
                e => anyhow::anyhow!("{origin}: telemetry.otlp_endpoint: cannot create the OTLP exporter: {e}"),
            }
        })?;
    let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
        exporter,
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    let provider = SdkTracerProvider::builder()
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(telemetry.service_name.clone()).build())
        .with_span_processor(processor)
        .build();
    // Only Concierge's own spans and events: never the exporter's HTTP stack (no feedback loop)
    // nor chatty dependencies. Spans down to debug (store, replay), events down to info.
    let otel_filter = tracing_subscriber::filter::filter_fn(|m| {
        m.target().starts_with("concierge")
            && if m.is_span() { *m.level() <= Level::DEBUG } else { *m.level() <= Level::INFO }
    });
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("concierge")).with_filter(otel_filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(env_filter());
    tracing_subscriber::registry().with(fmt).with(otel).init();
    EXPORTING.store(true, Ordering::Relaxed);
    tracing::info!(endpoint = %url, service = %telemetry.service_name, "exporting spans over OTLP/HTTP");
    Ok(Some(provider))
}

/// Flushes the spans still queued and stops the exporter (bounded by [`FLUSH_TIMEOUT`]).
pub async fn shutdown(provider: SdkTracerProvider) {
    // `shutdown` blocks until the batch task (on this runtime) has exported: keep it off the
    // async workers.
    let done = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT));
    match tokio::time::timeout(FLUSH_TIMEOUT + Duration::from_secs(1), done).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => eprintln!("warning: flushing OTLP spans: {e}"),
        Ok(Err(e)) => eprintln!("warning: flushing OTLP spans: {e}"),
        Err(_) => eprintln!("warning: flushing OTLP spans timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_only_when_well_formed() {
        let sc = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?} must not parse");
        }
    }
}
