//! Agent sends: channel binding (promise 4), idempotency (promise 3), then the adapter.

use std::collections::HashMap;
use std::sync::Arc;

use concierge_adapters::ChannelSender;
use concierge_protocol::{ChannelRef, SendRequest, SendResult};
use concierge_store::{SendClaim, Store};

/// Longest idempotency key accepted; keys are stored, so they are bounded like everything else.
const MAX_KEY: usize = 256;

/// Routes each agent send to the channel it names, at most once per idempotency key.
pub struct Outbound {
    store: Arc<dyn Store>,
    /// The channels each agent may send through.
    senders: HashMap<(String, ChannelRef), Arc<dyn ChannelSender>>,
}

/// The channels bound to agents, as `(agent, channel) -> sender`.
pub type Bindings = HashMap<(String, ChannelRef), Arc<dyn ChannelSender>>;

impl Outbound {
    /// Binds each agent's channels.
    pub fn new(store: Arc<dyn Store>, senders: Bindings) -> Self {
        Self { store, senders }
    }

    /// Performs one send for `agent`, or returns the recorded result of an earlier one.
    pub async fn send(&self, agent: &str, request: SendRequest) -> SendResult {
        if request.idempotency_key.is_empty() || request.idempotency_key.len() > MAX_KEY {
            return SendResult::err("bad_request", format!("idempotency_key must be 1..={MAX_KEY} bytes"), false);
        }
        // Isolation: only channels bound to this agent, and the same answer for "exists but
        // belongs to another agent" as for "does not exist".
        let Some(sender) = self.senders.get(&(agent.to_string(), request.channel.clone())) else {
            return SendResult::err(
                "channel_not_bound",
                format!("channel {} is not bound to agent {agent} (or has no reply target)", request.channel),
                false,
            );
        };
        match self.store.claim_send(agent, &request.idempotency_key).await {
            Err(e) => return SendResult::err("store_unavailable", format!("nothing was sent: {e}"), true),
            Ok(SendClaim::Done(previous)) => return previous,
            Ok(SendClaim::InFlight) => {
                return SendResult::err(
                    "send_in_flight",
                    "a send with this idempotency key is in flight or its outcome is unknown; not sending again",
                    false,
                );
            }
            Ok(SendClaim::Claimed) => {}
        }
        let result = sender.send(agent, &request).await;
        if let Err(e) = self.store.finish_send(agent, &request.idempotency_key, &result).await {
            // The send happened; only its record is missing. A retry will see InFlight, never a duplicate.
            tracing::error!(agent, error = %e, "could not record a send result");
        }
        result
    }
}
