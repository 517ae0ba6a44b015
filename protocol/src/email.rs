//! Replying to email events: builds the JSON send body the email channel expects from the
//! event being answered, so an agent replies correctly threaded with one call.

use crate::event::Event;
use crate::frame::SendRequest;

fn meta<'a>(event: &'a Event, key: &str) -> Option<&'a str> {
    event.data.meta.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The send body answering `event` with `text`: to the parent's Reply-To (else From), with
/// its subject, `in_reply_to` = its Message-ID and `references` = its References.
pub fn reply_body(event: &Event, text: &str) -> String {
    let to: Vec<String> = meta(event, "reply_to")
        .or(meta(event, "from"))
        .or(event.data.sender.as_deref())
        .map(|s| s.split(',').map(|a| a.trim().to_string()).filter(|a| !a.is_empty()).collect())
        .unwrap_or_default();
    let references: Vec<&str> = meta(event, "references").map(|r| r.split_whitespace().collect()).unwrap_or_default();
    serde_json::json!({
        "to": to,
        "subject": meta(event, "subject").unwrap_or_default(),
        "in_reply_to": meta(event, "message_id"),
        "references": references,
        "text": text,
    })
    .to_string()
}

/// A complete send answering `event` on the channel and conversation it came from.
pub fn reply(event: &Event, idempotency_key: impl Into<String>, text: &str) -> SendRequest {
    SendRequest {
        idempotency_key: idempotency_key.into(),
        channel: event.data.channel.clone(),
        conversation: event.data.conversation.clone(),
        body: reply_body(event, text),
        reply_to: Some(event.offset),
    }
}
