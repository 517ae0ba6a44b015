//! The `exec` driver: runs a local command (`docker start`, `systemctl start`, a Firecracker
//! script, or the agent itself) to wake an agent.
//!
//! Two shapes of command are supported. A *launcher* starts something and exits 0 within the
//! settle time (`docker start x`); a *long-running* command is the agent itself and is still
//! running when the settle time is over. The driver keeps the child of a long-running command
//! per agent, drains its stderr into a bounded tail (so the pipe never fills and an exit can
//! be explained), reaps it when it exits (no zombies) and can stop it again.

use std::collections::HashMap;
use std::fmt;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStderr, Command};
use tokio::sync::{mpsc, watch};

use crate::{DriverStatus, WakeDriver, WakeError, WakeRequest};

/// How much of a child's stderr is kept for error messages.
const STDERR_TAIL: usize = 2048;
/// How long a child gets after SIGTERM (and again after SIGKILL) before giving up.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Upper bound for a configured `stop_command` to finish.
const STOP_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait, after a child exited, for the rest of its stderr to arrive.
const STDERR_FLUSH: Duration = Duration::from_millis(250);
/// Variables the driver sets itself; any other inherited `CONCIERGE_*` variable is removed.
const OWN_VARS: [&str; 6] = [
    "CONCIERGE_AGENT",
    "CONCIERGE_CONNECT",
    "CONCIERGE_SERVER_NAME",
    "CONCIERGE_CERT_SHA256",
    "CONCIERGE_WAKE_REASON",
    "CONCIERGE_PENDING",
];

/// Options of the `exec` driver, mapped from the proxy's configuration.
#[derive(Clone, Default)]
pub struct ExecOptions {
    /// Program and arguments, run without a shell (use `["sh", "-c", "..."]` to get one).
    pub command: Vec<String>,
    /// Extra environment for the command, on top of the `CONCIERGE_*` wake variables.
    pub env: Vec<(String, String)>,
    /// How long to watch the command: an exit within it decides the outcome, a command still
    /// running after it is a long-running agent and the wake is accepted.
    pub settle: Duration,
    /// Command that stops the agent (e.g. `docker stop x`); without it `sleep` signals the
    /// child this driver spawned.
    pub stop_command: Option<Vec<String>>,
}

impl fmt::Debug for ExecOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Values of `env` are often credentials for the agent: show only the names.
        let env_names: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("ExecOptions")
            .field("command", &self.command)
            .field("env", &env_names)
            .field("settle", &self.settle)
            .field("stop_command", &self.stop_command)
            .finish()
    }
}

/// How a watched process ended.
#[derive(Debug, Clone)]
enum Exit {
    Status(ExitStatus),
    WaitFailed(String),
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Status(status) => write!(f, "{status}"),
            Exit::WaitFailed(err) => write!(f, "could not be waited for ({err})"),
        }
    }
}

/// A process this driver spawned. Its monitor task owns the `Child`; dropping the last handle
/// closes the signal channel, which makes the monitor kill the process group and reap it.
struct Proc {
    pid: u32,
    exit: watch::Receiver<Option<Exit>>,
    tail: Arc<Mutex<Tail>>,
    signals: mpsc::Sender<i32>,
}

impl Proc {
    fn is_running(&self) -> bool {
        self.exit.borrow().is_none()
    }

    /// Waits up to `limit` for the process to end; `None` if it is still running.
    async fn wait_exit(&self, limit: Duration) -> Option<Exit> {
        let mut exit = self.exit.clone();
        match tokio::time::timeout(limit, exit.wait_for(Option::is_some)).await {
            Ok(Ok(value)) => value.clone(),
            // The monitor is gone without a verdict: only at runtime shutdown, when the
            // child was killed on drop.
            Ok(Err(_)) => Some(Exit::WaitFailed("monitor stopped".into())),
            Err(_) => None,
        }
    }

    fn signal(&self, sig: i32) {
        // The monitor sends the signal only while the child is unreaped, so the pid is ours.
        let _ = self.signals.try_send(sig);
    }

