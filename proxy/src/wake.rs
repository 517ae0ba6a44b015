//! Runs each agent's [`Lifecycle`]: feeds it inputs and timers, performs its actions with the
//! agent's wake driver, and publishes what the admin API shows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use concierge_config::{AgentConfig, DriverConfig, WakePolicy};
use concierge_store::Store;
use concierge_wakeup::{ConnectInfo, DriverStatus, WakeDriver, WakeRequest};
use tokio::sync::mpsc;

use crate::fleet::{AgentRuntime, LifecycleView};
use crate::lifecycle::{Action, DriverFailure, Input, Lifecycle, Policy, Settings, State};
use crate::metrics::Metrics;

/// How long a drained agent gets to disconnect before its session is closed.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// The machine's settings from an agent's configuration.
pub fn settings(config: &AgentConfig) -> Settings {
    let w = &config.wake;
    Settings {
        policy: match w.policy {
            WakePolicy::Immediate => Policy::Immediate,
            WakePolicy::Coalesce(d) => Policy::Coalesce(d),
            WakePolicy::Never => Policy::Never,
        },
        connect_timeout: w.connect_timeout,
        max_attempts: w.max_attempts.max(1),
        backoff_initial: w.backoff_initial,
        backoff_max: w.backoff_max,
        unreachable_retry: w.unreachable_retry,
        sleep_after: w.sleep_after,
    }
}

/// Builds the configured driver; `None` when the agent has no driver (it connects by itself).
/// `http` is the one client every HTTP-based driver shares ([`concierge_wakeup::http_client`]).
pub fn driver(
    config: &AgentConfig,
    http: &reqwest::Client,
) -> Result<Option<Arc<dyn WakeDriver>>, concierge_wakeup::WakeError> {
    use concierge_wakeup::{ExecDriver, ExecOptions, FlyDriver, FlyOptions, HttpDriver, HttpOptions};
    Ok(match &config.wake.driver {
        DriverConfig::None => None,
        DriverConfig::Exec { command, env, settle, stop_command } => Some(Arc::new(ExecDriver::new(ExecOptions {
            command: command.clone(),
            env: env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            settle: *settle,
            stop_command: stop_command.clone(),
        })?)),
        DriverConfig::Http { url, secret, timeout } => Some(Arc::new(HttpDriver::new(HttpOptions {
            url: url.clone(),
            secret: secret.as_ref().map(|s| concierge_adapters::signature::secret_bytes(s.expose())),
            timeout: *timeout,
            client: http.clone(),
        })?)),
        DriverConfig::Fly { api_base, app, machine, api_token, wait_timeout } => {
            Some(Arc::new(FlyDriver::new(FlyOptions {
                api_base: api_base.clone(),
                app: app.clone(),
                machine: machine.clone(),
                api_token: api_token.expose().to_string(),
                wait_timeout: *wait_timeout,
                client: http.clone(),
            })?))
        }
    })
}

