//! The SMTP server's protocol logic, free of I/O: bytes go in through [`Session::receive`],
//! replies and requests for the I/O layer ([`Output`]) come out. Command lines are framed
//! here (strict CRLF, length, NUL and HTTP checks) and parsed by `smtp-proto`; DATA is read
//! here with the smuggling defences (only CRLF.CRLF ends it; bare CR or LF closes the session).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use smtp_proto::{Error as ProtoError, MAIL_BODY_BINARYMIME, MAIL_SMTPUTF8, Request};

/// Partial DATA lines longer than this are moved into the message before their end arrives,
/// so the input buffer stays bounded whatever the line length.
const DATA_FLUSH: usize = 16 * 1024;

/// Which agent an address belongs to, with the `+tag` sub-address split off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient {
    /// Agent that receives mail for this address.
    pub agent: String,
    /// Canonical lower-case address without the tag: the channel instance the agent replies on.
    pub address: String,
    /// `tag` of `name+tag@domain`, as written.
    pub tag: Option<String>,
    /// The address exactly as given at RCPT TO.
    pub original: String,
}

/// Maps recipient addresses to agents (`[smtp.addresses]`).
#[derive(Clone, Debug, Default)]
pub struct AddressBook {
    /// Full lower-case address -> agent.
    addresses: HashMap<String, String>,
}

impl AddressBook {
    /// Builds the book from `address -> agent` pairs (addresses are lower-cased).
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Self { addresses: pairs.into_iter().map(|(a, g)| (a.to_lowercase(), g)).collect() }
    }

    /// The recipient an RCPT address names, if any; `name+tag@domain` maps like `name@domain`.
    pub fn resolve(&self, original: &str) -> Option<Recipient> {
        let (local, domain) = original.rsplit_once('@')?;
        let (base, tag) = match local.split_once('+') {
            Some((b, t)) => (b, Some(t.to_string())),
            None => (local, None),
        };
        let address = format!("{base}@{domain}").to_lowercase();
        let agent = self.addresses.get(&address)?.clone();
        Some(Recipient { agent, address, tag: tag.filter(|t| !t.is_empty()), original: original.to_string() })
    }

    /// Every configured `address -> agent` pair.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.addresses.iter()
    }
}

/// Protocol settings shared by every session of one listener.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Name in the greeting and EHLO reply.
    pub hostname: String,
    /// Largest message, in bytes.
    pub max_message_size: usize,
    /// Recipients per message.
    pub max_recipients: usize,
    /// Longest command line, CRLF included.
    pub max_line_length: usize,
    /// Bad commands before the session is closed.
    pub max_errors: u32,
    /// Whether STARTTLS can be offered (a certificate is configured).
    pub starttls: bool,
    /// Address map.
    pub addresses: AddressBook,
}

/// A message complete and ready to be stored; the session waits for [`Session::stored`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// MAIL FROM address (empty for the null sender).
    pub mail_from: String,
    /// Accepted recipients, in RCPT order.
    pub recipients: Vec<Recipient>,
    /// The message exactly as received (dot-unstuffed), CRLF line endings.
    pub data: Vec<u8>,
    /// EHLO/HELO name the client gave.
    pub helo: String,
    /// Whether the message arrived over TLS.
    pub tls: bool,
}

/// What the session asks of the I/O layer, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    /// Write these bytes (one or more complete replies).
    Reply(String),
    /// The 220 for STARTTLS was queued: flush it, then run the TLS handshake and call
    /// [`Session::tls_started`]. Plaintext received after the command is already discarded.
    StartTls,
    /// Store this message for every recipient agent, then call [`Session::stored`].
    Deliver(Envelope),
    /// Flush what was written and close the connection.
    Close,
}

/// How storing a delivered message went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Durable for every recipient agent: answer 250.
    Stored,
    /// The store failed: answer 451 so the sender keeps the message and retries.
    Unavailable,
    /// The proxy refused it (an agent's buffer is full): answer 452, retry later.
    Full,
}