    fn stderr_tail(&self) -> String {
        lock(&self.tail).text()
    }
}

/// Keeps the last `STDERR_TAIL` bytes written to a pipe.
#[derive(Default)]
struct Tail {
    buf: Vec<u8>,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        if self.buf.len() > STDERR_TAIL {
            let excess = self.buf.len() - STDERR_TAIL;
            self.buf.drain(..excess);
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).trim().to_string()
    }
}

/// What the driver remembers about an agent.
#[derive(Clone)]
enum Entry {
    /// A child we spawned (running, or exited and not yet looked at).
    Live(Arc<Proc>),
    /// The wake command exited 0 within the settle time: it launched something we cannot see.
    Launched,
}

/// Wakes agents by running a local command; see the module docs for launcher vs long-running.
pub struct ExecDriver {
    opts: ExecOptions,
    agents: Mutex<HashMap<String, Entry>>,
}

impl fmt::Debug for ExecDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecDriver").field("opts", &self.opts).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the data inconsistent; keep going.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ExecDriver {
    /// Creates the driver; fails (non-retryable) when a command is empty.
    pub fn new(opts: ExecOptions) -> Result<Self, WakeError> {
        if opts.command.first().is_none_or(|p| p.is_empty()) {
            return Err(WakeError::permanent("exec driver: command is empty"));
        }
        if let Some(stop) = &opts.stop_command
            && stop.first().is_none_or(|p| p.is_empty())
        {
            return Err(WakeError::permanent("exec driver: stop_command is empty"));
        }
        Ok(ExecDriver { opts, agents: Mutex::new(HashMap::new()) })
    }

    fn entry(&self, agent: &str) -> Option<Entry> {
        lock(&self.agents).get(agent).cloned()
    }

    /// Forgets `agent`'s entry if it still refers to `proc` (a newer wake may have replaced it).
    fn forget_if(&self, agent: &str, proc: &Arc<Proc>, replacement: Option<Entry>) {
        let mut agents = lock(&self.agents);
        if let Some(Entry::Live(current)) = agents.get(agent)
            && Arc::ptr_eq(current, proc)
        {
            match replacement {
                Some(entry) => agents.insert(agent.to_string(), entry),
                None => agents.remove(agent),
            };
        }
    }

    /// Spawns `argv` with the wake variables (`vars`) and the configured extra environment.
    fn spawn(&self, agent: &str, argv: &[String], vars: &[(&str, String)]) -> Result<Arc<Proc>, WakeError> {
        let Some((program, args)) = argv.split_first() else {
            return Err(WakeError::permanent("exec driver: command is empty"));
        };
        let mut cmd = Command::new(program);
        cmd.args(args);
        // The proxy's own CONCIERGE_* configuration (tokens included) is not the agent's business.
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|k| k.starts_with("CONCIERGE_") && !OWN_VARS.contains(&k)) {
                cmd.env_remove(&key);
            }
        }
        for var in OWN_VARS {
            cmd.env_remove(var);
        }
        for (key, value) in vars {
            cmd.env(key, value);
        }
        cmd.envs(self.opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.stdin(Stdio::null()).stdout(Stdio::inherit()).stderr(Stdio::piped());
        // Own process group, so stopping reaches the whole tree (e.g. `sh -c` and its children).
        cmd.process_group(0);
        cmd.kill_on_drop(true);

        let mut child = cmd.spawn().map_err(|err| {
            let message = format!("exec driver: cannot run `{program}`: {err}");
            match err.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => WakeError::permanent(message),
                _ => WakeError::retryable(message),
            }
        })?;
        let Some(pid) = child.id() else {
            return Err(WakeError::retryable(format!("exec driver: `{program}` vanished right after spawn")));
        };
        let stderr = child.stderr.take();
        let tail = Arc::new(Mutex::new(Tail::default()));
        let (exit_tx, exit_rx) = watch::channel(None);
        let (sig_tx, sig_rx) = mpsc::channel(8);
        tokio::spawn(monitor(child, pid, stderr, Arc::clone(&tail), exit_tx, sig_rx, agent.to_string()));
        tracing::debug!(agent, program = %program, pid, "exec driver spawned command");
        Ok(Arc::new(Proc { pid, exit: exit_rx, tail, signals: sig_tx }))
    }

    /// SIGTERM to the child's process group, then SIGKILL; `Ok` once it is reaped.
    async fn terminate(&self, proc: &Proc) -> Result<(), WakeError> {
        if !proc.is_running() {
            return Ok(());
        }
        proc.signal(libc::SIGTERM);
        if proc.wait_exit(STOP_GRACE).await.is_some() {
            return Ok(());
        }
        tracing::warn!(pid = proc.pid, "exec driver: child ignored SIGTERM, sending SIGKILL");
        proc.signal(libc::SIGKILL);
        if proc.wait_exit(STOP_GRACE).await.is_some() {
            return Ok(());
        }
        Err(WakeError::retryable(format!("exec driver: pid {} did not exit after SIGKILL", proc.pid)))
    }

    async fn run_stop_command(&self, agent: &str, argv: &[String]) -> Result<(), WakeError> {
        let proc = self.spawn(agent, argv, &[("CONCIERGE_AGENT", agent.to_string())])?;
        match proc.wait_exit(STOP_COMMAND_TIMEOUT).await {
            Some(Exit::Status(status)) if status.success() => Ok(()),
            Some(exit) => {
                Err(WakeError::retryable(failure_message("stop_command", program(argv), &exit, &proc.stderr_tail())))
            }
            // Dropping `proc` kills the stop command's process group.
            None => Err(WakeError::retryable(format!(
                "exec driver: stop_command `{}` still running after {STOP_COMMAND_TIMEOUT:?}; killed",
                program(argv)
            ))),
        }
    }
}

