//! `[telemetry]`: the optional OTLP span exporter switch.

use concierge_config::{ConfigErrors, load_str};

const AGENT: &str = "[agents.echo]\ntoken = \"t0ken\"\n";

fn errs(toml: &str) -> ConfigErrors {
    match load_str(toml, "/etc/concierge/test.toml") {
        Ok(c) => panic!("expected errors, got {c:?}"),
        Err(e) => e,
    }
}

#[test]
fn absent_means_off() {
    let c = load_str(AGENT, "test.toml").unwrap();
    assert_eq!(c.telemetry.otlp_endpoint, None);
    assert_eq!(c.telemetry.otlp_traces_url(), None);
    assert_eq!(c.telemetry.service_name, "concierge");
}

#[test]
fn endpoint_and_service_name() {
    let c = load_str(
        &format!("{AGENT}[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318\"\nservice_name = \"edge-1\"\n"),
        "test.toml",
    )
    .unwrap();
    assert_eq!(c.telemetry.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4318"));
    assert_eq!(c.telemetry.otlp_traces_url().as_deref(), Some("http://127.0.0.1:4318/v1/traces"));
    assert_eq!(c.telemetry.service_name, "edge-1");

    // A full traces URL (or a trailing slash) is not doubled.
    for given in ["https://otel.example.com/v1/traces", "https://otel.example.com/"] {
        let c = load_str(&format!("{AGENT}[telemetry]\notlp_endpoint = \"{given}\"\n"), "test.toml").unwrap();
        assert_eq!(c.telemetry.otlp_traces_url().as_deref(), Some("https://otel.example.com/v1/traces"));
    }
}

#[test]
fn bad_values_name_file_and_key() {
    for bad in ["127.0.0.1:4318", "grpc://collector:4317", "http://", "http:// spaces"] {
        let e = errs(&format!("{AGENT}[telemetry]\notlp_endpoint = \"{bad}\"\n"));
        let text = e.to_string();
        assert!(
            text.contains("/etc/concierge/test.toml: telemetry.otlp_endpoint: must be an http:// or https:// URL"),
            "{bad}: {text}"
        );
    }
    let e = errs(&format!("{AGENT}[telemetry]\nservice_name = \"\"\nendpoint = \"http://x\"\n")).to_string();
    assert!(e.contains("/etc/concierge/test.toml: telemetry.service_name: must not be empty"), "{e}");
    assert!(e.contains("/etc/concierge/test.toml: telemetry.endpoint:"), "{e}");
    let e = errs(&format!("telemetry = 1\n{AGENT}")).to_string();
    assert!(e.contains("telemetry: expected a table"), "{e}");
}
