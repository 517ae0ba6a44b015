//! Frame codec micro-benchmarks: encoding and incremental decoding of a `Deliver` batch of
//! 512 × 1 KiB events (the replay hot path) and of small control frames (`Ack`, `Credit`).
//! Run with `cargo bench -p concierge-protocol --bench frame`.

use std::hint::black_box;
use std::time::Duration;

use concierge_protocol::frame::{self, DEFAULT_MAX_FRAME, Decoder};
use concierge_protocol::{EventRecord, ToAgent, ToProxy};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn deliver_batch() -> ToAgent {
    let events = (0..512u64)
        .map(|i| EventRecord { offset: 1_000_000 + i, received_at_ms: 1_700_000_000_000 + i, record: vec![b'x'; 1024] })
        .collect();
    ToAgent::Deliver { events }
}

fn bench_deliver(c: &mut Criterion) {
    let batch = deliver_batch();
    let wire = frame::encode(&batch);
    let mut g = c.benchmark_group("deliver_512x1KiB");
    g.throughput(Throughput::Elements(512));
    g.bench_function("encode", |b| b.iter(|| black_box(frame::encode(black_box(&batch)))));
    g.bench_function("decode", |b| {
        b.iter(|| {
            let mut d = Decoder::new(DEFAULT_MAX_FRAME);
            // Arrives in QUIC-sized chunks, as on a stream.
            for chunk in wire.chunks(16 * 1024) {
                d.push(chunk);
            }
            let f: ToAgent = d.next_frame().expect("valid").expect("complete");
            black_box(f)
        })
    });
    g.finish();
}

fn bench_small(c: &mut Criterion) {
    let frames: Vec<ToProxy> = (0..64u64)
        .map(|i| if i % 2 == 0 { ToProxy::Ack { up_to: 1_000_000 + i } } else { ToProxy::Credit { window: 4096 } })
        .collect();
    let wire: Vec<u8> = frames.iter().flat_map(frame::encode).collect();
    let mut g = c.benchmark_group("small_frames_x64");
    g.throughput(Throughput::Elements(frames.len() as u64));
    g.bench_function("encode", |b| {
        b.iter(|| {
            for f in &frames {
                black_box(frame::encode(black_box(f)));
            }
        })
    });
    g.bench_function("decode", |b| {
        b.iter(|| {
            let mut d = Decoder::new(DEFAULT_MAX_FRAME);
            d.push(&wire);
            let mut n = 0;
            while let Some(f) = d.next_frame::<ToProxy>().expect("valid") {
                black_box(f);
                n += 1;
            }
            assert_eq!(n, 64);
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(20)
}

criterion_group! { name = benches; config = config(); targets = bench_deliver, bench_small }
criterion_main!(benches);
