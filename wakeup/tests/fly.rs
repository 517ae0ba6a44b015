//! The `fly` driver against the fake Fly Machines API from `concierge-loadtest`.

use std::time::{Duration, Instant};

use concierge_loadtest::fly::{FakeFly, MachineState};
use concierge_wakeup::{ConnectInfo, DriverStatus, FlyDriver, FlyOptions, WakeDriver, WakeRequest};

const TOKEN: &str = "fo1_super-secret-token";

fn request() -> WakeRequest {
    WakeRequest {
        agent: "agent-1".to_string(),
        reason: "email".to_string(),
        pending: 1,
        connect: ConnectInfo {
            addr: "proxy.example:4433".to_string(),
            server_name: "proxy.example".to_string(),
            cert_sha256: None,
        },
    }
}

fn driver(fly: &FakeFly, machine: &str, token: &str, wait: Duration) -> FlyDriver {
    FlyDriver::new(FlyOptions {
        api_base: fly.base_url(),
        app: "agents".to_string(),
        machine: machine.to_string(),
        api_token: token.to_string(),
        wait_timeout: wait,
        client: concierge_wakeup::http_client().expect("client"),
    })
    .expect("valid options")
}

async fn fake() -> FakeFly {
    let fly = FakeFly::start(TOKEN).await.expect("fake fly");
    fly.add_machine("agents", "m1");
    fly
}

#[tokio::test]
async fn wake_returns_only_once_started_then_sleep_stops() {
    let fly = fake().await;
    fly.set_start_delay(Duration::from_millis(300));
    fly.set_stop_delay(Duration::from_millis(200));
    let mut states = fly.watch("agents", "m1").expect("machine");
    let observer = tokio::spawn(async move {
        let mut seen = vec![*states.borrow_and_update()];
        while states.changed().await.is_ok() {
            seen.push(*states.borrow_and_update());
            if seen.last() == Some(&MachineState::Stopped) && seen.len() > 1 {
                break;
            }
        }
        seen
    });
    let d = driver(&fly, "m1", TOKEN, Duration::from_secs(10));
    assert_eq!(d.status("agent-1").await, Ok(DriverStatus::Stopped));

    let started = Instant::now();
    d.wake(&request()).await.expect("wake ok");
    assert!(started.elapsed() >= Duration::from_millis(300), "returned before started");
    assert_eq!(fly.state("agents", "m1"), Some(MachineState::Started));
    assert_eq!(fly.starts(), 1);
    assert_eq!(d.status("agent-1").await, Ok(DriverStatus::Running));

    assert!(d.can_sleep());
    d.sleep("agent-1").await.expect("sleep ok");
    assert_eq!(fly.state("agents", "m1"), Some(MachineState::Stopped));
    assert_eq!(fly.stops(), 1);
    assert_eq!(d.status("agent-1").await, Ok(DriverStatus::Stopped));

    let seen = tokio::time::timeout(Duration::from_secs(5), observer).await.expect("observer").expect("join");
    assert_eq!(
        seen,
        vec![
            MachineState::Stopped,
            MachineState::Starting,
            MachineState::Started,
            MachineState::Stopping,
            MachineState::Stopped
        ]
    );
    // Sleeping a stopped machine is a no-op.
    d.sleep("agent-1").await.expect("idempotent");
    assert_eq!(fly.stops(), 1);
}

#[tokio::test]
async fn waking_an_already_started_machine_is_ok() {
    let fly = fake().await;
    fly.add_machine_in("agents", "m2", MachineState::Started);
    let d = driver(&fly, "m2", TOKEN, Duration::from_secs(5));
    d.wake(&request()).await.expect("already started is fine");
    assert_eq!(fly.state("agents", "m2"), Some(MachineState::Started));
    // And twice in a row through the driver.
    let d1 = driver(&fly, "m1", TOKEN, Duration::from_secs(5));
    d1.wake(&request()).await.expect("first");
    d1.wake(&request()).await.expect("second");
    assert_eq!(fly.state("agents", "m1"), Some(MachineState::Started));
}

