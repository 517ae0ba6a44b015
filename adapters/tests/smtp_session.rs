//! The SMTP state machine driven without sockets: bytes in, replies and actions out.

use std::sync::Arc;

use concierge_adapters::smtp::reply::{build, crlf, message_id, reply_subject};
use concierge_adapters::smtp::{AddressBook, Output, Session, SessionConfig, StoreOutcome};
use concierge_protocol::{ChannelRef, SendRequest};

fn config(max_size: usize, starttls: bool) -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: "mx.test".into(),
        max_message_size: max_size,
        max_recipients: 3,
        max_line_length: 512,
        max_errors: 5,
        starttls,
        addresses: AddressBook::new([
            ("support@example.com".to_string(), "helpdesk".to_string()),
            ("sales@example.com".to_string(), "sales".to_string()),
        ]),
    })
}

fn session() -> Session {
    let mut s = Session::new(config(10_000, true), "192.0.2.1".parse().unwrap(), false);
    assert!(matches!(s.greeting(), Output::Reply(r) if r.starts_with("220 mx.test")));
    s
}

/// Reply codes (first three characters of every reply line's last line) and other outputs.
fn codes(out: &[Output]) -> Vec<String> {
    out.iter()
        .map(|o| match o {
            Output::Reply(r) => r.trim_end().lines().last().unwrap_or_default()[..3].to_string(),
            Output::StartTls => "TLS".into(),
            Output::Deliver(_) => "DELIVER".into(),
            Output::Close => "CLOSE".into(),
        })
        .collect()
}