/// Spawns the runner of one agent's lifecycle.
pub fn spawn(
    agent: Arc<AgentRuntime>,
    mut inputs: mpsc::UnboundedReceiver<Input>,
    driver: Option<Arc<dyn WakeDriver>>,
    connect: ConnectInfo,
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
) -> tokio::task::JoinHandle<()> {
    let mut machine = Lifecycle::new(settings(&agent.config), agent.pending() > 0);
    let loopback = agent.clone();
    tokio::spawn(async move {
        let actions = machine.start(Instant::now());
        perform(&agent, &driver, &connect, &store, actions);
        publish(&agent, &machine, &metrics);
        loop {
            let deadline = machine.deadline();
            let input = tokio::select! {
                input = inputs.recv() => match input { Some(i) => i, None => return },
                _ = sleep_until(deadline) => Input::Timer,
            };
            let actions = machine.handle(input, Instant::now());
            perform(&loopback, &driver, &connect, &store, actions);
            publish(&agent, &machine, &metrics);
        }
    })
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

fn publish(agent: &AgentRuntime, machine: &Lifecycle, metrics: &Metrics) {
    let now = Instant::now();
    let before = agent.view().last_wake;
    if let Some(w) = machine.last_wake().filter(|w| w.outcome != "in_progress")
        && before.is_none_or(|b| b.started_at_ms != w.started_at_ms || b.outcome != w.outcome)
    {
        metrics.wake_finished(w);
    }
    agent.set_view(LifecycleView {
        state: machine.state(),
        last_wake: machine.last_wake().cloned(),
        last_error: machine.last_error().map(str::to_string),
        next_action_in_ms: machine.deadline().map(|d| d.saturating_duration_since(now).as_millis() as u64),
    });
}

fn perform(
    agent: &Arc<AgentRuntime>,
    driver: &Option<Arc<dyn WakeDriver>>,
    connect: &ConnectInfo,
    store: &Arc<dyn Store>,
    actions: Vec<Action>,
) {
    for action in actions {
        let agent = agent.clone();
        let driver = driver.clone();
        match action {
            Action::CallDriver { attempt } => {
                let store = store.clone();
                let request = WakeRequest {
                    agent: agent.id().to_string(),
                    reason: if attempt == 1 { "events pending".into() } else { format!("retry {attempt}") },
                    pending: agent.pending(),
                    connect: connect.clone(),
                };
                let cap = agent.config.wake.connect_timeout.max(Duration::from_secs(60));
                let span = tracing::info_span!("wake", agent = agent.id(), attempt);
                spawn_in(span, async move {
                    let result = match driver {
                        None => Err(DriverFailure {
                            message: "no wake driver configured; waiting for the agent to connect".into(),
                            retryable: false,
                        }),
                        Some(d) => {
                            // Read while the agent boots, so its Hello is answered from memory.
                            let hold = agent.config.wake.connect_timeout;
                            tokio::spawn(crate::warm_start::prepare(agent.clone(), store, hold));
                            agent.input(Input::DriverCalled { at: Instant::now() });
                            match tokio::time::timeout(cap, d.wake(&request)).await {
                                Ok(Ok(())) => Ok(()),
                                // Driver messages already name the driver.
                                Ok(Err(e)) => Err(DriverFailure { message: e.message, retryable: e.retryable }),
                                Err(_) => Err(DriverFailure {
                                    message: format!("{} driver did not return within {cap:?}", d.kind()),
                                    retryable: true,
                                }),
                            }
                        }
                    };
                    match &result {
                        // The agent connected (and maybe already went back to sleep) before the
                        // driver call returned: its late error no longer matters.
                        Err(e) if agent.view().state != State::Waking => {
                            tracing::debug!(agent = %request.agent, attempt, error = %e.message, "driver returned after the wake completed")
                        }
                        Err(e) => {
                            tracing::warn!(agent = %request.agent, attempt, error = %e.message, "wake attempt failed")
                        }
                        Ok(()) => {}
                    }
                    agent.input(Input::DriverReturned(result));
                });
            }
            Action::Sleep => {
                tokio::spawn(async move {
                    let result = put_to_sleep(&agent, driver.as_deref()).await;
                    agent.input(Input::SleepReturned(result));
                });
            }
        }
    }
}

/// Spawns `task` inside `span` (the `wake` span of one driver call).
fn spawn_in(span: tracing::Span, task: impl Future<Output = ()> + Send + 'static) {
    tokio::spawn(tracing::Instrument::instrument(task, span));
}

/// Drains the session, stops the compute where the driver can, and verifies it went away.
async fn put_to_sleep(agent: &AgentRuntime, driver: Option<&dyn WakeDriver>) -> Result<(), DriverFailure> {
    let mut detached = agent.watch_detach();
    if agent.request_drain() && tokio::time::timeout(DRAIN_GRACE, detached.changed()).await.is_err() {
        tracing::warn!(agent = agent.id(), "agent did not disconnect after Drain; closing its session");
        agent.close_session("sleep: drain timed out");
    }
    let Some(driver) = driver.filter(|d| d.can_sleep()) else { return Ok(()) };
    driver.sleep(agent.id()).await.map_err(|e| DriverFailure {
        message: format!("{} driver sleep: {}", driver.kind(), e.message),
        retryable: e.retryable,
    })?;
    // "stop() returned success while the container kept running" is a real failure mode.
    for _ in 0..20 {
        match driver.status(agent.id()).await {
            Ok(DriverStatus::Stopped) | Ok(DriverStatus::Unknown) => return Ok(()),
            Ok(DriverStatus::Running) => tokio::time::sleep(Duration::from_millis(250)).await,
            Err(e) => return Err(DriverFailure { message: e.message, retryable: e.retryable }),
        }
    }
    Err(DriverFailure {
        message: format!("{} driver reported sleep but the agent is still running", driver.kind()),
        retryable: true,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use async_trait::async_trait;
    use concierge_wakeup::WakeError;

    use super::*;

    /// A driver whose stop "succeeds" while the compute keeps running (a stop that did not
    /// stick, a restart policy bringing the machine back).
    #[derive(Default)]
    struct StopDoesNotStick {
        sleeps: AtomicU32,
        status_calls: AtomicU32,
    }

    #[async_trait]
    impl WakeDriver for StopDoesNotStick {
        fn kind(&self) -> &'static str {
            "stub"
        }
        async fn wake(&self, _req: &WakeRequest) -> Result<(), WakeError> {
            Ok(())
        }
        fn can_sleep(&self) -> bool {
            true
        }
        async fn sleep(&self, _agent: &str) -> Result<(), WakeError> {
            self.sleeps.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn status(&self, _agent: &str) -> Result<DriverStatus, WakeError> {
            self.status_calls.fetch_add(1, Ordering::SeqCst);
            Ok(DriverStatus::Running)
        }
    }

    fn agent(sleep_after: &str) -> (Arc<AgentRuntime>, mpsc::UnboundedReceiver<Input>) {
        let toml = format!(
            "[agents.a]\ntoken = \"test-token-0123456789\"\n[agents.a.wake]\ndriver = \"exec\"\ncommand = [\"true\"]\nsleep_after = \"{sleep_after}\"\n"
        );
        let config = concierge_config::load_str(&toml, "test.toml").expect("valid test config");
        AgentRuntime::new(config.agents["a"].clone(), 0, 0)
    }

    #[tokio::test]
    async fn a_sleep_the_driver_reports_but_that_does_not_stick_is_recorded() {
        let (runtime, inputs) = agent("50ms");
        let driver = Arc::new(StopDoesNotStick::default());
        let connect = ConnectInfo { addr: "127.0.0.1:1".into(), server_name: "localhost".into(), cert_sha256: None };
        let dir = tempfile::tempdir().unwrap();
        let store = concierge_store::SqliteStore::open(&dir.path().join("store.db"), Default::default()).unwrap();
        let metrics = Arc::new(Metrics::new(0));
        let runner = spawn(runtime.clone(), inputs, Some(driver.clone()), connect, metrics, Arc::new(store));
        runtime.input(Input::Connected { at: Instant::now() });
        runtime.input(Input::Idle); // nothing pending: the runner puts the agent to sleep

        let deadline = Instant::now() + Duration::from_secs(30);
        let error = loop {
            if let Some(e) = runtime.view().last_error {
                break e;
            }
            assert!(Instant::now() < deadline, "no error recorded; view: {:?}", runtime.view().state);
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(error, "sleep failed: stub driver reported sleep but the agent is still running");
        assert_eq!(driver.sleeps.load(Ordering::SeqCst), 1, "the driver was asked to stop once");
        assert!(driver.status_calls.load(Ordering::SeqCst) > 1, "the stop was checked more than once");
        runner.abort();
    }
}
