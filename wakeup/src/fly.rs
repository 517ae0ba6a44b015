//! The `fly` driver: starts and stops one Fly Machine through the Machines API.
//!
//! Wake is `POST /v1/apps/{app}/machines/{id}/start` followed by
//! `GET .../wait?state=started&timeout=<s>` (200 once reached, 408 when the wait timed out;
//! the server caps one wait at 60 s, so longer budgets loop). Sleep is `POST .../stop` then
//! `GET .../wait?state=stopped&instance_id=<version>`. Status reads `state` from
//! `GET /v1/apps/{app}/machines/{id}`. The API token is sent as a bearer token and never
//! appears in errors or `Debug` output.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use tokio::time::Instant;

use crate::util::{body_prefix, display_url, reqwest_error, snippet};
use crate::{DriverStatus, WakeDriver, WakeError, WakeRequest};

/// Bound on each non-waiting API call (start, stop, get).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest single `wait` the Machines API accepts, in seconds.
const MAX_WAIT_SECS: u64 = 60;
/// Time allowed beyond a `wait`'s own timeout for the answer to arrive.
const WAIT_SLACK: Duration = Duration::from_secs(5);
/// How much of a response body is read (machine objects include their config).
const BODY_LIMIT: usize = 64 * 1024;
/// How much of an error response is quoted in a message.
const BODY_SNIPPET: usize = 512;

/// Options of the `fly` driver, mapped from the proxy's configuration.
#[derive(Clone)]
pub struct FlyOptions {
    /// Machines API base URL (`https://api.machines.dev`, or a local fake in tests).
    pub api_base: String,
    /// Fly app that owns the machine.
    pub app: String,
    /// Machine id to start and stop.
    pub machine: String,
    /// Fly API token, sent as `Authorization: Bearer`; never logged.
    pub api_token: String,
    /// How long a wake or sleep waits for the machine to reach its state.
    pub wait_timeout: Duration,
    /// From [`crate::http_client`], shared by every driver.
    pub client: reqwest::Client,
}

impl fmt::Debug for FlyOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlyOptions")
            .field("api_base", &self.api_base)
            .field("app", &self.app)
            .field("machine", &self.machine)
            .field("api_token", &"<redacted>")
            .field("wait_timeout", &self.wait_timeout)
            .finish()
    }
}

/// Wakes an agent by starting its Fly Machine, and puts it to sleep by stopping it.
pub struct FlyDriver {
    base: Url,
    app: String,
    machine: String,
    token: String,
    wait_timeout: Duration,
    client: reqwest::Client,
}

impl fmt::Debug for FlyDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlyDriver")
            .field("api_base", &display_url(&self.base))
            .field("app", &self.app)
            .field("machine", &self.machine)
            .field("api_token", &"<redacted>")
            .field("wait_timeout", &self.wait_timeout)
            .finish_non_exhaustive()
    }
}

/// The part of the machine object the driver reads.
#[derive(Debug, Deserialize)]
struct MachineInfo {
    state: String,
    #[serde(default)]
    instance_id: Option<String>,
}

/// A response: status and the first `BODY_LIMIT` bytes of the body.
struct Answer {
    status: StatusCode,
    body: Vec<u8>,
}