fn replies(out: &[Output]) -> String {
    out.iter()
        .filter_map(|o| match o {
            Output::Reply(r) => Some(r.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn pipelined_transaction_is_delivered_and_acknowledged_only_after_store() {
    let mut s = session();
    let out = s.receive(
        b"EHLO client.test\r\nMAIL FROM:<a@x.test> SIZE=100\r\nRCPT TO:<support+billing@Example.com>\r\nRCPT TO:<sales@example.com>\r\nDATA\r\n",
    );
    assert_eq!(codes(&out), ["250", "250", "250", "250", "354"]);
    let ehlo = replies(&out[..1]);
    for ext in ["PIPELINING", "SIZE 10000", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "STARTTLS", "CHUNKING"] {
        assert!(ehlo.contains(ext), "{ext} missing from {ehlo}");
    }
    let out = s.receive(b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\nQUIT\r\n");
    let [Output::Deliver(env)] = &out[..] else { panic!("{out:?}") };
    assert_eq!(env.data, b"Subject: hi\r\n\r\n.dot\r\nbody\r\n");
    assert_eq!(env.recipients.len(), 2);
    assert_eq!(env.recipients[0].agent, "helpdesk");
    assert_eq!(env.recipients[0].address, "support@example.com");
    assert_eq!(env.recipients[0].tag.as_deref(), Some("billing"));
    // Nothing else is processed (QUIT waits) until the store answers.
    let out = s.stored(StoreOutcome::Stored);
    assert_eq!(codes(&out), ["250", "221", "CLOSE"]);
}

#[test]
fn store_failure_answers_451_and_the_session_goes_on() {
    let mut s = session();
    s.receive(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<support@example.com>\r\nDATA\r\n");
    let out = s.receive(b"x\r\n.\r\n");
    assert_eq!(codes(&out), ["DELIVER"]);
    let out = s.stored(StoreOutcome::Unavailable);
    assert_eq!(replies(&out), "451 4.3.0 Temporary storage failure; please try again later\r\n");
    let out = s.receive(b"MAIL FROM:<a@x>\r\n");
    assert_eq!(codes(&out), ["250"], "a new transaction may start");
}

#[test]
fn unknown_recipient_vrfy_and_recipient_cap() {
    let mut s = session();
    let out = s.receive(b"EHLO c\r\nVRFY support\r\nMAIL FROM:<a@x>\r\nRCPT TO:<nobody@example.com>\r\n");
    assert_eq!(codes(&out), ["250", "252", "250", "550"]);
    assert!(replies(&out).contains("550 5.1.1"));
    let out = s.receive(
        b"RCPT TO:<support@example.com>\r\nRCPT TO:<support+a@example.com>\r\nRCPT TO:<sales@example.com>\r\nRCPT TO:<sales+b@example.com>\r\n",
    );
    assert_eq!(codes(&out), ["250", "250", "250", "452"]);
    assert!(replies(&out).contains("452 4.5.3"));
}

#[test]
fn sequence_errors() {
    let mut s = session();
    let out =
        s.receive(b"MAIL FROM:<a@x>\r\nEHLO c\r\nRCPT TO:<support@example.com>\r\nDATA\r\nMAIL FROM:<a@x>\r\nDATA\r\n");
    assert_eq!(codes(&out), ["503", "250", "503", "503", "250", "554"]);
    // Four errors so far; the fifth (max_errors) closes the session.
    let out = s.receive(b"RSET\r\nNOOP\r\nFOO\r\nNOOP\r\n");
    assert_eq!(codes(&out), ["250", "250", "500", "421", "CLOSE"]);
}

#[test]
fn size_is_checked_at_mail_from_and_while_reading() {
    let mut s = Session::new(config(100, false), "192.0.2.1".parse().unwrap(), false);
    s.greeting();
    let out = s.receive(b"EHLO c\r\nMAIL FROM:<a@x> SIZE=101\r\n");
    assert_eq!(codes(&out), ["250", "552"]);
    let out = s.receive(b"MAIL FROM:<a@x>\r\nRCPT TO:<support@example.com>\r\nDATA\r\n");
    assert_eq!(codes(&out), ["250", "250", "354"]);
    let big = format!("{}\r\n.\r\nNOOP\r\n", "y".repeat(200));
    let out = s.receive(big.as_bytes());
    assert_eq!(codes(&out), ["552", "250"], "{}", replies(&out));
    assert!(replies(&out).starts_with("552 5.3.4"));
}

#[test]
fn bare_lf_and_bare_cr_in_data_reject_and_close() {
    // The published smuggling sequences: each hides an end-of-data that is not CRLF.CRLF.
    for smuggle in [&b"\n.\r\n"[..], b"\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n", b"x\ny\r\n"] {
        let mut s = session();
        s.receive(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<support@example.com>\r\nDATA\r\n");
        let mut input = b"Subject: a\r\n\r\nhello\r\n".to_vec();
        input.extend_from_slice(smuggle);
        input.extend_from_slice(b"MAIL FROM:<evil@x>\r\nRCPT TO:<sales@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n");
        let out = s.receive(&input);
        assert_eq!(codes(&out), ["521", "CLOSE"], "sequence {smuggle:?}: {out:?}");
        assert!(replies(&out).starts_with("521 5.5.2"));
        assert!(s.is_closed());
    }
}

#[test]
fn bare_lf_in_a_command_closes() {
    let mut s = session();
    let out = s.receive(b"EHLO c\nMAIL FROM:<a@x>\r\n");
    assert_eq!(codes(&out), ["521", "CLOSE"]);
}

#[test]
fn nul_bytes() {
    let mut s = session();
    let out = s.receive(b"EHLO c\r\nNOOP \0\r\nMAIL FROM:<a@x>\r\nRCPT TO:<support@example.com>\r\nDATA\r\n");
    assert_eq!(codes(&out), ["250", "500", "250", "250", "354"]);
    let out = s.receive(b"a\0b\r\n.\r\n");
    assert_eq!(codes(&out), ["554"]);
    assert!(replies(&out).starts_with("554 5.6.0"));
}

#[test]
fn input_before_greeting_and_http_are_rejected() {
    let mut s = Session::new(config(1000, false), "192.0.2.1".parse().unwrap(), false);
    let out = s.receive(b"EHLO early\r\n");
    assert_eq!(codes(&out), ["554", "CLOSE"]);
    let mut s = session();
    let out = s.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(codes(&out), ["554", "CLOSE"]);
    assert!(replies(&out).contains("HTTP"));
}

#[test]
fn long_lines_are_refused_and_resynchronised() {
    let mut s = session();
    let long = format!("NOOP {}\r\nNOOP\r\n", "a".repeat(600));
    let out = s.receive(long.as_bytes());
    assert_eq!(codes(&out), ["500", "250"]);
    // Split across reads, with no LF for longer than the limit.
    let out = s.receive("b".repeat(2000).as_bytes());
    assert!(out.is_empty());
    assert!(s.buffered() < 512);
    let out = s.receive(b"bbb\r\nNOOP\r\n");
    assert_eq!(codes(&out), ["500", "250"]);
}

#[test]
fn too_many_errors_close_the_session() {
    let mut s = session();
    let out = s.receive(b"X\r\nX\r\nX\r\nX\r\nX\r\nNOOP\r\n");
    assert_eq!(codes(&out), ["500", "500", "500", "500", "500", "421", "CLOSE"]);
}

#[test]
fn starttls_discards_pipelined_plaintext_and_resets() {
    let mut s = session();
    let out = s.receive(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<injected@x>\r\n");
    assert_eq!(codes(&out), ["250", "220", "TLS"]);
    assert_eq!(s.buffered(), 0);
    s.tls_started();
    let out = s.receive(b"MAIL FROM:<a@x>\r\nEHLO c\r\n");
    assert_eq!(codes(&out), ["503", "250"], "EHLO is needed again after TLS");
    assert!(!replies(&out).contains("STARTTLS"), "not offered twice");
    let mut plain = Session::new(config(1000, false), "192.0.2.1".parse().unwrap(), false);
    plain.greeting();
    assert_eq!(codes(&plain.receive(b"EHLO c\r\nSTARTTLS\r\n")), ["250", "502"]);
}

#[test]
fn smtputf8_and_8bit() {
    let mut s = session();
    let out = s.receive("EHLO c\r\nMAIL FROM:<jösé@x.test>\r\nMAIL FROM:<jösé@x.test> SMTPUTF8 BODY=8BITMIME\r\nRCPT TO:<support@example.com>\r\nDATA\r\n".as_bytes());
    assert_eq!(codes(&out), ["250", "553", "250", "250", "354"]);
    let out = s.receive("Subject: héllo\r\n\r\nçà\r\n.\r\n".as_bytes());
    let [Output::Deliver(env)] = &out[..] else { panic!("{out:?}") };
    assert_eq!(env.mail_from, "jösé@x.test");
    assert_eq!(std::str::from_utf8(&env.data).unwrap(), "Subject: héllo\r\n\r\nçà\r\n");
}

#[test]
fn bdat_chunks() {
    let mut s = session();
    let out =
        s.receive(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<support@example.com>\r\nBDAT 5\r\nab\ncdBDAT 3 LAST\r\nxyz");
    assert_eq!(codes(&out), ["250", "250", "250", "250", "DELIVER"]);
    let Output::Deliver(env) = &out[4] else { unreachable!() };
    assert_eq!(env.data, b"ab\ncdxyz");
    let mut s = session();
    let out = s.receive(b"BDAT 4 LAST\r\nabcdNOOP\r\n");
    assert_eq!(codes(&out), ["503", "250"], "the chunk is consumed even when refused");
}

#[test]
fn address_book_resolution() {
    let book = AddressBook::new([("support@example.com".to_string(), "helpdesk".to_string())]);
    let r = book.resolve("Support+Urgent@EXAMPLE.com").unwrap();
    assert_eq!(
        (r.agent.as_str(), r.address.as_str(), r.tag.as_deref()),
        ("helpdesk", "support@example.com", Some("Urgent"))
    );
    assert!(book.resolve("support@other.com").is_none());
    assert!(book.resolve("nobody").is_none());
}

#[test]
fn reply_building_threads_and_fixes_the_message_id() {
    let request = SendRequest {
        idempotency_key: "k1".into(),
        channel: ChannelRef::new("email", "support@example.com"),
        conversation: "<root@x>".into(),
        body: serde_json::json!({
            "to": "Alice <alice@x.test>",
            "subject": "RE: Re: question",
            "in_reply_to": "<p2@x>",
            "references": ["<root@x>", "<p1@x>"],
            "text": "line1\nline2\rline3",
        })
        .to_string(),
        reply_to: Some(3),
    };
    let built = build("helpdesk", "support@example.com", &request).unwrap();
    let again = build("helpdesk", "support@example.com", &request).unwrap();
    assert_eq!(built.message_id, again.message_id, "same key, same Message-ID");
    assert_eq!(built.message_id, message_id("helpdesk", "k1", "support@example.com"));
    assert!(built.message_id.ends_with("@example.com>"));
    let text = String::from_utf8(built.bytes).unwrap();
    assert!(text.contains("In-Reply-To: <p2@x>\r\n"), "{text}");
    assert!(text.contains("References: <root@x> <p1@x> <p2@x>\r\n"), "{text}");
    assert!(text.contains("Subject: Re: question\r\n"), "{text}");
    assert!(text.contains("line1\r\nline2\r\nline3"), "{text}");
    assert!(!text.replace("\r\n", "").contains('\n'), "only CRLF line endings");
    assert_eq!(reply_subject("Re: re:  hello"), "Re: hello");
    assert_eq!(crlf("a\nb\r\nc\r"), "a\r\nb\r\nc\r\n");
    let bad = SendRequest { body: "plain text".into(), ..request };
    assert!(build("helpdesk", "support@example.com", &bad).is_err());
}

#[test]
fn bare_cr_in_a_command_closes() {
    let mut s = session();
    let out = s.receive(b"EHLO c\r\nNOOP a\rb\r\nMAIL FROM:<a@x>\r\n");
    assert_eq!(codes(&out), ["250", "521", "CLOSE"]);
    assert!(replies(&out).contains("521 5.5.2 Error: bare CR"), "{}", replies(&out));
    assert!(s.is_closed());
}

#[test]
fn helo_is_plain_smtp() {
    let mut s = session();
    let out = s.receive(b"HELO client.test\r\nMAIL FROM:<a@x>\r\nRCPT TO:<support@example.com>\r\nDATA\r\n");
    assert_eq!(codes(&out), ["250", "250", "250", "354"]);
    let helo = replies(&out[..1]);
    assert_eq!(helo, "250 mx.test\r\n", "a one-line reply, no extensions");
    let out = s.receive(b"x\r\n.\r\n");
    let [Output::Deliver(env)] = &out[..] else { panic!("{out:?}") };
    assert_eq!(env.helo, "client.test");
    s.stored(StoreOutcome::Stored);
    // Extensions need EHLO: SMTPUTF8 after HELO is refused.
    let out = s.receive("MAIL FROM:<jösé@x.test> SMTPUTF8\r\n".as_bytes());
    assert_eq!(codes(&out), ["503"]);
}

#[test]
fn rset_inside_a_transaction_forgets_it() {
    let mut s = session();
    let out = s.receive(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<support@example.com>\r\nRSET\r\nDATA\r\nRCPT TO:<sales@example.com>\r\n");
    assert_eq!(codes(&out), ["250", "250", "250", "250", "503", "503"], "no transaction after RSET");
    let out = s.receive(b"MAIL FROM:<b@x>\r\nRCPT TO:<sales@example.com>\r\nDATA\r\nx\r\n.\r\n");
    assert_eq!(codes(&out), ["250", "250", "354", "DELIVER"]);
    let Output::Deliver(env) = &out[3] else { unreachable!() };
    assert_eq!(env.mail_from, "b@x");
    let agents: Vec<&str> = env.recipients.iter().map(|r| r.agent.as_str()).collect();
    assert_eq!(agents, ["sales"], "the recipient from before RSET is gone");
}
