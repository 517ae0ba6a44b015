//! The `exec` driver against real processes.

use std::path::Path;
use std::time::{Duration, Instant};

use concierge_wakeup::{ConnectInfo, DriverStatus, ExecDriver, ExecOptions, WakeDriver, WakeRequest};

fn request(agent: &str) -> WakeRequest {
    WakeRequest {
        agent: agent.to_string(),
        reason: "telegram message".to_string(),
        pending: 7,
        connect: ConnectInfo {
            addr: "127.0.0.1:4433".to_string(),
            server_name: "concierge.local".to_string(),
            cert_sha256: Some("ab12cd34".to_string()),
        },
    }
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".to_string(), "-c".to_string(), script.to_string()]
}

fn driver(command: Vec<String>, env: Vec<(&str, &Path)>, settle_ms: u64) -> ExecDriver {
    ExecDriver::new(ExecOptions {
        command,
        env: env.into_iter().map(|(k, v)| (k.to_string(), v.display().to_string())).collect(),
        settle: Duration::from_millis(settle_ms),
        stop_command: None,
    })
    .expect("valid options")
}

/// Alive means present in /proc and not a zombie (an orphaned grandchild may stay a zombie
/// in a container whose init does not reap).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

async fn read_pid(path: &Path) -> u32 {
    for _ in 0..100 {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(pid) = text.trim().parse()
        {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no pid written to {}", path.display());
}

async fn wait_gone(pid: u32, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn exit_zero_is_ok_and_the_command_sees_the_wake_variables() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("env.txt");
    let d = driver(sh("env > \"$OUT\""), vec![("OUT", &out)], 5_000);
    d.wake(&request("agent-1")).await.expect("wake ok");
    let env = std::fs::read_to_string(&out).expect("env written");
    for line in [
        "CONCIERGE_AGENT=agent-1",
        "CONCIERGE_CONNECT=127.0.0.1:4433",
        "CONCIERGE_SERVER_NAME=concierge.local",
        "CONCIERGE_CERT_SHA256=ab12cd34",
        "CONCIERGE_WAKE_REASON=telegram message",
        "CONCIERGE_PENDING=7",
    ] {
        assert!(env.lines().any(|l| l == line), "missing {line} in:\n{env}");
    }
    assert!(env.lines().any(|l| l.starts_with("OUT=")), "configured env passed");
    assert!(env.lines().any(|l| l.starts_with("PATH=")), "the rest is inherited");
    // A launcher exited: what it started is invisible, so the driver does not claim either way.
    assert_eq!(d.status("agent-1").await, Ok(DriverStatus::Unknown));
    let err = d.sleep("agent-1").await.expect_err("cannot stop what a launcher started");
    assert!(!err.retryable && err.message.contains("stop_command"), "{err:?}");
}

#[tokio::test]
async fn no_cert_pin_means_no_pin_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("env.txt");
    let d = driver(sh("env > \"$OUT\""), vec![("OUT", &out)], 5_000);
    let mut req = request("agent-1");
    req.connect.cert_sha256 = None;
    d.wake(&req).await.expect("wake ok");
    let env = std::fs::read_to_string(&out).expect("env written");
    assert!(!env.contains("CONCIERGE_CERT_SHA256"), "{env}");
}

#[tokio::test]
async fn non_zero_exit_reports_status_and_stderr() {
    let d = driver(sh("echo 'boom: cannot reach docker' >&2; exit 3"), vec![], 5_000);
    let err = d.wake(&request("agent-1")).await.expect_err("exit 3 fails");
    assert!(err.retryable, "{err:?}");
    assert!(err.message.contains("exit status: 3"), "{}", err.message);
    assert!(err.message.contains("boom: cannot reach docker"), "{}", err.message);
    assert_eq!(d.status("agent-1").await, Ok(DriverStatus::Stopped));
}

#[tokio::test]
async fn a_flood_of_stderr_neither_blocks_the_child_nor_the_message() {
    // 256 KiB is far more than a pipe holds: undrained, the child would block forever.
    let d = driver(sh("head -c 262144 /dev/zero | tr '\\0' x >&2; echo THE-END >&2; exit 4"), vec![], 10_000);
    let err = d.wake(&request("agent-1")).await.expect_err("exit 4 fails");
    assert!(err.message.contains("exit status: 4"), "{}", &err.message[..200.min(err.message.len())]);
    assert!(err.message.ends_with("THE-END"), "the tail is kept");
    assert!(err.message.len() < 2_300, "tail is bounded: {} bytes", err.message.len());
}

#[tokio::test]
async fn long_running_child_is_ok_after_settle_then_sleep_terminates_and_reaps_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("pid");
    let d = driver(sh("echo $$ > \"$PIDFILE\"; exec sleep 30"), vec![("PIDFILE", &pidfile)], 300);
    let started = Instant::now();
    d.wake(&request("agent-1")).await.expect("still running after settle is ok");
    assert!(started.elapsed() >= Duration::from_millis(300), "waited for settle");
    let pid = read_pid(&pidfile).await;
    assert!(alive(pid));
    assert_eq!(d.status("agent-1").await, Ok(DriverStatus::Running));
    assert!(d.can_sleep());

    let stopping = Instant::now();
    d.sleep("agent-1").await.expect("sleep ok");
    assert!(stopping.elapsed() < Duration::from_secs(4), "SIGTERM was enough");
    assert_eq!(d.status("agent-1").await, Ok(DriverStatus::Stopped));
    // Reaped, not a zombie: the /proc entry is gone entirely.
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "pid {pid} still in /proc");
    // Sleeping again is a no-op.
    d.sleep("agent-1").await.expect("idempotent");
}

