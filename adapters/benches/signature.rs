//! Webhook signature check micro-benchmarks on 1 KiB bodies: Standard Webhooks
//! (`standard_verify`) and single-header hex HMAC (`body_verify_hex`, GitHub/WhatsApp style).
//! Run with `cargo bench -p concierge-adapters --bench signature`.

use std::hint::black_box;
use std::time::Duration;

use concierge_adapters::signature;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn bench_verify(c: &mut Criterion) {
    let body = vec![b'x'; 1024];
    let secret = signature::secret_bytes("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    let now = 1_700_000_000i64;
    let sig = signature::standard_sign(&secret, "msg_1", now, &body);
    let ts = now.to_string();
    let hex_sig = format!("sha256={}", signature::body_sign_hex(&secret, &body));
    let secrets = vec![secret.clone()];

    let mut g = c.benchmark_group("signature_1KiB");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("standard_verify", |b| {
        b.iter(|| {
            signature::standard_verify(black_box(&secrets), Some("msg_1"), Some(&ts), Some(&sig), black_box(&body), now)
                .expect("valid signature")
        })
    });
    g.bench_function("body_verify_hex", |b| {
        b.iter(|| {
            signature::body_verify_hex(black_box(&secret), Some(&hex_sig), "x-hub-signature-256", black_box(&body))
                .expect("valid signature")
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(20)
}

criterion_group! { name = benches; config = config(); targets = bench_verify }
criterion_main!(benches);
