//! Helpers shared by the configuration tests.
#![allow(dead_code)]

use concierge_config::{Config, ConfigErrors, load_str};

/// Loads `toml` (no environment overrides), expecting success.
pub fn ok(toml: &str) -> Config {
    load_str(toml, "test.toml").unwrap_or_else(|e| panic!("expected Ok, got:\n{e}"))
}

/// Loads `toml`, expecting errors.
pub fn errs(toml: &str) -> ConfigErrors {
    match load_str(toml, "test.toml") {
        Ok(c) => panic!("expected errors, got {c:?}"),
        Err(e) => e,
    }
}

/// Asserts that some error line contains every one of `parts`.
#[track_caller]
pub fn assert_line(errors: &ConfigErrors, parts: &[&str]) {
    let text = errors.to_string();
    assert!(
        text.lines().any(|l| parts.iter().all(|p| l.contains(p))),
        "no error line contains all of {parts:?}; errors were:\n{text}"
    );
}
