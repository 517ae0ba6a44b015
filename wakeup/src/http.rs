//! The `http` driver: a signed POST to a URL (Cloudflare Workers/Containers, Lambda URLs,
//! Cloud Run, Modal, anything serverless). The body says who to wake and where to dial; when
//! a secret is configured the request carries Standard Webhooks signature headers.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use reqwest::{StatusCode, Url};
use tokio::time::Instant;

use crate::util::{body_prefix, display_url, reqwest_error, snippet};
use crate::{WakeDriver, WakeError, WakeRequest};

/// How many times a 5xx or connection failure is retried inside one `wake` call.
const MAX_RETRIES: usize = 2;
/// Pause before each in-driver retry (the lifecycle does the long backoff).
const BACKOFF: [Duration; MAX_RETRIES] = [Duration::from_millis(100), Duration::from_millis(400)];
/// How much of an error response is quoted in the message.
const BODY_SNIPPET: usize = 512;

/// Options of the `http` driver, mapped from the proxy's configuration.
#[derive(Clone)]
pub struct HttpOptions {
    /// Endpoint that starts the agent's compute when POSTed to.
    pub url: String,
    /// Standard Webhooks signing key (raw bytes); `None` sends unsigned requests.
    pub secret: Option<Vec<u8>>,
    /// Bound on the whole `wake` call, retries included.
    pub timeout: Duration,
    /// From [`crate::http_client`], shared by every driver.
    pub client: reqwest::Client,
}

impl fmt::Debug for HttpOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpOptions")
            .field("url", &redacted_url(&self.url))
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn redacted_url(url: &str) -> String {
    Url::parse(url).map(|u| display_url(&u)).unwrap_or_else(|_| "<invalid url>".into())
}

/// Wakes agents by POSTing a (signed) JSON request to a URL.
pub struct HttpDriver {
    url: Url,
    shown_url: String,
    secret: Option<Vec<u8>>,
    timeout: Duration,
    client: reqwest::Client,
}

impl fmt::Debug for HttpDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpDriver")
            .field("url", &self.shown_url)
            .field("signed", &self.secret.is_some())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// One failed attempt, and whether it is worth another try within this call.
struct Failed {
    error: WakeError,
    retry_here: bool,
}

impl HttpDriver {
    /// Creates the driver; fails (non-retryable) on a URL that is not http(s).
    pub fn new(opts: HttpOptions) -> Result<Self, WakeError> {
        let url =
            Url::parse(&opts.url).map_err(|err| WakeError::permanent(format!("http driver: invalid url: {err}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(WakeError::permanent(format!(
                "http driver: url scheme must be http or https, not {}",
                url.scheme()
            )));
        }
        if opts.timeout.is_zero() {
            return Err(WakeError::permanent("http driver: timeout must be greater than zero"));
        }
        Ok(HttpDriver {
            shown_url: display_url(&url),
            url,
            secret: opts.secret,
            timeout: opts.timeout,
            client: opts.client,
        })
    }

    async fn attempt(&self, id: &str, body: &[u8], limit: Duration) -> Result<(), Failed> {
        let mut request =
            self.client.post(self.url.clone()).timeout(limit).header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some(secret) = &self.secret {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let now = i64::try_from(now).unwrap_or(i64::MAX);
            for (name, value) in concierge_adapters::signature::standard_headers(secret, id, now, body) {
                request = request.header(name, value);
            }
        }
        let response = match request.body(body.to_vec()).send().await {
            Ok(response) => response,
            Err(err) => {
                let timed_out = err.is_timeout();
                let error = WakeError::retryable(format!(
                    "http driver: POST {} failed: {}",
                    self.shown_url,
                    reqwest_error(err)
                ));
                // A timeout has used up the budget; anything else (refused, reset) may pass.
                return Err(Failed { error, retry_here: !timed_out });
            }
        };
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = snippet(&body_prefix(response, BODY_SNIPPET).await, BODY_SNIPPET);
        let message = format!("http driver: POST {} answered {status}: {text}", self.shown_url);
        Err(classify(status, message))
    }
}

/// 5xx are retried here and by the lifecycle; 408/429 only by the lifecycle (which backs
/// off); other 4xx (and unfollowed 3xx) are configuration errors that retrying cannot fix.
fn classify(status: StatusCode, message: String) -> Failed {
    if status.is_server_error() {
        Failed { error: WakeError::retryable(message), retry_here: true }
    } else if status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS {
        Failed { error: WakeError::retryable(message), retry_here: false }
    } else {
        Failed { error: WakeError::permanent(message), retry_here: false }
    }
}

#[async_trait]
impl WakeDriver for HttpDriver {
    fn kind(&self) -> &'static str {
        "http"
    }

    async fn wake(&self, req: &WakeRequest) -> Result<(), WakeError> {
        let payload = serde_json::json!({
            "agent": req.agent,
            "reason": req.reason,
            "pending": req.pending,
            "connect": {
                "addr": req.connect.addr,
                "server_name": req.connect.server_name,
                "cert_sha256": req.connect.cert_sha256,
            },
        });
        let body = serde_json::to_vec(&payload)
            .map_err(|err| WakeError::permanent(format!("http driver: cannot encode request: {err}")))?;
        // One id for all attempts: the receiver can deduplicate retries by `webhook-id`.
        let id = format!("wake_{:032x}", rand::random::<u128>());
        let deadline = Instant::now() + self.timeout;
        let mut retries = 0;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt = tokio::time::timeout(remaining, self.attempt(&id, &body, remaining)).await;
            let failed = match attempt {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(failed)) => failed,
                Err(_) => {
                    return Err(WakeError::retryable(format!(
                        "http driver: POST {} timed out after {:?}",
                        self.shown_url, self.timeout
                    )));
                }
            };
            let Some(pause) = BACKOFF.get(retries).copied() else { return Err(failed.error) };
            if !failed.retry_here || Instant::now() + pause >= deadline {
                return Err(failed.error);
            }
            tracing::debug!(agent = %req.agent, error = %failed.error, "http driver: retrying");
            tokio::time::sleep(pause).await;
            retries += 1;
        }
    }
}
