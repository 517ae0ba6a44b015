//! Email end to end with real clients: swaks and Python's smtplib deliver to the `concierge`
//! binary's SMTP listener, the agent receives over QUIC, replies go out through an aiosmtpd
//! sink acting as the relay. Needs `swaks`, `python3` and `aiosmtpd` (scripts/test installs them).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use concierge_protocol::{SendRequest, SendResult};

const MAX_SIZE: usize = 64 * 1024;

/// RFC 8410 §10.3's Ed25519 private key, and its seed.
const DKIM_PEM: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n";
const DKIM_SEED_HEX: &str = "d4ee72dbf913584ad5b6d8f1f769f8ad3afe7c28cbf1d4fbe097a88f44755842";

/// Whether python3 imports `modules`.
fn python_has(modules: &str) -> bool {
    Command::new("python3").args(["-c", &format!("import {modules}")]).output().is_ok_and(|o| o.status.success())
}

/// A local SMTP sink (aiosmtpd) standing in for the submission relay. It writes each message
/// to `<dir>/<n>.eml` and answers 451 to the first `fail_first` DATA commands.
struct RelaySink {
    port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

const SINK_PY: &str = r#"
import os, sys, time
from aiosmtpd.controller import Controller
port, out, fail = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
class Handler:
    def __init__(self):
        self.n, self.fail = 0, fail
    async def handle_DATA(self, server, session, envelope):
        if self.fail > 0:
            self.fail -= 1
            return '451 4.3.0 Try again later'
        self.n += 1
        with open(os.path.join(out, '%d.eml' % self.n), 'wb') as f:
            f.write(envelope.original_content)
        return '250 2.0.0 Queued'
c = Controller(Handler(), hostname='127.0.0.1', port=port)
c.start()
deadline = time.time() + 600
while time.time() < deadline:
    time.sleep(1)
"#;

impl RelaySink {
    fn start(fail_first: u32) -> RelaySink {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let script = dir.path().join("sink.py");
        std::fs::write(&script, SINK_PY).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let child = Command::new("python3")
            .arg(&script)
            .arg(port.to_string())
            .arg(&out)
            .arg(fail_first.to_string())
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 runs");
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "aiosmtpd sink did not start (pip install aiosmtpd)");
            std::thread::sleep(Duration::from_millis(50));
        }
        RelaySink { port, dir, child }
    }

    fn messages(&self) -> Vec<String> {
        let mut out = Vec::new();
        for n in 1.. {
            match std::fs::read(self.dir.path().join("out").join(format!("{n}.eml"))) {
                Ok(b) => out.push(String::from_utf8_lossy(&b).into_owned()),
                Err(_) => break,
            }
        }
        out
    }
}

