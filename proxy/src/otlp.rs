//! The binary's logging set-up, with optional OTLP span export (`[telemetry] otlp_endpoint`).
//!
//! Logs always go to stderr (`RUST_LOG`, default `info,quinn=warn`). When an endpoint is
//! configured, Concierge's own spans (ingest -> store, wake, replay; debug-level ones
//! included) and the events inside them are also batched and POSTed as OTLP/HTTP protobuf to
//! `<otlp_endpoint>/v1/traces`. Batching follows the standard `OTEL_BSP_*` environment
//! variables (e.g. `OTEL_BSP_SCHEDULE_DELAY`, milliseconds, default 5000).

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How long shutdown waits for the last spans to be exported.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

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