impl FlyDriver {
    /// Creates the driver; fails (non-retryable) on an invalid base URL or empty names.
    pub fn new(opts: FlyOptions) -> Result<Self, WakeError> {
        let base = Url::parse(&opts.api_base)
            .map_err(|err| WakeError::permanent(format!("fly driver: invalid api_base: {err}")))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            return Err(WakeError::permanent("fly driver: api_base must be an http(s) URL"));
        }
        if opts.app.is_empty() || opts.machine.is_empty() {
            return Err(WakeError::permanent("fly driver: app and machine must be set"));
        }
        Ok(FlyDriver {
            base,
            app: opts.app,
            machine: opts.machine,
            token: opts.api_token,
            wait_timeout: opts.wait_timeout,
            client: opts.client,
        })
    }

    fn url(&self, action: Option<&str>) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().extend(["v1", "apps", &self.app, "machines", &self.machine]);
            if let Some(action) = action {
                segments.push(action);
            }
        }
        url
    }

    /// Quotes the start of a body, with any echo of the token removed.
    fn quote(&self, body: &[u8]) -> String {
        let text = snippet(body, BODY_SNIPPET);
        if self.token.is_empty() { text } else { text.replace(&self.token, "<redacted>") }
    }

    async fn call(
        &self,
        method: Method,
        action: Option<&str>,
        query: &[(&str, String)],
        limit: Duration,
    ) -> Result<Answer, WakeError> {
        let what = format!("{method} {}", action.unwrap_or("machine"));
        let request =
            self.client.request(method, self.url(action)).query(query).bearer_auth(&self.token).timeout(limit);
        let exchange = async {
            let response = request.send().await?;
            let status = response.status();
            Ok::<_, reqwest::Error>(Answer { status, body: body_prefix(response, BODY_LIMIT).await })
        };
        match tokio::time::timeout(limit, exchange).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(err)) => Err(WakeError::retryable(format!(
                "fly driver: {what} for {}/{} failed: {}",
                self.app,
                self.machine,
                reqwest_error(err)
            ))),
            Err(_) => Err(WakeError::retryable(format!(
                "fly driver: {what} for {}/{} timed out after {limit:?}",
                self.app, self.machine
            ))),
        }
    }

    /// Turns an unexpected answer into an error: 401/403/404 and other 4xx are permanent,
    /// 5xx, 408 and 429 retryable.
    fn fail(&self, what: &str, answer: &Answer) -> WakeError {
        let status = answer.status;
        let body = self.quote(&answer.body);
        let target = format!("{}/{}", self.app, self.machine);
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => WakeError::permanent(format!(
                "fly driver: {what} for {target} refused with {status} (check the API token): {body}"
            )),
            StatusCode::NOT_FOUND => WakeError::permanent(format!(
                "fly driver: {what}: app or machine {target} not found ({status}): {body}"
            )),
            s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT || s == StatusCode::TOO_MANY_REQUESTS => {
                WakeError::retryable(format!("fly driver: {what} for {target} answered {status}: {body}"))
            }
            _ => WakeError::permanent(format!("fly driver: {what} for {target} answered {status}: {body}")),
        }
    }

    async fn machine_info(&self) -> Result<MachineInfo, WakeError> {
        let answer = self.call(Method::GET, None, &[], REQUEST_TIMEOUT).await?;
        if !answer.status.is_success() {
            return Err(self.fail("get machine", &answer));
        }
        serde_json::from_slice(&answer.body).map_err(|err| {
            WakeError::retryable(format!(
                "fly driver: unreadable machine object for {}/{}: {err}",
                self.app, self.machine
            ))
        })
    }

    /// Long-polls `wait` until the machine reaches `state`, looping over 408s until `deadline`.
    async fn wait_for(&self, state: &str, instance_id: Option<&str>, deadline: Instant) -> Result<(), WakeError> {
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let secs = (remaining.as_secs() + u64::from(remaining.subsec_nanos() > 0)).clamp(1, MAX_WAIT_SECS);
            let mut query = vec![("state", state.to_string()), ("timeout", secs.to_string())];
            if let Some(id) = instance_id {
                query.push(("instance_id", id.to_string()));
            }
            let answer = self.call(Method::GET, Some("wait"), &query, Duration::from_secs(secs) + WAIT_SLACK).await?;
            if answer.status.is_success() {
                return Ok(());
            }
            if answer.status != StatusCode::REQUEST_TIMEOUT {
                return Err(self.fail(&format!("wait for {state}"), &answer));
            }
            if Instant::now() >= deadline {
                return Err(WakeError::retryable(format!(
                    "fly driver: machine {}/{} did not reach {state} within {:?}",
                    self.app, self.machine, self.wait_timeout
                )));
            }
        }
    }

    /// For a start/stop refused with a conflict: `Ok(state)` if the machine is already where
    /// (or on its way to where) we want it.
    async fn conflict_is_fine(&self, answer: &Answer, fine: &[&str], what: &str) -> Result<String, WakeError> {
        if !matches!(answer.status, StatusCode::CONFLICT | StatusCode::PRECONDITION_FAILED | StatusCode::BAD_REQUEST) {
            return Err(self.fail(what, answer));
        }
        let info = self.machine_info().await?;
        if fine.contains(&info.state.as_str()) {
            return Ok(info.state);
        }
        let body = self.quote(&answer.body);
        let message = format!(
            "fly driver: {what} for {}/{} answered {} while the machine is {}: {body}",
            self.app, self.machine, answer.status, info.state
        );
        // A conflict with a machine in transition clears by itself; a 400 is our mistake.
        Err(if answer.status == StatusCode::BAD_REQUEST {
            WakeError::permanent(message)
        } else {
            WakeError::retryable(message)
        })
    }
}

#[async_trait]
impl WakeDriver for FlyDriver {
    fn kind(&self) -> &'static str {
        "fly"
    }

    async fn wake(&self, req: &WakeRequest) -> Result<(), WakeError> {
        let answer = self.call(Method::POST, Some("start"), &[], REQUEST_TIMEOUT).await?;
        if answer.status.is_success() {
            let previous = serde_json::from_slice::<serde_json::Value>(&answer.body)
                .ok()
                .and_then(|v| v.get("previous_state").and_then(|s| s.as_str()).map(str::to_owned));
            tracing::debug!(agent = %req.agent, previous_state = ?previous, "fly driver: start accepted");
        } else {
            // "Machine still active" and friends: already started (or starting) is fine.
            self.conflict_is_fine(&answer, &["started", "starting"], "start").await?;
        }
        self.wait_for("started", None, Instant::now() + self.wait_timeout).await
    }

    fn can_sleep(&self) -> bool {
        true
    }

    async fn sleep(&self, _agent: &str) -> Result<(), WakeError> {
        let info = self.machine_info().await?;
        if matches!(info.state.as_str(), "stopped" | "suspended") {
            return Ok(());
        }
        let answer = self.call(Method::POST, Some("stop"), &[], REQUEST_TIMEOUT).await?;
        if !answer.status.is_success() {
            let state = self.conflict_is_fine(&answer, &["stopped", "stopping", "suspended"], "stop").await?;
            if state != "stopping" {
                return Ok(());
            }
        }
        // Waiting for `stopped` names the machine version, as the API asks for it.
        self.wait_for("stopped", info.instance_id.as_deref(), Instant::now() + self.wait_timeout).await
    }

    async fn status(&self, _agent: &str) -> Result<DriverStatus, WakeError> {
        let info = self.machine_info().await?;
        Ok(match info.state.as_str() {
            "started" => DriverStatus::Running,
            "stopped" | "suspended" => DriverStatus::Stopped,
            _ => DriverStatus::Unknown,
        })
    }
}
