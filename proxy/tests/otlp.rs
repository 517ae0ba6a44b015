//! `[telemetry] otlp_endpoint`: the real binary exports its spans as OTLP/HTTP protobuf to a
//! collector stand-in, flushes them on graceful shutdown, and exports nothing when unset.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// A stand-in OTLP/HTTP collector: records the body of every `POST /v1/traces`.
struct Collector {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Collector {
    async fn start() -> Collector {
        let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let store = bodies.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let store = store.clone();
                async move {
                    store.lock().unwrap().push(body.to_vec());
                    // An empty ExportTraceServiceResponse is an empty protobuf message.
                    ([("content-type", "application/x-protobuf")], Vec::<u8>::new())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Collector { addr, bodies }
    }

    fn requests(&self) -> usize {
        self.bodies.lock().unwrap().len()
    }

    /// Whether some export so far is non-empty and contains every one of `needles`.
    fn exported(&self, needles: &[&str]) -> bool {
        self.bodies.lock().unwrap().iter().any(|b| !b.is_empty() && needles.iter().all(|n| contains(b, n.as_bytes())))
    }

    async fn wait_for(&self, needles: &[&str], within: Duration) -> bool {
        eventually(within, || async { self.exported(needles).then_some(()) }).await.is_some()
    }
}

/// One exported span, as the collector decoded it.
struct Exported {
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    /// (trace id, span id) of each link.
    links: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Collector {
    /// Every span exported so far, decoded from the OTLP protobuf bodies.
    fn spans(&self) -> Vec<Exported> {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message as _;
        let bodies = self.bodies.lock().unwrap().clone();
        let mut spans = Vec::new();
        for body in bodies {
            let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("exports are valid OTLP protobuf");
            for span in request.resource_spans.into_iter().flat_map(|r| r.scope_spans).flat_map(|s| s.spans) {
                spans.push(Exported {
                    name: span.name,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    links: span.links.into_iter().map(|l| (l.trace_id, l.span_id)).collect(),
                });
            }
        }
        spans
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn config(dir: &std::path::Path, telemetry: &str) -> std::path::PathBuf {
    let body = format!("{}\n{}\n{telemetry}", self_connecting_agent("a"), webhook_route("in", "a", ""));
    write_config(dir, &Backend::Embedded, [0, 0, 0], &body)
}

async fn post_one(proxy: &Proxy, text: &str) {
    let (status, json) = proxy.post("a", "in", &format!("{{\"text\":\"{text}\"}}"), None).await;
    assert!((200..300).contains(&status), "webhook accepted: {status} {json}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ingest_spans_are_exported_when_configured() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let telemetry =
        format!("[telemetry]\notlp_endpoint = \"http://{}\"\nservice_name = \"concierge-otlp-test\"\n", collector.addr);
    let mut proxy = Proxy::start_with_env(&config(dir.path(), &telemetry), &[("OTEL_BSP_SCHEDULE_DELAY", "200")]);
    post_one(&proxy, "hello").await;

    let got = collector.wait_for(&["ingest", "concierge-otlp-test"], Duration::from_secs(10)).await;
    assert!(
        got,
        "no export containing the ingest span within 10s ({} requests); log:\n{}",
        collector.requests(),
        proxy.log()
    );
    assert!(proxy.terminate().success(), "clean exit; log:\n{}", proxy.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn queued_spans_are_flushed_on_graceful_shutdown() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let telemetry = format!("[telemetry]\notlp_endpoint = \"http://{}/\"\n", collector.addr);
    // The batch would not be sent for a minute: only the shutdown flush can deliver it.
    let mut proxy = Proxy::start_with_env(&config(dir.path(), &telemetry), &[("OTEL_BSP_SCHEDULE_DELAY", "60000")]);
    post_one(&proxy, "hello").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(collector.requests(), 0, "nothing exported before the schedule delay");

    assert!(proxy.terminate().success(), "clean exit; log:\n{}", proxy.log());
    // The default service name is reported when `service_name` is not set.
    assert!(
        collector.exported(&["ingest", "concierge"]),
        "the queued ingest span was not flushed at shutdown ({} requests); log:\n{}",
        collector.requests(),
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_is_exported_without_the_switch() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Even with the standard OTLP variables pointing at the collector, no `[telemetry]` = no export.
    let endpoint = format!("http://{}", collector.addr);
    let mut proxy = Proxy::start_with_env(
        &config(dir.path(), ""),
        &[("OTEL_BSP_SCHEDULE_DELAY", "200"), ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)],
    );
    for i in 0..3 {
        post_one(&proxy, &format!("m{i}")).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(proxy.terminate().success(), "clean exit; log:\n{}", proxy.log());
    assert_eq!(collector.requests(), 0, "spans were exported although [telemetry] is not configured");
}

/// Replay links to ingest: each stored event carries its ingest span's `traceparent` (the
/// agent sees it in `meta`), and the replay span that delivers it links to that span.
#[tokio::test(flavor = "multi_thread")]
async fn replay_spans_link_to_the_ingest_spans_of_their_events() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let telemetry = format!("[telemetry]\notlp_endpoint = \"http://{}\"\n", collector.addr);
    let mut proxy = Proxy::start_with_env(&config(dir.path(), &telemetry), &[("OTEL_BSP_SCHEDULE_DELAY", "200")]);
    for i in 0..3 {
        post_one(&proxy, &format!("m{i}")).await;
    }
    let mut client = proxy.connect("a").await;
    let events = receive_n(&mut client, 3, Duration::from_secs(10)).await;
    let traceparents: Vec<String> = events
        .iter()
        .map(|e| {
            let found = e.data.meta.iter().find(|(k, _)| k == "traceparent");
            found
                .unwrap_or_else(|| panic!("event {} has no traceparent in meta: {:?}", e.offset, e.data.meta))
                .1
                .clone()
        })
        .collect();

    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let linked = eventually(Duration::from_secs(10), || async {
        let spans = collector.spans();
        let ingests: Vec<&Exported> = spans.iter().filter(|s| s.name == "ingest").collect();
        let links: Vec<&(Vec<u8>, Vec<u8>)> =
            spans.iter().filter(|s| s.name == "replay").flat_map(|s| s.links.iter()).collect();
        let all_linked = ingests.len() == 3
            && ingests.iter().all(|i| links.iter().any(|(t, s)| *t == i.trace_id && *s == i.span_id));
        all_linked.then(|| ingests.iter().map(|i| format!("00-{}-{}-01", hex(&i.trace_id), hex(&i.span_id))).collect())
    })
    .await;
    let Some(mut expected): Option<Vec<String>> = linked else {
        let names: Vec<String> =
            collector.spans().iter().map(|s| format!("{} ({} links)", s.name, s.links.len())).collect();
        panic!("no replay span linked to all 3 ingest spans within 10s; exported: {names:?}; log:\n{}", proxy.log());
    };
    let mut got = traceparents;
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "each event carries the traceparent of its own ingest span");
    drop(client);
    assert!(proxy.terminate().success(), "clean exit; log:\n{}", proxy.log());
}
