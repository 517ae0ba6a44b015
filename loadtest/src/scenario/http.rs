//! A lean keep-alive HTTP/1.1 client for load generation: one TCP connection per [`Conn`],
//! requests sent one after another on it (hyper's connection-level client, no pool, no
//! redirects, no per-request allocation beyond the request itself), so the generator spends
//! its CPU on the proxy, not on itself.

use std::net::SocketAddr;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// One keep-alive connection to `addr`.
pub struct Conn {
    addr: SocketAddr,
    host: String,
    sender: SendRequest<Full<Bytes>>,
}

/// What came back.
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The whole body.
    pub body: Bytes,
}

impl Conn {
    /// Opens a connection (TCP_NODELAY: small requests must not wait for Nagle).
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP handshake with {addr}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Conn { addr, host: addr.to_string(), sender })
    }

    /// The server this connection goes to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// POSTs `body` to `path` with `headers`, reads the whole answer.
    pub async fn post(&mut self, path: &str, headers: &[(&str, &str)], body: Bytes) -> anyhow::Result<Answer> {
        self.sender.ready().await.context("connection closed")?;
        let mut request = hyper::Request::post(path).header("host", &self.host);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = request.body(Full::new(body)).context("building the request")?;
        let response = self.sender.send_request(request).await.context("sending the request")?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.context("reading the response")?.to_bytes();
        Ok(Answer { status, body })
    }
}