#[tokio::test]
async fn sleep_reaches_the_whole_process_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("pid");
    // `sh` stays the parent of a background `sleep`; both must go.
    let d = driver(sh("sleep 30 & echo $! > \"$PIDFILE\"; wait"), vec![("PIDFILE", &pidfile)], 200);
    d.wake(&request("agent-1")).await.expect("wake ok");
    let grandchild = read_pid(&pidfile).await;
    assert!(alive(grandchild));
    d.sleep("agent-1").await.expect("sleep ok");
    assert!(wait_gone(grandchild, Duration::from_secs(2)).await, "grandchild {grandchild} survived");
}

#[tokio::test]
async fn a_child_ignoring_sigterm_is_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("pid");
    let d = driver(
        sh("trap '' TERM; echo $$ > \"$PIDFILE\"; while :; do sleep 0.1; done"),
        vec![("PIDFILE", &pidfile)],
        200,
    );
    d.wake(&request("agent-1")).await.expect("wake ok");
    let pid = read_pid(&pidfile).await;
    let stopping = Instant::now();
    d.sleep("agent-1").await.expect("SIGKILL after the grace period");
    assert!(stopping.elapsed() >= Duration::from_secs(4), "SIGTERM was ignored, grace period waited");
    assert!(stopping.elapsed() < Duration::from_secs(9));
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(d.status("agent-1").await, Ok(DriverStatus::Stopped));
}

#[tokio::test]
async fn nonexistent_program_is_a_permanent_error_naming_it() {
    let d = driver(vec!["/nonexistent/agent-binary".to_string()], vec![], 1_000);
    let err = d.wake(&request("agent-1")).await.expect_err("spawn fails");
    assert!(!err.retryable, "{err:?}");
    assert!(err.message.contains("/nonexistent/agent-binary"), "{}", err.message);
}

#[tokio::test]
async fn empty_command_is_rejected_at_construction() {
    let err = ExecDriver::new(ExecOptions::default()).expect_err("empty command");
    assert!(!err.retryable);
}

#[tokio::test]
async fn second_wake_while_running_does_not_spawn_again_and_drop_kills_the_child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let count = dir.path().join("count");
    let pidfile = dir.path().join("pid");
    let d = driver(
        sh("echo spawn >> \"$COUNT\"; echo $$ > \"$PIDFILE\"; exec sleep 30"),
        vec![("COUNT", &count), ("PIDFILE", &pidfile)],
        200,
    );
    d.wake(&request("agent-1")).await.expect("first wake");
    d.wake(&request("agent-1")).await.expect("second wake");
    let req = request("agent-1");
    let (a, b) = tokio::join!(d.wake(&req), d.wake(&req));
    a.expect("concurrent wake");
    b.expect("concurrent wake");
    let spawns = std::fs::read_to_string(&count).expect("count file");
    assert_eq!(spawns.lines().count(), 1, "spawned more than once: {spawns:?}");

    // Another agent gets its own child.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other_count = other_dir.path().join("count");
    let other_pid = other_dir.path().join("pid");
    let d2 = driver(
        sh("echo spawn >> \"$COUNT\"; echo $$ > \"$PIDFILE\"; exec sleep 30"),
        vec![("COUNT", &other_count), ("PIDFILE", &other_pid)],
        200,
    );
    d2.wake(&request("agent-2")).await.expect("other agent");
    assert_eq!(d2.status("agent-2").await, Ok(DriverStatus::Running));
    assert_eq!(d2.status("agent-1").await, Ok(DriverStatus::Stopped));

    let pid = read_pid(&pidfile).await;
    let pid2 = read_pid(&other_pid).await;
    drop(d);
    drop(d2);
    assert!(wait_gone(pid, Duration::from_secs(3)).await, "child {pid} outlived its driver");
    assert!(wait_gone(pid2, Duration::from_secs(3)).await, "child {pid2} outlived its driver");
}