fn program(argv: &[String]) -> &str {
    argv.first().map_or("", String::as_str)
}

fn failure_message(what: &str, program: &str, exit: &Exit, stderr: &str) -> String {
    if stderr.is_empty() {
        format!("exec driver: {what} `{program}` failed: {exit} (no stderr)")
    } else {
        format!("exec driver: {what} `{program}` failed: {exit}; stderr: {stderr}")
    }
}

/// Sends `sig` to the process group led by `pid`, or to `pid` alone if there is no group.
fn signal_group(pid: u32, sig: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: kill(2) has no memory-safety preconditions. The caller guarantees the child is
    // not yet reaped, so `pid` (and the group it leads) still belongs to our child.
    let rc = unsafe { libc::kill(-pid, sig) };
    if rc != 0 {
        // SAFETY: as above.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Owns a child: reaps it, drains its stderr, relays signals, kills it when the driver drops it.
async fn monitor(
    mut child: Child,
    pid: u32,
    stderr: Option<ChildStderr>,
    tail: Arc<Mutex<Tail>>,
    exit_tx: watch::Sender<Option<Exit>>,
    mut signals: mpsc::Receiver<i32>,
    agent: String,
) {
    let drain = stderr.map(|pipe| tokio::spawn(drain_stderr(pipe, tail, agent.clone())));
    let result = loop {
        tokio::select! {
            result = child.wait() => break result,
            // `child.id()` is `None` once the child has been reaped: never signal a reused pid.
            sig = signals.recv() => match sig {
                Some(sig) => {
                    if child.id().is_some() {
                        signal_group(pid, sig);
                    }
                }
                None => {
                    // Every handle is gone (the driver was dropped): kill and reap.
                    if child.id().is_some() {
                        signal_group(pid, libc::SIGKILL);
                    }
                    break child.wait().await;
                }
            }
        }
    };
    if let Some(mut drain) = drain
        && tokio::time::timeout(STDERR_FLUSH, &mut drain).await.is_err()
    {
        // A grandchild still holds the pipe open; its output is not ours to wait for.
        drain.abort();
    }
    let exit = match result {
        Ok(status) => Exit::Status(status),
        Err(err) => Exit::WaitFailed(err.to_string()),
    };
    tracing::debug!(agent, pid, %exit, "exec driver: child exited");
    let _ = exit_tx.send(Some(exit));
}

async fn drain_stderr(mut pipe: ChildStderr, tail: Arc<Mutex<Tail>>, agent: String) {
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let chunk = &buf[..n];
                tracing::debug!(agent, stderr = %String::from_utf8_lossy(chunk).trim_end(), "exec driver: child stderr");
                lock(&tail).push(chunk);
            }
        }
    }
}