#[derive(Debug)]
enum State {
    /// Waiting for the I/O layer to send the greeting.
    Connected,
    /// Reading command lines.
    Command,
    /// Reading DATA lines.
    Data { line_start: bool },
    /// Reading `remaining` bytes of a BDAT chunk.
    Bdat { remaining: usize, last: bool, discard: bool },
    /// A delivered message is being stored; input waits.
    Storing,
    /// Waiting for the TLS handshake.
    Tls,
    /// Done; everything else is ignored.
    Closed,
}

#[derive(Debug, Default)]
struct Transaction {
    from: String,
    smtputf8: bool,
    recipients: Vec<Recipient>,
    data: Vec<u8>,
    oversize: bool,
    nul: bool,
}

/// One SMTP session's protocol state.
pub struct Session {
    config: Arc<SessionConfig>,
    peer: IpAddr,
    state: State,
    buf: Vec<u8>,
    /// A command line longer than the limit is being skipped up to its LF.
    skipping_line: bool,
    helo: Option<String>,
    esmtp: bool,
    tls: bool,
    tx: Option<Transaction>,
    errors: u32,
}

impl Session {
    /// A new session for a client at `peer`; `tls` is true on an implicit-TLS listener.
    pub fn new(config: Arc<SessionConfig>, peer: IpAddr, tls: bool) -> Self {
        Self {
            config,
            peer,
            state: State::Connected,
            buf: Vec::new(),
            skipping_line: false,
            helo: None,
            esmtp: false,
            tls,
            tx: None,
            errors: 0,
        }
    }

    /// The 220 greeting; input received before it is rejected (see [`Session::receive`]).
    pub fn greeting(&mut self) -> Output {
        if matches!(self.state, State::Connected) {
            self.state = State::Command;
        }
        Output::Reply(format!("220 {} ESMTP Concierge\r\n", self.config.hostname))
    }

    /// Whether the session has ended (the I/O layer closes the connection).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Whether the client is inside DATA or BDAT (the I/O layer may pick another timeout).
    pub fn in_data(&self) -> bool {
        matches!(self.state, State::Data { .. } | State::Bdat { .. })
    }

    /// Bytes received but not yet consumed (bounded by a read plus one line).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Feeds received bytes; returns what to do, in order. Stops early at `Deliver`,
    /// `StartTls` or `Close`; the rest of the input stays buffered until the I/O layer answers.
    pub fn receive(&mut self, bytes: &[u8]) -> Vec<Output> {
        match self.state {
            State::Closed => return Vec::new(),
            State::Connected => {
                let http = looks_like_http(bytes);
                tracing::warn!(peer = %self.peer, http, "SMTP client talked before the greeting; rejected");
                self.state = State::Closed;
                let why = if http { "HTTP request on the SMTP port" } else { "Talking before the greeting" };
                return vec![Output::Reply(format!("554 5.5.1 {why}; closing\r\n")), Output::Close];
            }
            _ => {}
        }
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        self.process(&mut out);
        out
    }

    /// Reports how storing the last [`Output::Deliver`] went; returns the reply and whatever
    /// pipelined input was waiting behind it.
    pub fn stored(&mut self, outcome: StoreOutcome) -> Vec<Output> {
        let mut out = Vec::new();
        if !matches!(self.state, State::Storing) {
            return out;
        }
        self.state = State::Command;
        self.tx = None;
        out.push(Output::Reply(
            match outcome {
                StoreOutcome::Stored => "250 2.0.0 Ok: message stored\r\n",
                StoreOutcome::Unavailable => "451 4.3.0 Temporary storage failure; please try again later\r\n",
                StoreOutcome::Full => "452 4.2.2 Mailbox full; please try again later\r\n",
            }
            .to_string(),
        ));
        self.process(&mut out);
        out
    }

