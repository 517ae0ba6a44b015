//! SMTP acceptance benchmark: N concurrent sessions each deliver messages of a given size to a
//! running SMTP server (Concierge, or Postfix as the peer) and count the 250s after the final
//! dot, i.e. messages the server says are durably stored.
//!
//! `cargo run --release -p concierge-loadtest --example smtp_bench -- 127.0.0.1:2525 support@example.com 10 2000 10240`
//! (address, recipient, sessions, total messages, message bytes).
//! `loadtest/scripts/smtp_peer.sh` runs it against Concierge (Redis `appendfsync always` and
//! `everysec`) and a private Postfix side by side; figures in BENCHMARKS.md, "Email".

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

async fn reply(r: &mut BufReader<TcpStream>) -> anyhow::Result<String> {
    let mut all = String::new();
    for _ in 0..64 {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            anyhow::bail!("server closed the connection");
        }
        all.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(all);
        }
    }
    anyhow::bail!("reply too long")
}

async fn expect(r: &mut BufReader<TcpStream>, code: &str) -> anyhow::Result<()> {
    let got = reply(r).await?;
    anyhow::ensure!(got.starts_with(code), "expected {code}, got {got:?}");
    Ok(())
}

async fn session(addr: String, rcpt: String, count: usize, size: usize, id: usize) -> anyhow::Result<usize> {
    let stream = TcpStream::connect(&addr).await?;
    let mut r = BufReader::new(stream);
    expect(&mut r, "220").await?;
    r.get_mut().write_all(b"EHLO bench.test\r\n").await?;
    expect(&mut r, "250").await?;
    let line = format!("{}\r\n", "x".repeat(98));
    let body_lines = size / line.len();
    let mut ok = 0;
    for n in 0..count {
        let mut msg = format!("MAIL FROM:<bench@bench.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n");
        r.get_mut().write_all(msg.as_bytes()).await?;
        expect(&mut r, "250").await?;
        expect(&mut r, "250").await?;
        expect(&mut r, "354").await?;
        msg = format!(
            "From: bench@bench.test\r\nTo: {rcpt}\r\nMessage-ID: <{id}.{n}.{}@bench.test>\r\nSubject: bench\r\n\r\n",
            std::process::id()
        );
        for _ in 0..body_lines {
            msg.push_str(&line);
        }
        msg.push_str(".\r\n");
        r.get_mut().write_all(msg.as_bytes()).await?;
        expect(&mut r, "250").await?;
        ok += 1;
    }
    r.get_mut().write_all(b"QUIT\r\n").await?;
    let _ = tokio::time::timeout(Duration::from_secs(2), reply(&mut r)).await;
    Ok(ok)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = args.first().cloned().unwrap_or_else(|| "127.0.0.1:2525".into());
    let rcpt = args.get(1).cloned().unwrap_or_else(|| "support@example.com".into());
    let sessions: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10).clamp(1, 1000);
    let total: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2000).clamp(1, 1_000_000);
    let size: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(10 * 1024).clamp(100, 10 << 20);
    let per = total.div_ceil(sessions);
    let started = Instant::now();
    let tasks: Vec<_> =
        (0..sessions).map(|i| tokio::spawn(session(addr.clone(), rcpt.clone(), per, size, i))).collect();
    let (mut stored, mut failed) = (0, 0);
    for t in tasks {
        match t.await? {
            Ok(n) => stored += n,
            Err(e) => {
                if failed == 0 {
                    eprintln!("session failed: {e}");
                }
                failed += 1;
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {sessions} sessions failed");
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"sessions\":{sessions},\"messages\":{stored},\"bytes\":{size},\"seconds\":{secs:.3},\"per_second\":{:.1}}}",
        stored as f64 / secs
    );
    Ok(())
}