#[async_trait]
impl WakeDriver for ExecDriver {
    fn kind(&self) -> &'static str {
        "exec"
    }

    async fn wake(&self, req: &WakeRequest) -> Result<(), WakeError> {
        let proc = {
            let mut agents = lock(&self.agents);
            if let Some(Entry::Live(proc)) = agents.get(&req.agent)
                && proc.is_running()
            {
                // The agent we started is still running: a second copy would fight over the
                // session. Its connection (or lack of it) is for the lifecycle to judge.
                return Ok(());
            }
            let mut vars = vec![
                ("CONCIERGE_AGENT", req.agent.clone()),
                ("CONCIERGE_CONNECT", req.connect.addr.clone()),
                ("CONCIERGE_SERVER_NAME", req.connect.server_name.clone()),
                ("CONCIERGE_WAKE_REASON", req.reason.clone()),
                ("CONCIERGE_PENDING", req.pending.to_string()),
            ];
            if let Some(pin) = &req.connect.cert_sha256 {
                vars.push(("CONCIERGE_CERT_SHA256", pin.clone()));
            }
            // Spawn under the lock so concurrent wakes cannot start two copies.
            let proc = self.spawn(&req.agent, &self.opts.command, &vars)?;
            agents.insert(req.agent.clone(), Entry::Live(Arc::clone(&proc)));
            proc
        };
        match proc.wait_exit(self.opts.settle).await {
            None => Ok(()),
            Some(Exit::Status(status)) if status.success() => {
                self.forget_if(&req.agent, &proc, Some(Entry::Launched));
                Ok(())
            }
            Some(exit) => {
                self.forget_if(&req.agent, &proc, None);
                Err(WakeError::retryable(failure_message(
                    "command",
                    program(&self.opts.command),
                    &exit,
                    &proc.stderr_tail(),
                )))
            }
        }
    }

    fn can_sleep(&self) -> bool {
        true
    }

    async fn sleep(&self, agent: &str) -> Result<(), WakeError> {
        let entry = self.entry(agent);
        if let Some(stop) = &self.opts.stop_command {
            self.run_stop_command(agent, stop).await?;
            if let Some(Entry::Live(proc)) = &entry {
                // The stop command should have ended our child too; make sure it did.
                if proc.wait_exit(STOP_GRACE).await.is_none() {
                    self.terminate(proc).await?;
                }
                self.forget_if(agent, proc, None);
            } else {
                lock(&self.agents).remove(agent);
            }
            return Ok(());
        }
        match entry {
            None => Ok(()),
            Some(Entry::Launched) => Err(WakeError::permanent(format!(
                "exec driver: the wake command for {agent} exited after launching something this driver \
                 cannot see; configure stop_command to put it to sleep"
            ))),
            Some(Entry::Live(proc)) => {
                self.terminate(&proc).await?;
                self.forget_if(agent, &proc, None);
                Ok(())
            }
        }
    }

    async fn status(&self, agent: &str) -> Result<DriverStatus, WakeError> {
        Ok(match self.entry(agent) {
            Some(Entry::Live(proc)) if proc.is_running() => DriverStatus::Running,
            // What a launcher or a stop command started or stopped is invisible to us.
            _ if self.opts.stop_command.is_some() => DriverStatus::Unknown,
            Some(Entry::Launched) => DriverStatus::Unknown,
            _ => DriverStatus::Stopped,
        })
    }
}