impl Drop for RelaySink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A header's value (unfolded) from a raw message.
fn header(msg: &str, name: &str) -> Option<String> {
    let head = msg.split("\r\n\r\n").next().unwrap_or(msg).replace("\r\n ", " ").replace("\r\n\t", " ");
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join("smtp-cert.pem"), dir.join("smtp-key.pem"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// Config body: agents `helpdesk` and `sales`, an `[smtp]` listener on `port`, optional relay.
fn email_config(dir: &Path, port: u16, relay: Option<u16>, extra: &str) -> String {
    let (cert, key) = self_signed(dir);
    let relay = relay
        .map(|p| {
            format!(
                "[smtp.relay]\nhost = \"127.0.0.1\"\nport = {p}\ntls = \"none\"\ntimeout = \"5s\"\nmax_attempts = 4\nbackoff_initial = \"100ms\"\n"
            )
        })
        .unwrap_or_default();
    format!(
        "{}{}[smtp]\nlisten = \"127.0.0.1:{port}\"\nhostname = \"mx.example.com\"\ndomains = [\"example.com\"]\nmax_recipients = 3\nmax_message_size = {MAX_SIZE}\ngreeting_delay = \"200ms\"\ncommand_timeout = \"4s\"\ntrusted_relays = [\"127.0.0.1\"]\n{extra}\n[smtp.addresses]\nsupport = \"helpdesk\"\n\"sales@example.com\" = \"sales\"\n[smtp.tls]\ncert = \"{}\"\nkey = \"{}\"\n{relay}",
        self_connecting_agent("helpdesk"),
        self_connecting_agent("sales"),
        cert.display(),
        key.display(),
    )
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "SMTP listener on {port} never accepted");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A raw SMTP client for exact reply codes and hostile input.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        Raw { s, buf: Vec::new() }
    }

    fn greeted(port: u16) -> Raw {
        let mut r = Raw::connect(port);
        let g = r.reply();
        assert!(g.starts_with("220 "), "greeting: {g}");
        r
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// One complete (possibly multi-line) reply; "" when the server closed.
    fn reply(&mut self) -> String {
        let mut out = String::new();
        loop {
            while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line).into_owned();
                out.push_str(&line);
                if line.len() < 4 || line.as_bytes()[3] != b'-' {
                    return out;
                }
            }
            let mut chunk = [0u8; 4096];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return out,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// EHLO, MAIL, one RCPT, DATA accepted.
    fn open_data(&mut self, rcpt: &str) {
        assert!(self.cmd("EHLO client.test").starts_with("250"));
        assert!(self.cmd("MAIL FROM:<sender@client.test>").starts_with("250"));
        assert!(self.cmd(&format!("RCPT TO:<{rcpt}>")).starts_with("250"));
        assert!(self.cmd("DATA").starts_with("354"));
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

fn swaks(port: u16, args: &[&str]) -> String {
    let out = Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{port}"), "--from", "alice@client.test", "--helo", "client.test"])
        .args(args)
        .output()
        .expect("swaks is installed (apt-get install swaks)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "swaks failed:\n{text}");
    text
}

fn python(script: &str) -> String {
    let out = Command::new("python3").arg("-c").arg(script).output().expect("python3 runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "python failed:\n{text}");
    text
}

fn meta<'a>(e: &'a concierge_protocol::Event, key: &str) -> Option<&'a str> {
    e.data.meta.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread")]
async fn real_clients_deliver_every_kind_once_and_replies_thread() {
    let dir = tempfile::tempdir().unwrap();
    let sink = RelaySink::start(0);
    let port = free_port();
    let config =
        write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &email_config(dir.path(), port, Some(sink.port), ""));
    let proxy = Proxy::start(&config);
    wait_port(port);
    let attachment = dir.path().join("report.pdf");
    std::fs::write(&attachment, b"%PDF-1.4 fake pdf bytes").unwrap();

    // 1. swaks, plain, pipelined, +tag, first of a thread.
    swaks(
        port,
        &[
            "--to",
            "support+billing@example.com",
            "--pipeline",
            "--header",
            "Subject: Help",
            "--header",
            "Message-Id: <t1@client.test>",
            "--body",
            "first message",
        ],
    );
    // 2. swaks over STARTTLS with an attachment, replying to 1.
    let attach = format!("@{}", attachment.display());
    swaks(
        port,
        &[
            "--to",
            "support@example.com",
            "-tls",
            "--header",
            "Subject: Re: Help",
            "--header",
            "Message-Id: <t2@client.test>",
            "--header",
            "In-Reply-To: <t1@client.test>",
            "--header",
            "References: <t1@client.test>",
            "--body",
            "second, with a file",
            "--attach-type",
            "application/pdf",
            "--attach-name",
            "report.pdf",
            "--attach",
            &attach,
        ],
    );
    // 3-5. smtplib: multipart alternative over STARTTLS (replying to 2), 8-bit, and SMTPUTF8.
    python(&format!(
        r#"
import smtplib, ssl
from email.message import EmailMessage
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
m = EmailMessage()
m['From'] = 'Alice <alice@client.test>'; m['To'] = 'support@example.com'; m['Subject'] = 'Re: Help'
m['Message-ID'] = '<t3@client.test>'; m['In-Reply-To'] = '<t2@client.test>'; m['References'] = '<t1@client.test> <t2@client.test>'
m.set_content('third, plain part'); m.add_alternative('<p>third, <b>html</b> part</p>', subtype='html')
with smtplib.SMTP('127.0.0.1', {port}, timeout=20) as s:
    s.starttls(context=ctx); s.send_message(m)
eight = ('From: bob@client.test\r\nTo: support@example.com\r\nSubject: accents\r\nMessage-ID: <e8@client.test>\r\n'
         'MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n'
         'Grüße aus Köln\r\n').encode('utf-8')
with smtplib.SMTP('127.0.0.1', {port}, timeout=20) as s:
    s.sendmail('bob@client.test', ['support@example.com'], eight, mail_options=['BODY=8BITMIME'])
u = EmailMessage()
u['From'] = 'josé@exämple.test'; u['To'] = 'sales@example.com'; u['Subject'] = 'ünïcode'; u['Message-ID'] = '<u8@client.test>'
u.set_content('UTF-8 everywhere: ☃')
with smtplib.SMTP('127.0.0.1', {port}, timeout=20) as s:
    s.send_message(u, mail_options=['SMTPUTF8'])
    # A redelivery of the same message: answered 250, stored once.
    s.send_message(u, mail_options=['SMTPUTF8'])
"#
    ));

    let mut helpdesk = proxy.connect("helpdesk").await;
    let got = receive_n(&mut helpdesk, 4, Duration::from_secs(20)).await;
    expect_no_more(&mut helpdesk, Duration::from_millis(500)).await;
    let (e1, e2, e3, e4) = (&got[0], &got[1], &got[2], &got[3]);
    for e in &got[..3] {
        assert_eq!(e.data.conversation, "<t1@client.test>", "thread root of {:?}", meta(e, "message_id"));
        assert_eq!(e.data.channel.kind, "email");
        assert_eq!(e.data.channel.name, "support@example.com");
        assert_eq!(e.data.content_type, "message/rfc822");
    }
    assert_eq!(meta(e1, "tag"), Some("billing"));
    assert_eq!(meta(e1, "message_id"), Some("<t1@client.test>"));
    assert_eq!(e1.data.text.as_deref().map(str::trim), Some("first message"));
    assert_eq!(e1.data.sender.as_deref(), Some("alice@client.test"));
    assert_eq!(meta(e2, "tls"), Some("true"));
    assert_eq!(meta(e2, "in_reply_to"), Some("<t1@client.test>"));
    assert_eq!(e2.data.attachments.len(), 1, "{:?}", e2.data.attachments);
    let a = &e2.data.attachments[0];
    assert!(a.reference.starts_with("mime-part:"));
    assert_eq!((a.content_type.as_deref(), a.name.as_deref()), (Some("application/pdf"), Some("report.pdf")));
    assert_eq!(a.size, Some(23));
    assert_eq!(meta(e3, "references"), Some("<t1@client.test> <t2@client.test>"));
    assert_eq!(e3.data.text.as_deref().map(str::trim), Some("third, plain part"));
    assert!(meta(e3, "html").is_some_and(|h| h.contains("<b>html</b>")));
    assert!(String::from_utf8_lossy(&e3.data.raw).contains("Message-ID: <t3@client.test>"), "raw kept");
    assert_eq!(e4.data.text.as_deref().map(str::trim), Some("Grüße aus Köln"));
    assert_eq!(e4.data.conversation, "<e8@client.test>");

    let mut sales = proxy.connect("sales").await;
    let u = receive_n(&mut sales, 1, Duration::from_secs(20)).await;
    expect_no_more(&mut sales, Duration::from_millis(500)).await;
    assert_eq!(meta(&u[0], "subject"), Some("ünïcode"));
    assert_eq!(u[0].data.sender.as_deref(), Some("josé@exämple.test"));

    // The agent answers each message of the thread; the sink sees correctly threaded replies.
    for (i, e) in got[..3].iter().enumerate() {
        let request = concierge_protocol::email::reply(e, format!("reply-{i}"), &format!("answer {i}\nline two"));
        match helpdesk.send(request).await.unwrap() {
            SendResult::Ok { platform_ids } => assert_eq!(platform_ids.len(), 1),
            other => panic!("reply {i} failed: {other:?}; log:\n{}", proxy.log()),
        }
    }
    let sent = sink.messages();
    assert_eq!(sent.len(), 3, "three replies");
    let expect = [
        ("<t1@client.test>", "<t1@client.test>"),
        ("<t2@client.test>", "<t1@client.test> <t2@client.test>"),
        ("<t3@client.test>", "<t1@client.test> <t2@client.test> <t3@client.test>"),
    ];
    for (m, (irt, refs)) in sent.iter().zip(expect) {
        assert_eq!(header(m, "In-Reply-To").as_deref(), Some(irt), "{m}");
        assert_eq!(header(m, "References").as_deref(), Some(refs), "{m}");
        assert_eq!(header(m, "Subject").as_deref(), Some("Re: Help"), "{m}");
        assert_eq!(header(m, "From").as_deref(), Some("support@example.com"), "{m}");
        assert!(header(m, "To").is_some_and(|t| t.contains("alice@client.test")), "{m}");
        assert!(header(m, "Message-ID").is_some_and(|id| id.ends_with("@example.com>")), "{m}");
        assert!(!m.replace("\r\n", "").contains('\n'), "CRLF only");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn store_failure_during_data_answers_451_and_the_retry_is_stored_once() {
    let mut redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config =
        write_config(dir.path(), &Backend::Redis(redis.url()), [0, 0, 0], &email_config(dir.path(), port, None, ""));
    let proxy = Proxy::start(&config);
    wait_port(port);
    let body = "From: a@client.test\r\nTo: support@example.com\r\nMessage-ID: <retry@client.test>\r\nSubject: s\r\n\r\nbody\r\n";

    let mut c = Raw::greeted(port);
    c.open_data("support@example.com");
    c.send(body.as_bytes());
    redis.kill9();
    let r = c.cmd(".");
    assert!(r.starts_with("451 4.3.0"), "store down before the final dot: {r}");
    assert!(c.cmd("QUIT").starts_with("221"));

    redis.restart();
    let events = proxy.events("helpdesk").await;
    assert!(events.is_empty(), "nothing stored after the 451: {events:?}");
    // The sender retries (twice, as a sender unsure of the first retry would): stored once.
    for _ in 0..2 {
        let mut c = Raw::greeted(port);
        c.open_data("support@example.com");
        c.send(body.as_bytes());
        let r = c.cmd(".");
        assert!(r.starts_with("250 2.0.0"), "retry: {r}; log:\n{}", proxy.log());
    }
    let mut agent = proxy.connect("helpdesk").await;
    let got = receive_n(&mut agent, 1, Duration::from_secs(20)).await;
    expect_no_more(&mut agent, Duration::from_millis(500)).await;
    assert_eq!(meta(&got[0], "message_id"), Some("<retry@client.test>"));
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_input_gets_exact_codes_while_a_good_session_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &email_config(dir.path(), port, None, ""));
    let proxy = Proxy::start(&config);
    wait_port(port);

    // A well-behaved session, mid-DATA while the attacks run.
    let mut good = Raw::greeted(port);
    good.open_data("support@example.com");
    good.send(b"From: good@client.test\r\nMessage-ID: <good@client.test>\r\nSubject: fine\r\n\r\n");

    let attacks: Vec<std::thread::JoinHandle<()>> = vec![
        std::thread::spawn(move || {
            // Input before the greeting.
            let mut c = Raw::connect(port);
            c.send(b"EHLO eager\r\n");
            assert!(c.reply().starts_with("554 5.5.1"));
            assert!(c.closed());
        }),
        std::thread::spawn(move || {
            let mut c = Raw::greeted(port);
            c.send(b"GET / HTTP/1.1\r\nHost: mx\r\n\r\n");
            assert!(c.reply().starts_with("554 5.7.0"));
            assert!(c.closed());
        }),
        std::thread::spawn(move || {
            // Smuggling: bare LF before a dot, then a second transaction hidden in the body.
            let mut c = Raw::greeted(port);
            c.open_data("support@example.com");
            c.send(b"Subject: x\r\n\r\nhi\n.\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<sales@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n");
            let r = c.reply();
            assert!(r.starts_with("521 5.5.2"), "{r}");
            assert!(c.closed());
        }),
        std::thread::spawn(move || {
            let mut c = Raw::greeted(port);
            c.open_data("support@example.com");
            c.send(b"Subject: y\r\n\r\nhi\r.\r\n.\r\n");
            assert!(c.reply().starts_with("521 5.5.2"));
        }),
        std::thread::spawn(move || {
            let mut c = Raw::greeted(port);
            let r = c.cmd(&format!("NOOP {}", "a".repeat(5000)));
            assert!(r.starts_with("500 5.5.2"), "{r}");
            assert!(c.cmd("NOOP").starts_with("250"), "still in step after a long line");
        }),
        std::thread::spawn(move || {
            let mut c = Raw::greeted(port);
            assert!(c.cmd("EHLO c").starts_with("250"));
            assert!(c.cmd("MAIL FROM:<a@x>").starts_with("250"));
            assert!(c.cmd("RCPT TO:<nobody@example.com>").starts_with("550 5.1.1"));
            for rcpt in ["support@example.com", "support+1@example.com", "sales@example.com"] {
                assert!(c.cmd(&format!("RCPT TO:<{rcpt}>")).starts_with("250"));
            }
            assert!(c.cmd("RCPT TO:<sales+2@example.com>").starts_with("452 4.5.3"));
            assert!(c.cmd("VRFY support").starts_with("252"));
        }),
        std::thread::spawn(move || {
            let mut c = Raw::greeted(port);
            assert!(c.cmd("EHLO c").contains(&format!("SIZE {MAX_SIZE}")));
            assert!(c.cmd("MAIL FROM:<a@x> SIZE=1000000000").starts_with("552 5.3.4"));
            c.open_data("support@example.com");
            let line = format!("{}\r\n", "z".repeat(998));
            for _ in 0..(MAX_SIZE / 1000 + 10) {
                c.send(line.as_bytes());
            }
            assert!(c.cmd(".").starts_with("552 5.3.4"), "oversized by content");
            assert!(c.cmd("NOOP").starts_with("250"));
        }),
        std::thread::spawn(move || {
            let mut c = Raw::greeted(port);
            c.open_data("support@example.com");
            c.send(b"Subject: nul\r\n\r\na\0b\r\n");
            assert!(c.cmd(".").starts_with("554 5.6.0"));
            assert!(c.cmd("NOOP \0").starts_with("500 5.5.2"));
        }),
        std::thread::spawn(move || {
            // Slowloris: silence gets 421 after command_timeout (4 s).
            let mut c = Raw::greeted(port);
            let started = Instant::now();
            let r = c.reply();
            assert!(r.starts_with("421 4.4.2"), "{r}");
            assert!(started.elapsed() >= Duration::from_secs(3));
        }),
    ];
    // The good session keeps talking (within its idle timeout) while the attacks run.
    let deadline = Instant::now() + Duration::from_secs(30);
    while attacks.iter().any(|a| !a.is_finished()) && Instant::now() < deadline {
        good.send(b"tick\r\n");
        std::thread::sleep(Duration::from_millis(500));
    }
    for a in attacks {
        a.join().expect("attack assertions hold");
    }
    good.send(b"still here\r\n");
    assert!(good.cmd(".").starts_with("250 2.0.0"), "the good session's mail is stored");

    let mut agent = proxy.connect("helpdesk").await;
    let got = receive_n(&mut agent, 1, Duration::from_secs(20)).await;
    expect_no_more(&mut agent, Duration::from_millis(500)).await;
    assert_eq!(meta(&got[0], "message_id"), Some("<good@client.test>"));
    let mut sales = proxy.connect("sales").await;
    expect_no_more(&mut sales, Duration::from_millis(300)).await;
    let log = proxy.log();
    for line in ["before the greeting", "HTTP request", "bare LF", "bare CR", "too long", "NUL", "timed out"] {
        assert!(log.contains(line), "log line for {line:?} missing:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_4xx_then_success_delivers_one_message_with_one_message_id() {
    let dir = tempfile::tempdir().unwrap();
    let sink = RelaySink::start(2);
    let port = free_port();
    // With a DKIM key (RFC 8410's Ed25519 example key), the reply is signed once and every
    // attempt carries the same signed bytes.
    let key = dir.path().join("dkim.pem");
    std::fs::write(&key, DKIM_PEM).unwrap();
    let body = format!(
        "{}dkim_selector = \"sel\"\ndkim_domain = \"example.com\"\ndkim_key_file = \"{}\"\n",
        email_config(dir.path(), port, Some(sink.port), ""),
        key.display()
    );
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body);
    let proxy = Proxy::start(&config);
    wait_port(port);
    swaks(
        port,
        &[
            "--to",
            "support@example.com",
            "--header",
            "Subject: ping",
            "--header",
            "Message-Id: <p@client.test>",
            "--body",
            "ping",
        ],
    );
    let mut agent = proxy.connect("helpdesk").await;
    let got = receive_n(&mut agent, 1, Duration::from_secs(20)).await;
    let request = concierge_protocol::email::reply(&got[0], "pong-1", "pong");
    let first = agent.send(request.clone()).await.unwrap();
    let SendResult::Ok { platform_ids } = &first else { panic!("{first:?}; log:\n{}", proxy.log()) };
    // The same idempotency key again: the recorded result, nothing sent.
    assert_eq!(agent.send(request).await.unwrap(), first);
    let sent = sink.messages();
    assert_eq!(sent.len(), 1, "one message after two 451s");
    assert_eq!(header(&sent[0], "Message-ID").as_deref(), Some(platform_ids[0].as_str()));
    assert_eq!(header(&sent[0], "In-Reply-To").as_deref(), Some("<p@client.test>"));
    assert!(proxy.log().matches("email reply deferred; retrying").count() >= 2);
    let dkim = header(&sent[0], "DKIM-Signature").expect("a DKIM-Signature");
    assert!(dkim.contains("a=ed25519-sha256; c=relaxed/relaxed; d=example.com; s=sel;"), "{dkim}");
    if python_has("dkim, nacl.signing") {
        let check = format!(
            "import dkim, nacl.signing, base64\nmsg = open({:?}, 'rb').read()\n\
             pk = base64.b64encode(bytes(nacl.signing.SigningKey(bytes.fromhex('{DKIM_SEED_HEX}')).verify_key))\n\
             rec = b'v=DKIM1; k=ed25519; p=' + pk\n\
             print('pass' if dkim.verify(msg, dnsfunc=lambda name, timeout=5: rec) else 'fail')",
            sink.dir.path().join("out").join("1.eml").display().to_string()
        );
        let verdict = python(&check);
        assert!(verdict.lines().any(|l| l.trim() == "pass"), "dkimpy: {verdict}\n{}", sent[0]);
    } else {
        eprintln!("dkimpy unavailable: DKIM signature present but not verified here (adapters' tests verify it)");
    }
    // A body that is not the JSON contract is a clear, permanent error.
    let bad = SendRequest {
        idempotency_key: "bad-1".into(),
        body: "just text".into(),
        ..concierge_protocol::email::reply(&got[0], "x", "")
    };
    match agent.send(bad).await.unwrap() {
        SendResult::Err { code, retryable, .. } => assert_eq!((code.as_str(), retryable), ("bad_request", false)),
        ok => panic!("{ok:?}"),
    }
}