#[tokio::test]
async fn a_child_that_died_is_respawned_on_the_next_wake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let count = dir.path().join("count");
    // Runs long enough to pass settle, then exits on its own.
    let d = driver(sh("echo spawn >> \"$COUNT\"; sleep 0.4"), vec![("COUNT", &count)], 100);
    d.wake(&request("agent-1")).await.expect("first wake");
    assert_eq!(d.status("agent-1").await, Ok(DriverStatus::Running));
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(d.status("agent-1").await, Ok(DriverStatus::Stopped));
    d.wake(&request("agent-1")).await.expect("second wake");
    let spawns = std::fs::read_to_string(&count).expect("count file");
    assert_eq!(spawns.lines().count(), 2);
}

#[tokio::test]
async fn stop_command_runs_with_the_agent_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stopped = dir.path().join("stopped");
    let d = ExecDriver::new(ExecOptions {
        command: sh("exit 0"),
        env: vec![("STOPPED".to_string(), stopped.display().to_string())],
        settle: Duration::from_secs(5),
        stop_command: Some(sh("echo \"$CONCIERGE_AGENT\" > \"$STOPPED\"")),
    })
    .expect("valid options");
    d.wake(&request("agent-1")).await.expect("wake ok");
    assert_eq!(d.status("agent-1").await, Ok(DriverStatus::Unknown));
    d.sleep("agent-1").await.expect("stop command ok");
    assert_eq!(std::fs::read_to_string(&stopped).expect("stop ran").trim(), "agent-1");

    let failing = ExecDriver::new(ExecOptions {
        command: sh("exit 0"),
        env: vec![],
        settle: Duration::from_secs(5),
        stop_command: Some(sh("echo 'no such container' >&2; exit 1")),
    })
    .expect("valid options");
    let err = failing.sleep("agent-1").await.expect_err("stop command fails");
    assert!(err.retryable && err.message.contains("no such container"), "{err:?}");
}

/// Helper process for [`inherited_concierge_variables_do_not_reach_the_agent`]: started with
/// a `CONCIERGE_*` secret in its own environment (as the proxy would be), it wakes a command
/// that writes its environment to `ENV_CHILD_OUT`.
#[tokio::test]
#[ignore = "helper process for inherited_concierge_variables_do_not_reach_the_agent"]
async fn env_child() {
    let Some(out) = std::env::var_os("ENV_CHILD_OUT") else {
        return; // run by hand without the parent: nothing to do
    };
    let d = driver(sh("env > \"$OUT\""), vec![("OUT", Path::new(&out))], 2000);
    d.wake(&request("agent-1")).await.expect("the command ran");
}

/// The proxy's own `CONCIERGE_*` settings (admin token, Redis URL...) are not the agent's
/// business: the command sees the driver's variables (not inherited look-alikes) and the rest
/// of the environment, never another `CONCIERGE_*` value.
#[test]
fn inherited_concierge_variables_do_not_reach_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("env");
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "env_child", "--ignored", "--test-threads=1"])
        .env("ENV_CHILD_OUT", &out)
        .env("CONCIERGE_ADMIN_TOKEN", "proxy-admin-secret-0123")
        .env("CONCIERGE_AGENT", "spoofed-agent")
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "helper failed: {status:?}");
    let env = std::fs::read_to_string(&out).expect("the command wrote its environment");
    assert!(!env.contains("proxy-admin-secret-0123"), "an inherited secret reached the agent:\n{env}");
    assert!(!env.contains("spoofed-agent"), "an inherited CONCIERGE_AGENT reached the agent:\n{env}");
    let lines: Vec<&str> = env.lines().collect();
    assert!(lines.contains(&"CONCIERGE_AGENT=agent-1"), "{env}");
    assert!(lines.contains(&"CONCIERGE_CONNECT=127.0.0.1:4433"), "{env}");
    assert!(lines.iter().any(|l| l.starts_with("ENV_CHILD_OUT=")), "other variables are inherited:\n{env}");
}
