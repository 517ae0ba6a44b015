//! A received message turned into events: Authentication-Results pass-through (who may vouch
//! for them) and the thread root, driven through `message::events` without sockets.

use concierge_adapters::smtp::message::events;
use concierge_adapters::smtp::{AddressBook, Envelope, Threading, TrustPolicy};

fn envelope(data: &str) -> Envelope {
    let book = AddressBook::new([("support@example.com".to_string(), "helpdesk".to_string())]);
    Envelope {
        mail_from: "a@client.test".into(),
        recipients: vec![book.resolve("support@example.com").unwrap()],
        data: data.as_bytes().to_vec(),
        helo: "relay.example.com".into(),
        tls: false,
    }
}

/// Two headers: one from our relay (`mx.example.com`), one the original sender forged.
const WITH_AR: &str = "Authentication-Results: mx.example.com;\r\n\tspf=pass smtp.mailfrom=a@client.test\r\n\
Authentication-Results: forged.example; dkim=pass header.d=bank.test\r\n\
From: a@client.test\r\nMessage-ID: <ar@client.test>\r\nSubject: s\r\n\r\nbody\r\n";

fn results(trust: &TrustPolicy) -> Vec<String> {
    let out = events(&envelope(WITH_AR), "10.0.0.5".parse().unwrap(), trust);
    assert_eq!(out.len(), 1);
    out[0].meta.iter().filter(|(k, _)| k == "authentication_results").map(|(_, v)| v.clone()).collect()
}

#[test]
fn authentication_results_pass_only_from_a_trusted_peer_with_our_authserv_id() {
    let ours = Some("MX.example.com".to_string());
    // Trusted peer, matching id (case-insensitive): only our relay's header, unfolded.
    assert_eq!(
        results(&TrustPolicy { trusted_peer: true, authserv_id: ours.clone() }),
        ["mx.example.com; spf=pass smtp.mailfrom=a@client.test"]
    );
    // Untrusted peer: nothing, whatever the id.
    assert!(results(&TrustPolicy { trusted_peer: false, authserv_id: ours }).is_empty());
    // Trusted peer, another id: nothing.
    assert!(results(&TrustPolicy { trusted_peer: true, authserv_id: Some("other.example".into()) }).is_empty());
    // Trusted peer with no id configured: nothing (the forged header must not pass).
    assert!(results(&TrustPolicy { trusted_peer: true, authserv_id: None }).is_empty());
}

#[test]
fn thread_root_falls_back_to_in_reply_to_then_own_id() {
    let only_irt = "From: a@client.test\r\nMessage-ID: <child@x>\r\nIn-Reply-To: <parent@x>\r\n\r\nb\r\n";
    let e = &events(&envelope(only_irt), "10.0.0.5".parse().unwrap(), &TrustPolicy::default())[0];
    assert_eq!(e.conversation, "<parent@x>", "In-Reply-To without References roots the thread");
    let both = "From: a@x\r\nMessage-ID: <c@x>\r\nIn-Reply-To: <p@x>\r\nReferences: <root@x> <p@x>\r\n\r\nb\r\n";
    assert_eq!(
        events(&envelope(both), "10.0.0.5".parse().unwrap(), &TrustPolicy::default())[0].conversation,
        "<root@x>"
    );
    let alone = "From: a@x\r\nMessage-ID: <self@x>\r\n\r\nb\r\n";
    let e = &events(&envelope(alone), "10.0.0.5".parse().unwrap(), &TrustPolicy::default())[0];
    assert_eq!(e.conversation, "<self@x>");
    assert_eq!(e.dedupe_key.as_deref(), Some("message-id:<self@x>"));
    let t = Threading { message_id: Some("<m@x>".into()), in_reply_to: vec!["<i@x>".into()], references: vec![] };
    assert_eq!(t.root().map(String::as_str), Some("<i@x>"));
}
