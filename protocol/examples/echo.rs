//! The example agent: echoes every text event back through the channel it came from.
//!
//! It is what the quickstart wakes (`concierge agent echo` runs this very code). Run it by
//! hand with the environment a wake driver would give it:
//! `CONCIERGE_CONNECT=127.0.0.1:4433 CONCIERGE_AGENT=echo CONCIERGE_TOKEN=... CONCIERGE_CERT_SHA256=... cargo run -p concierge-protocol --example echo`

use std::time::Duration;

use concierge_protocol::SendRequest;
use concierge_protocol::client::{AgentClient, ClientOptions};

/// Says `Idle` after this long without events, so the proxy may put the agent to sleep.
const IDLE_AFTER: Duration = Duration::from_secs(1);

/// Connects, echoes until the proxy asks this agent to drain, then exits.
pub async fn run(options: ClientOptions) -> anyhow::Result<()> {
    let mut agent = AgentClient::connect(options).await?;
    let welcome = agent.welcome();
    eprintln!(
        "echo agent connected: session {} resumes after offset {} with {} waiting",
        welcome.session, welcome.cursor, welcome.backlog
    );
    let mut said_idle = false;
    loop {
        let event = match tokio::time::timeout(IDLE_AFTER, agent.next()).await {
            Err(_) => {
                if !said_idle {
                    agent.idle();
                    said_idle = true;
                }
                continue;
            }
            Ok(next) => match next? {
                Some(event) => event,
                None => break, // asked to drain: everything handled is acked already
            },
        };
        said_idle = false;
        if let Some(text) = &event.data.text {
            let reply = SendRequest {
                // Deterministic per event, so a redelivered event never produces a second reply.
                idempotency_key: format!("echo-{}-{}", agent.welcome().epoch, event.offset),
                channel: event.data.channel.clone(),
                conversation: event.data.conversation.clone(),
                body: format!("echo: {text}"),
                reply_to: Some(event.offset),
            };
            let result = agent.send(reply).await?;
            eprintln!("echo agent: offset {} -> {result:?}", event.offset);
        }
        agent.ack(event.offset);
    }
    agent.close().await;
    Ok(())
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    run(ClientOptions::from_env()?).await
}
