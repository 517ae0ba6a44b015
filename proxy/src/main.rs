//! The `concierge` binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use concierge_proxy::otlp;

/// Concierge: an always-on proxy that lets AI agents sleep without missing a message.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        /// Configuration file (TOML); CONCIERGE_* environment variables override it.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and print every problem found.
    CheckConfig {
        /// Configuration file to check.
        config: PathBuf,
    },
    /// Print a commented example configuration.
    ExampleConfig,
    /// Run a built-in agent (what the exec wake driver starts in the quickstart).
    Agent {
        /// Which agent: `echo`.
        kind: AgentKind,
    },
    /// Print every HTTP request received: a stand-in for the service your replies go to.
    Inbox {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8099")]
        listen: SocketAddr,
    },
}

#[derive(Clone, clap::ValueEnum)]
enum AgentKind {
    /// Echo every text event back to where it came from.
    Echo,
}

fn main() -> std::process::ExitCode {
    keep_freed_heap();
    let cli = Cli::parse();
    // `serve` sets up logging once its configuration (which may switch on span export) is loaded.
    if !matches!(cli.command, Command::Serve { .. }) {
        otlp::init_logging();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::CheckConfig { config } => {
            let config = concierge_config::load(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
            println!(
                "{}: ok ({} agents, {} webhook routes, {} store)",
                config.source.display(),
                config.agents.len(),
                config.webhooks.len(),
                match config.store.backend {
                    concierge_config::StoreBackend::Embedded { .. } => "embedded",
                    concierge_config::StoreBackend::Redis { .. } => "redis",
                }
            );
            Ok(())
        }
        Command::ExampleConfig => {
            print!("{}", concierge_config::EXAMPLE);
            Ok(())
        }
        Command::Serve { config } => serve(config).await,
        Command::Agent { kind: AgentKind::Echo } => {
            let options = concierge_protocol::client::ClientOptions::from_env()?;
            concierge_proxy::echo::run(options).await
        }
        Command::Inbox { listen } => inbox(listen).await,
    }
}

async fn serve(path: PathBuf) -> anyhow::Result<()> {
    let config = concierge_config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let telemetry = otlp::init(&config.source, &config.telemetry)?;
    let running = match concierge_proxy::app::start(config).await {
        Ok(r) => r,
        Err(e) => {
            if let Some(provider) = telemetry {
                otlp::shutdown(provider).await;
            }
            return Err(e);
        }
    };
    // One machine-readable line on stdout: tests and scripts find the bound addresses here.
    println!(
        "{}",
        serde_json::json!({
            "ready": true,
            "quic": running.quic_addr.to_string(),
            "http": running.http_addr.to_string(),
            "admin": running.admin_addr.to_string(),
            "cert_sha256": running.app.fingerprint,
        })
    );
    tracing::info!(quic = %running.quic_addr, http = %running.http_addr, admin = %running.admin_addr, "concierge is running");
    tracing::info!("agent certificate pin (SHA-256): {}", running.app.fingerprint);
    wait_for_signal().await?;
    tracing::info!("shutting down");
    running.shutdown().await;
    if let Some(provider) = telemetry {
        otlp::shutdown(provider).await;
    }
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r.context("installing the SIGINT handler")?,
    }
    Ok(())
}

async fn inbox(listen: SocketAddr) -> anyhow::Result<()> {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, Method, Uri};
    let app = axum::Router::new().fallback(|method: Method, uri: Uri, headers: HeaderMap, body: Bytes| async move {
        let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
        println!("inbox: {method} {uri} webhook-id={id} {}", String::from_utf8_lossy(&body));
        "ok\n"
    });
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    eprintln!("inbox listening on http://{listen}");
    axum::serve(listener, app).await?;
    Ok(())
}

/// glibc's malloc gives the free top of each thread's heap back to the kernel once 128 KiB of
/// it is free, then takes it back on the next burst with `mprotect` and freshly zeroed pages.
/// Under a storm of wakes that churn (`sysmalloc` with its `mprotect` and page faults) was
/// over a tenth of the proxy's CPU. Keeping up to 64 MiB of freed top per heap, and growing
/// 16 MiB at a time, bounds the resident cost and removes the churn (BENCHMARKS.md, session 6).
fn keep_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets allocator parameters; it runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TOP_PAD, 16 << 20);
    }
}