    /// The TLS handshake after STARTTLS succeeded: the session starts over (RFC 3207).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.helo = None;
        self.esmtp = false;
        self.tx = None;
        self.buf.clear();
        if matches!(self.state, State::Tls) {
            self.state = State::Command;
        }
    }

    /// The reply for an idle or session timeout; the session is over.
    pub fn timeout(&mut self) -> Output {
        self.state = State::Closed;
        Output::Reply(format!("421 4.4.2 {} Error: timeout exceeded\r\n", self.config.hostname))
    }

    /// The reply when the server shuts down mid-session; the session is over.
    pub fn shutting_down(&mut self) -> Output {
        self.state = State::Closed;
        Output::Reply(format!("421 4.3.2 {} Service shutting down\r\n", self.config.hostname))
    }

    fn close(&mut self, out: &mut Vec<Output>, reply: String) {
        self.state = State::Closed;
        self.buf.clear();
        out.push(Output::Reply(reply));
        out.push(Output::Close);
    }

    /// A client error: replies, and closes after `max_errors`.
    fn error(&mut self, out: &mut Vec<Output>, reply: &str) {
        self.errors += 1;
        out.push(Output::Reply(format!("{reply}\r\n")));
        if self.errors >= self.config.max_errors {
            tracing::warn!(peer = %self.peer, errors = self.errors, "SMTP session closed: too many errors");
            self.close(out, "421 4.7.0 Too many errors; closing\r\n".to_string());
        }
    }

    fn reply(out: &mut Vec<Output>, reply: &str) {
        out.push(Output::Reply(format!("{reply}\r\n")));
    }

    fn process(&mut self, out: &mut Vec<Output>) {
        loop {
            let progressed = match self.state {
                State::Command => self.command_step(out),
                State::Data { .. } => self.data_step(out),
                State::Bdat { .. } => self.bdat_step(out),
                State::Connected | State::Storing | State::Tls | State::Closed => false,
            };
            if !progressed {
                return;
            }
        }
    }

    /// Handles at most one command line; false when more input is needed or processing must pause.
    fn command_step(&mut self, out: &mut Vec<Output>) -> bool {
        let max = self.config.max_line_length;
        let Some(pos) = memchr(b'\n', &self.buf) else {
            if self.buf.len() >= max {
                // Keep only a trailing CR so a CRLF split across reads is still recognised.
                let keep_cr = self.buf.last() == Some(&b'\r');
                self.buf.clear();
                if keep_cr {
                    self.buf.push(b'\r');
                }
                self.skipping_line = true;
            }
            return false;
        };
        let line: Vec<u8> = self.buf.drain(..=pos).collect();
        if self.skipping_line || line.len() > max {
            self.skipping_line = false;
            tracing::warn!(peer = %self.peer, limit = max, "SMTP command line too long");
            self.error(out, "500 5.5.2 Line too long");
            return true;
        }
        if line.len() < 2 || line[line.len() - 2] != b'\r' {
            tracing::warn!(peer = %self.peer, "SMTP bare LF in a command; closing");
            self.close(out, "521 5.5.2 Error: bare LF received; closing\r\n".to_string());
            return false;
        }
        let body = &line[..line.len() - 2];
        if body.contains(&b'\r') {
            tracing::warn!(peer = %self.peer, "SMTP bare CR in a command; closing");
            self.close(out, "521 5.5.2 Error: bare CR received; closing\r\n".to_string());
            return false;
        }
        if looks_like_http(body) {
            tracing::warn!(peer = %self.peer, "HTTP request on the SMTP port; closing");
            self.close(out, "554 5.7.0 HTTP request on the SMTP port; closing\r\n".to_string());
            return false;
        }
        if body.contains(&0) {
            tracing::warn!(peer = %self.peer, "SMTP NUL byte in a command");
            self.error(out, "500 5.5.2 NUL byte in command");
            return true;
        }
        let parsed = Request::parse(&mut line.iter()).map(Request::into_owned);
        self.command(out, parsed);
        matches!(self.state, State::Command | State::Data { .. } | State::Bdat { .. })
    }

    fn command(&mut self, out: &mut Vec<Output>, parsed: Result<Request<String>, ProtoError>) {
        let request = match parsed {
            Ok(r) => r,
            Err(e) => {
                let reply = match e {
                    ProtoError::UnknownCommand => "500 5.5.1 Unknown command".to_string(),
                    ProtoError::InvalidSenderAddress => "501 5.1.7 Bad sender address syntax".to_string(),
                    ProtoError::InvalidRecipientAddress => "501 5.1.3 Bad recipient address syntax".to_string(),
                    ProtoError::SyntaxError { syntax } => format!("501 5.5.2 Syntax: {syntax}"),
                    ProtoError::InvalidParameter { param } => format!("501 5.5.4 Invalid parameter {param}"),
                    ProtoError::UnsupportedParameter { param } => {
                        format!("555 5.5.4 Unsupported parameter {}", param.chars().take(64).collect::<String>())
                    }
                    _ => "500 5.5.2 Syntax error".to_string(),
                };
                self.error(out, &reply);
                return;
            }
        };
        match request {
            Request::Ehlo { host } => {
                self.helo = Some(host.clone());
                self.esmtp = true;
                self.tx = None;
                let c = &self.config;
                let mut r = format!("250-{} greets {}\r\n", c.hostname, sanitize(&host));
                let _ = write!(r, "250-PIPELINING\r\n250-SIZE {}\r\n", c.max_message_size);
                r.push_str("250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n");
                if c.starttls && !self.tls {
                    r.push_str("250-STARTTLS\r\n");
                }
                r.push_str("250 CHUNKING\r\n");
                out.push(Output::Reply(r));
            }
            Request::Helo { host } => {
                self.helo = Some(host);
                self.esmtp = false;
                self.tx = None;
                Self::reply(out, &format!("250 {}", self.config.hostname));
            }
            Request::Mail { from } => {
                if self.helo.is_none() {
                    return self.error(out, "503 5.5.1 Error: send HELO/EHLO first");
                }
                if self.tx.is_some() {
                    return self.error(out, "503 5.5.1 Error: nested MAIL command");
                }
                if from.size > self.config.max_message_size {
                    tracing::info!(peer = %self.peer, size = from.size, "SMTP message refused by declared SIZE");
                    return Self::reply(out, "552 5.3.4 Message size exceeds fixed maximum message size");
                }
                if from.flags & MAIL_BODY_BINARYMIME != 0 {
                    return self.error(out, "555 5.5.4 BODY=BINARYMIME is not supported");
                }
                let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
                if smtputf8 && !self.esmtp {
                    return self.error(out, "503 5.5.1 Error: SMTPUTF8 needs EHLO");
                }
                if !from.address.is_ascii() && !smtputf8 {
                    return self.error(out, "553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter");
                }
                self.tx = Some(Transaction { from: from.address, smtputf8, ..Transaction::default() });
                Self::reply(out, "250 2.1.0 Ok");
            }
            Request::Rcpt { to } => {
                let Some(tx) = self.tx.as_mut() else {
                    return self.error(out, "503 5.5.1 Error: need MAIL command");
                };
                if !to.address.is_ascii() && !tx.smtputf8 {
                    return self.error(out, "553 5.6.7 Non-ASCII address needs SMTPUTF8 at MAIL FROM");
                }
                if tx.recipients.len() >= self.config.max_recipients {
                    tracing::info!(peer = %self.peer, limit = self.config.max_recipients, "SMTP recipient cap reached");
                    return Self::reply(out, "452 4.5.3 Too many recipients");
                }
                match self.config.addresses.resolve(&to.address) {
                    Some(r) => {
                        if !tx.recipients.iter().any(|x| x.original.eq_ignore_ascii_case(&r.original)) {
                            tx.recipients.push(r);
                        }
                        Self::reply(out, "250 2.1.5 Ok");
                    }
                    None => {
                        tracing::info!(peer = %self.peer, "SMTP RCPT for an unknown address rejected");
                        self.error(out, "550 5.1.1 Recipient address rejected: user unknown");
                    }
                }
            }
            Request::Data => match self.tx.as_ref() {
                None => self.error(out, "503 5.5.1 Error: need MAIL command"),
                Some(tx) if tx.recipients.is_empty() => self.error(out, "554 5.5.1 Error: no valid recipients"),
                Some(tx) if !tx.data.is_empty() => self.error(out, "503 5.5.1 Error: DATA after BDAT"),
                Some(_) => {
                    self.state = State::Data { line_start: true };
                    Self::reply(out, "354 End data with <CR><LF>.<CR><LF>");
                }
            },
            Request::Bdat { chunk_size, is_last } => {
                // The chunk is read in any case, to stay in step with the client.
                let discard = !self.esmtp || self.tx.as_ref().is_none_or(|t| t.recipients.is_empty());
                self.state = State::Bdat { remaining: chunk_size, last: is_last, discard };
            }
            Request::Rset => {
                self.tx = None;
                Self::reply(out, "250 2.0.0 Ok");
            }
            Request::Noop { .. } => Self::reply(out, "250 2.0.0 Ok"),
            Request::Quit => {
                self.close(out, "221 2.0.0 Bye\r\n".to_string());
            }
            Request::Vrfy { .. } => {
                Self::reply(out, "252 2.5.0 Cannot VRFY user; send mail and delivery will be attempted")
            }
            Request::Help { .. } => Self::reply(out, "214 2.0.0 See RFC 5321"),
            Request::StartTls => {
                if !self.config.starttls {
                    return self.error(out, "502 5.5.1 STARTTLS not available");
                }
                if self.tls {
                    return self.error(out, "503 5.5.1 TLS already active");
                }
                if !self.esmtp {
                    return self.error(out, "503 5.5.1 Error: send EHLO first");
                }
                if !self.buf.is_empty() {
                    tracing::warn!(peer = %self.peer, bytes = self.buf.len(), "SMTP plaintext pipelined after STARTTLS discarded");
                    self.buf.clear();
                }
                self.state = State::Tls;
                Self::reply(out, "220 2.0.0 Ready to start TLS");
                out.push(Output::StartTls);
            }
            other => {
                let reply = format!("502 5.5.1 {} not implemented", other.name());
                self.error(out, &reply);
            }
        }
    }

    /// Consumes DATA lines; false when more input is needed or processing must pause.
    fn data_step(&mut self, out: &mut Vec<Output>) -> bool {
        let State::Data { line_start } = self.state else { return false };
        let Some(pos) = memchr(b'\n', &self.buf) else {
            if self.buf.len() > DATA_FLUSH {
                // A long line: move all but a trailing CR into the message now.
                let keep = usize::from(self.buf.last() == Some(&b'\r'));
                let take = self.buf.len() - keep;
                let chunk: Vec<u8> = self.buf.drain(..take).collect();
                if chunk.contains(&b'\r') {
                    return self.bare(out, "CR");
                }
                let chunk = if line_start && chunk.first() == Some(&b'.') { &chunk[1..] } else { &chunk[..] };
                self.append(chunk, false);
                self.state = State::Data { line_start: false };
            }
            return false;
        };
        let line: Vec<u8> = self.buf.drain(..=pos).collect();
        if line.len() < 2 || line[line.len() - 2] != b'\r' {
            return self.bare(out, "LF");
        }
        let content = &line[..line.len() - 2];
        if content.contains(&b'\r') {
            return self.bare(out, "CR");
        }
        if line_start && content == b"." {
            self.end_of_message(out);
            return !matches!(self.state, State::Storing | State::Closed);
        }
        let content = if line_start && content.first() == Some(&b'.') { &content[1..] } else { content };
        self.append(content, true);
        self.state = State::Data { line_start: true };
        true
    }

    fn append(&mut self, content: &[u8], crlf: bool) {
        let Some(tx) = self.tx.as_mut() else { return };
        if content.contains(&0) {
            tx.nul = true;
        }
        let add = content.len() + if crlf { 2 } else { 0 };
        if tx.oversize || tx.data.len() + add > self.config.max_message_size {
            if !tx.oversize {
                tracing::info!(peer = %self.peer, limit = self.config.max_message_size, "SMTP message exceeds the size limit; discarding the rest");
            }
            tx.oversize = true;
            tx.data = Vec::new();
            return;
        }
        tx.data.extend_from_slice(content);
        if crlf {
            tx.data.extend_from_slice(b"\r\n");
        }
    }

    fn bare(&mut self, out: &mut Vec<Output>, what: &str) -> bool {
        tracing::warn!(peer = %self.peer, what, "SMTP bare {what} in DATA (possible smuggling); message rejected, closing");
        self.tx = None;
        self.close(out, format!("521 5.5.2 Error: bare {what} received; message rejected, closing\r\n"));
        false
    }

    fn bdat_step(&mut self, out: &mut Vec<Output>) -> bool {
        let State::Bdat { remaining, last, discard } = self.state else { return false };
        let take = remaining.min(self.buf.len());
        let chunk: Vec<u8> = self.buf.drain(..take).collect();
        if !discard {
            self.append(&chunk, false);
        }
        let remaining = remaining - take;
        self.state = State::Bdat { remaining, last, discard };
        if remaining > 0 {
            return false;
        }
        self.state = State::Command;
        if discard {
            let reply = if self.esmtp && self.tx.is_some() {
                "554 5.5.1 Error: no valid recipients"
            } else {
                "503 5.5.1 Error: send EHLO, MAIL and RCPT before BDAT"
            };
            self.tx = None;
            self.error(out, reply);
            return !self.is_closed();
        }
        if last {
            self.end_of_message(out);
            return !matches!(self.state, State::Storing | State::Closed);
        }
        let size = self.tx.as_ref().map_or(0, |t| t.data.len());
        Self::reply(out, &format!("250 2.0.0 {size} octets received"));
        true
    }

    fn end_of_message(&mut self, out: &mut Vec<Output>) {
        self.state = State::Command;
        let Some(tx) = self.tx.take() else {
            return Self::reply(out, "503 5.5.1 Error: no transaction");
        };
        if tx.oversize {
            return Self::reply(out, "552 5.3.4 Message size exceeds fixed maximum message size");
        }
        if tx.nul {
            tracing::warn!(peer = %self.peer, "SMTP message with NUL bytes rejected");
            return Self::reply(out, "554 5.6.0 Message contains NUL bytes");
        }
        self.state = State::Storing;
        out.push(Output::Deliver(Envelope {
            mail_from: tx.from,
            recipients: tx.recipients,
            data: tx.data,
            helo: self.helo.clone().unwrap_or_default(),
            tls: self.tls,
        }));
    }
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

/// An HTTP request line (`GET / HTTP/1.1`, `CONNECT host:443 HTTP/1.1`, ...).
fn looks_like_http(bytes: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] =
        [b"GET ", b"POST ", b"HEAD ", b"PUT ", b"DELETE ", b"OPTIONS ", b"CONNECT ", b"PATCH ", b"TRACE "];
    let first_line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    METHODS.iter().any(|m| first_line.len() >= m.len() && first_line[..m.len()].eq_ignore_ascii_case(m))
        && first_line.windows(6).any(|w| w.eq_ignore_ascii_case(b" HTTP/"))
}

/// Client-supplied text echoed in a reply: printable ASCII only, bounded.
fn sanitize(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_graphic()).take(255).collect()
}