#[tokio::test]
async fn suspended_counts_as_stopped_and_wakes() {
    let fly = fake().await;
    fly.add_machine_in("agents", "m3", MachineState::Suspended);
    let d = driver(&fly, "m3", TOKEN, Duration::from_secs(5));
    assert_eq!(d.status("agent-1").await, Ok(DriverStatus::Stopped));
    d.wake(&request()).await.expect("resume");
    assert_eq!(fly.state("agents", "m3"), Some(MachineState::Started));
}

#[tokio::test]
async fn bad_token_is_permanent_and_never_echoed() {
    let fly = fake().await;
    let wrong = "fo1_wrong-token-value";
    let d = driver(&fly, "m1", wrong, Duration::from_secs(5));
    let err = d.wake(&request()).await.expect_err("401");
    assert!(!err.retryable, "{err:?}");
    assert!(err.message.contains("401"), "{}", err.message);
    assert!(!err.message.contains(wrong) && !err.message.contains(TOKEN), "{}", err.message);
    assert!(!format!("{d:?}").contains(wrong), "Debug leaks the token");
    let status_err = d.status("agent-1").await.expect_err("401");
    assert!(!status_err.retryable && !status_err.message.contains(wrong));
    assert_eq!(fly.starts(), 0);
    assert_eq!(fly.state("agents", "m1"), Some(MachineState::Stopped));
}

#[tokio::test]
async fn injected_server_error_is_retryable_and_the_next_wake_works() {
    let fly = fake().await;
    fly.fail_next_starts(1);
    let d = driver(&fly, "m1", TOKEN, Duration::from_secs(5));
    let err = d.wake(&request()).await.expect_err("500");
    assert!(err.retryable, "{err:?}");
    assert!(err.message.contains("500"), "{}", err.message);
    assert_eq!(fly.state("agents", "m1"), Some(MachineState::Stopped));
    d.wake(&request()).await.expect("second attempt");
    assert_eq!(fly.starts(), 2);
    assert_eq!(fly.state("agents", "m1"), Some(MachineState::Started));
}

#[tokio::test]
async fn unknown_machine_or_app_is_permanent() {
    let fly = fake().await;
    let err = driver(&fly, "nope", TOKEN, Duration::from_secs(5)).wake(&request()).await.expect_err("404");
    assert!(!err.retryable && err.message.contains("404"), "{err:?}");
    let other_app = FlyDriver::new(FlyOptions {
        api_base: fly.base_url(),
        app: "ghost".to_string(),
        machine: "m1".to_string(),
        api_token: TOKEN.to_string(),
        wait_timeout: Duration::from_secs(5),
        client: concierge_wakeup::http_client().expect("client"),
    })
    .expect("valid options");
    let err = other_app.status("agent-1").await.expect_err("404");
    assert!(!err.retryable, "{err:?}");
}

#[tokio::test]
async fn a_machine_that_does_not_start_in_time_is_a_retryable_timeout() {
    let fly = fake().await;
    fly.set_start_delay(Duration::from_secs(30));
    let d = driver(&fly, "m1", TOKEN, Duration::from_secs(1));
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), d.wake(&request()))
        .await
        .expect("bounded")
        .expect_err("not started in time");
    assert!(err.retryable, "{err:?}");
    assert!(err.message.contains("did not reach started"), "{}", err.message);
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
    assert_eq!(fly.state("agents", "m1"), Some(MachineState::Starting));
}

#[tokio::test]
async fn an_unreachable_api_is_retryable() {
    let fly = fake().await;
    let d = driver(&fly, "m1", TOKEN, Duration::from_secs(1));
    drop(fly);
    // Give the server a moment to close its listener.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = d.wake(&request()).await.expect_err("nothing listens");
    assert!(err.retryable, "{err:?}");
    assert!(!err.message.contains(TOKEN));
}

#[tokio::test]
async fn debug_output_redacts_the_token() {
    let opts = FlyOptions {
        api_base: "https://api.machines.dev".to_string(),
        app: "agents".to_string(),
        machine: "m1".to_string(),
        api_token: TOKEN.to_string(),
        wait_timeout: Duration::from_secs(60),
        client: concierge_wakeup::http_client().expect("client"),
    };
    assert!(!format!("{opts:?}").contains(TOKEN));
    let d = FlyDriver::new(opts).expect("valid options");
    assert!(!format!("{d:?}").contains(TOKEN));
    assert_eq!(d.kind(), "fly");
}
