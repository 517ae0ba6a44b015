//! Discord REST rate limits for one bot, learned from the headers Discord sends
//! (discord.com/developers/docs/topics/rate-limits), so sends wait instead of collecting 429s.
//!
//! - A *route* is method + path template + major parameter (here always the channel id).
//!   Routes that Discord reports under one `X-RateLimit-Bucket` share that bucket, separately
//!   per major parameter; a route whose bucket is not known yet sends one request at a time
//!   until its first answer tells the bucket.
//! - `X-RateLimit-Remaining` reaching 0 makes later requests of the bucket wait until
//!   `X-RateLimit-Reset-After` has passed; requests still in flight are subtracted from the
//!   remaining count Discord reports.
//! - A 429 body `{"message", "retry_after", "global"}` (or `Retry-After`) blocks its bucket for
//!   `retry_after`; `global: true`, `X-RateLimit-Global` or `X-RateLimit-Scope: global` blocks
//!   every route of the bot. `X-RateLimit-Scope: shared` (a per-resource limit) blocks only the
//!   bucket, as Discord does not count it against the bot.
//! - [`Limiter::turn`] queues the sends of one route in arrival order (tokio's fair mutex), so
//!   waiting never reorders messages to one channel; different channels are separate queues.
//!
//! The state machine ([`State`]) takes the time as an argument and owns no sockets; the async
//! wrapper sleeps on tokio's clock, so the unit tests run on paused time.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use reqwest::header::HeaderMap;
use serde_json::Value;
use tokio::time::Instant;

use crate::pacing::{Limits, Pacer, QueueFull, Turn};

/// How often a request polls while its route's bucket is still being discovered.
const DISCOVERY_POLL: Duration = Duration::from_millis(20);
/// Buckets and queues remembered before idle ones are forgotten (a bound, not a target).
const MAX_ENTRIES: usize = 4096;

/// One REST route: the unit Discord's limits are counted on (with its bucket).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Route {
    /// HTTP method.
    pub method: String,
    /// Path template, e.g. `/channels/{channel_id}/messages`.
    pub template: &'static str,
    /// Major parameter value (the channel id).
    pub major: String,
}

impl Route {
    fn template_key(&self) -> String {
        format!("{} {}", self.method, self.template)
    }
    fn own_key(&self) -> String {
        format!("{} {}:{}", self.method, self.template, self.major)
    }
}

/// What Discord said about limits in one answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Answer {
    /// True for HTTP 429.
    pub limited: bool,
    /// `X-RateLimit-Bucket`.
    pub bucket: Option<String>,
    /// `X-RateLimit-Limit`.
    pub limit: Option<u32>,
    /// `X-RateLimit-Remaining`.
    pub remaining: Option<u32>,
    /// `X-RateLimit-Reset-After`.
    pub reset_after: Option<Duration>,
    /// 429: body `retry_after`, else `Retry-After`.
    pub retry_after: Option<Duration>,
    /// 429: body `global`, `X-RateLimit-Global`, or scope `global`.
    pub global: bool,
    /// `X-RateLimit-Scope` (`user`, `global`, `shared`).
    pub scope: Option<String>,
}

fn secs(v: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(v.max(0.0)).ok()
}

impl Answer {
    /// Reads the documented headers and, for a 429, the JSON body.
    pub fn parse(status: u16, headers: &HeaderMap, body: &Value) -> Answer {
        let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).map(str::trim);
        let limited = status == 429;
        let scope = h("x-ratelimit-scope").map(str::to_ascii_lowercase);
        let mut a = Answer {
            limited,
            bucket: h("x-ratelimit-bucket").filter(|b| !b.is_empty()).map(str::to_string),
            limit: h("x-ratelimit-limit").and_then(|v| v.parse().ok()),
            remaining: h("x-ratelimit-remaining").and_then(|v| v.parse().ok()),
            reset_after: h("x-ratelimit-reset-after").and_then(|v| v.parse().ok()).and_then(secs),
            scope,
            ..Answer::default()
        };
        if limited {
            a.retry_after = body
                .get("retry_after")
                .and_then(Value::as_f64)
                .or_else(|| h("retry-after").and_then(|v| v.parse().ok()))
                .and_then(secs);
            a.global = body.get("global").and_then(Value::as_bool).unwrap_or(false)
                || h("x-ratelimit-global").is_some_and(|v| v.eq_ignore_ascii_case("true"))
                || a.scope.as_deref() == Some("global");
        }
        a
    }
}

/// One bucket of one major parameter.
#[derive(Debug, Default)]
struct Bucket {
    /// Whether any answer came back for it (headers or not).
    known: bool,
    /// `None` when Discord sent no limit headers: not limited.
    limit: Option<u32>,
    remaining: u32,
    reset_at: Option<Instant>,
    in_flight: u32,
}

/// What a request should do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send; the key is what the answer must be reported against.
    Go(String),
    /// Ask again after this long.
    Wait(Duration),
}

/// The bucket tracker of one bot, without any clock or socket of its own.
#[derive(Debug, Default)]
pub struct State {
    /// Route template -> bucket hash, as Discord reported it.
    hashes: HashMap<String, String>,
    /// Bucket key (hash + major, or the route's own key until the hash is known) -> bucket.
    buckets: HashMap<String, Bucket>,
    /// Every route of the bot waits until then (global 429).
    global_until: Option<Instant>,
}

impl State {
    fn key(&self, route: &Route) -> String {
        match self.hashes.get(&route.template_key()) {
            Some(hash) => format!("{hash}:{}", route.major),
            None => route.own_key(),
        }
    }

    /// Whether a request on `route` may go at `now`; `Go` counts it as in flight.
    pub fn acquire(&mut self, route: &Route, now: Instant) -> Decision {
        if let Some(until) = self.global_until {
            if until > now {
                return Decision::Wait(until - now);
            }
            self.global_until = None;
        }
        let key = self.key(route);
        if !self.buckets.contains_key(&key) {
            self.prune(now);
        }
        let b = self.buckets.entry(key.clone()).or_default();
        if let Some(reset) = b.reset_at
            && reset <= now
        {
            b.reset_at = None;
            if let Some(limit) = b.limit {
                b.remaining = limit;
            }
        }
        if !b.known {
            // Discovery: one request at a time until an answer tells the bucket.
            if b.in_flight > 0 {
                return Decision::Wait(DISCOVERY_POLL);
            }
        } else if b.limit.is_some() || b.reset_at.is_some() {
            if b.remaining == 0 {
                return Decision::Wait(b.reset_at.map_or(DISCOVERY_POLL, |r| r - now));
            }
            b.remaining -= 1;
        }
        b.in_flight += 1;
        Decision::Go(key)
    }

    /// A request that went with `key` ended without an answer (error, cancelled).
    pub fn abandon(&mut self, key: &str) {
        if let Some(b) = self.buckets.get_mut(key) {
            b.in_flight = b.in_flight.saturating_sub(1);
        }
    }

    /// Records Discord's `answer` to a request on `route` that went with `key`.
    pub fn answer(&mut self, route: &Route, key: &str, a: &Answer, now: Instant) {
        self.abandon(key);
        if let Some(hash) = &a.bucket {
            self.hashes.insert(route.template_key(), hash.clone());
        }
        if a.limited && a.global {
            let wait = a.retry_after.or(a.reset_after).unwrap_or(Duration::from_secs(1));
            self.global_until = Some(self.global_until.map_or(now + wait, |g| g.max(now + wait)));
            return;
        }
        let key = self.key(route);
        let b = self.buckets.entry(key).or_default();
        b.known = true;
        if a.limited {
            let wait = a.retry_after.or(a.reset_after).unwrap_or(Duration::from_secs(1));
            b.remaining = 0;
            b.reset_at = Some(b.reset_at.map_or(now + wait, |r| r.max(now + wait)));
            if a.limit.is_some() {
                b.limit = a.limit;
            }
            return;
        }
        if let (Some(remaining), Some(reset_after)) = (a.remaining, a.reset_after) {
            b.limit = a.limit.or(b.limit).or(Some(remaining + 1));
            // Requests still in flight were not yet counted by Discord.
            b.remaining = remaining.saturating_sub(b.in_flight);
            b.reset_at = Some(now + reset_after);
        }
    }

    /// Forgets idle buckets (nothing in flight, window over) once there are too many.
    fn prune(&mut self, now: Instant) {
        if self.buckets.len() < MAX_ENTRIES {
            return;
        }
        self.buckets.retain(|_, b| b.in_flight > 0 || b.reset_at.is_some_and(|r| r > now));
    }
}

/// Sends of one bot waiting or running at once before new ones are refused (promise 5).
const MAX_QUEUED_SENDS: usize = 10_000;

/// A bot's limiter: the [`State`] behind a lock, and the per-route send queues (the shared
/// [`Pacer`], with no spacing: Discord's buckets do the pacing).
pub struct Limiter {
    state: Mutex<State>,
    queues: Pacer,
}

impl Default for Limiter {
    fn default() -> Self {
        let limits = Limits {
            key_interval: Duration::ZERO,
            call_interval: None,
            max_queued: MAX_QUEUED_SENDS,
            max_keys: MAX_ENTRIES,
        };
        Limiter { state: Mutex::default(), queues: Pacer::new(limits) }
    }
}

/// Permission to send one request; report its answer with [`Ticket::answer`].
pub struct Ticket<'a> {
    limiter: &'a Limiter,
    route: &'a Route,
    key: String,
    done: bool,
}

impl Ticket<'_> {
    /// Records the answer (consumes the ticket).
    pub fn answer(mut self, a: &Answer) {
        self.done = true;
        self.limiter.state().answer(self.route, &self.key, a, Instant::now());
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.limiter.state().abandon(&self.key);
        }
    }
}

impl Limiter {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for `route`'s turn: sends of one route go one at a time, in arrival order;
    /// refused when [`MAX_QUEUED_SENDS`] are already waiting.
    pub async fn turn(&self, route: &Route) -> Result<Turn<'_>, QueueFull> {
        let key = format!("{} {} {}", route.method, route.template, route.major);
        self.queues.turn(&key, false).await
    }

    /// Waits until `route` may send; `Err(wait)` when the next wait alone exceeds `max_wait`
    /// (nothing was sent).
    pub async fn acquire<'a>(&'a self, route: &'a Route, max_wait: Duration) -> Result<Ticket<'a>, Duration> {
        loop {
            let decision = self.state().acquire(route, Instant::now());
            match decision {
                Decision::Go(key) => return Ok(Ticket { limiter: self, route, key, done: false }),
                Decision::Wait(d) if d > max_wait => return Err(d),
                Decision::Wait(d) => tokio::time::sleep(d).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn route(method: &'static str, major: &str) -> Route {
        Route { method: method.into(), template: "/channels/{channel_id}/messages", major: major.into() }
    }

    fn ok(bucket: &str, limit: u32, remaining: u32, reset_ms: u64) -> Answer {
        Answer {
            bucket: Some(bucket.into()),
            limit: Some(limit),
            remaining: Some(remaining),
            reset_after: Some(Duration::from_millis(reset_ms)),
            ..Answer::default()
        }
    }

    fn go(d: Decision) -> String {
        match d {
            Decision::Go(k) => k,
            Decision::Wait(w) => panic!("expected Go, got Wait({w:?})"),
        }
    }

    #[test]
    fn remaining_zero_waits_for_reset_after() {
        let mut s = State::default();
        let t0 = Instant::now();
        let r = route("POST", "1");
        let k = go(s.acquire(&r, t0));
        assert_eq!(s.acquire(&r, t0), Decision::Wait(DISCOVERY_POLL), "discovery sends one at a time");
        s.answer(&r, &k, &ok("abc", 3, 2, 300), t0);
        for _ in 0..2 {
            let k = go(s.acquire(&r, t0));
            assert_eq!(k, "abc:1", "the learned bucket is used");
        }
        assert_eq!(s.acquire(&r, t0 + Duration::from_millis(100)), Decision::Wait(Duration::from_millis(200)));
        // After the window the bucket refills to its limit.
        let later = t0 + Duration::from_millis(300);
        for _ in 0..3 {
            go(s.acquire(&r, later));
        }
        assert!(matches!(s.acquire(&r, later), Decision::Wait(_)));
    }

    #[test]
    fn in_flight_requests_are_subtracted_from_reported_remaining() {
        let mut s = State::default();
        let t0 = Instant::now();
        let r = route("POST", "1");
        let k = go(s.acquire(&r, t0));
        s.answer(&r, &k, &ok("abc", 5, 4, 1000), t0);
        let k1 = go(s.acquire(&r, t0));
        let _k2 = go(s.acquire(&r, t0));
        // Discord answered the first of the two: 3 left, but one more is still in flight.
        s.answer(&r, &k1, &ok("abc", 5, 3, 1000), t0);
        go(s.acquire(&r, t0));
        go(s.acquire(&r, t0));
        assert!(matches!(s.acquire(&r, t0), Decision::Wait(_)));
    }

    #[test]
    fn buckets_are_per_major_parameter_and_shared_by_hash() {
        let mut s = State::default();
        let t0 = Instant::now();
        let (a, b) = (route("POST", "1"), route("POST", "2"));
        let k = go(s.acquire(&a, t0));
        s.answer(&a, &k, &ok("abc", 1, 0, 500), t0);
        assert!(matches!(s.acquire(&a, t0), Decision::Wait(_)), "channel 1 is exhausted");
        go(s.acquire(&b, t0)); // channel 2 is not blocked by it
        // Another route reported under the same hash shares the bucket of channel 1.
        let edit =
            Route { method: "PATCH".into(), template: "/channels/{channel_id}/messages/{id}", major: "1".into() };
        let k = go(s.acquire(&edit, t0));
        s.answer(&edit, &k, &ok("abc", 1, 0, 500), t0);
        assert_eq!(s.key(&edit), "abc:1");
        assert!(matches!(s.acquire(&edit, t0), Decision::Wait(_)));
    }

    #[test]
    fn route_429_blocks_its_bucket_and_global_429_blocks_all() {
        let mut s = State::default();
        let t0 = Instant::now();
        let (a, b) = (route("POST", "1"), route("POST", "2"));
        let body = serde_json::json!({"message": "You are being rate limited.", "retry_after": 0.7, "global": false});
        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-scope", "user".parse().unwrap());
        headers.insert("retry-after", "1".parse().unwrap());
        let limited = Answer::parse(429, &headers, &body);
        assert_eq!(limited.retry_after, Some(Duration::from_millis(700)), "the body's precise value wins");
        let k = go(s.acquire(&a, t0));
        s.answer(&a, &k, &limited, t0);
        assert_eq!(s.acquire(&a, t0), Decision::Wait(Duration::from_millis(700)));
        let k = go(s.acquire(&b, t0));
        s.answer(&b, &k, &ok("abc", 5, 4, 1000), t0);

        let body = serde_json::json!({"message": "You are being rate limited.", "retry_after": 2.0, "global": true});
        let global = Answer::parse(429, &HeaderMap::new(), &body);
        assert!(global.global);
        let k = go(s.acquire(&b, t0));
        s.answer(&b, &k, &global, t0);
        assert_eq!(s.acquire(&b, t0), Decision::Wait(Duration::from_secs(2)), "global blocks channel 2");
        let other = Route { method: "PUT".into(), template: "/reactions", major: "9".into() };
        assert_eq!(s.acquire(&other, t0 + Duration::from_secs(1)), Decision::Wait(Duration::from_secs(1)));
        go(s.acquire(&other, t0 + Duration::from_secs(2)));

        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-scope", "global".parse().unwrap());
        assert!(Answer::parse(429, &headers, &serde_json::json!({"retry_after": 1})).global, "scope global");
        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-scope", "shared".parse().unwrap());
        assert!(!Answer::parse(429, &headers, &serde_json::json!({"retry_after": 1})).global, "shared is per bucket");
    }

    #[test]
    fn no_headers_means_no_limit_and_garbage_is_ignored() {
        let mut s = State::default();
        let t0 = Instant::now();
        let r = route("POST", "1");
        let k = go(s.acquire(&r, t0));
        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-remaining", "lots".parse().unwrap());
        headers.insert("x-ratelimit-reset-after", "-3".parse().unwrap());
        let a = Answer::parse(200, &headers, &Value::Null);
        assert_eq!((a.remaining, a.reset_after), (None, Some(Duration::ZERO)));
        s.answer(&r, &k, &a, t0);
        for _ in 0..100 {
            go(s.acquire(&r, t0));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_waits_on_the_clock_and_abandoned_tickets_free_the_route() {
        let l = Limiter::default();
        let r = route("POST", "1");
        let t = l.acquire(&r, Duration::from_secs(5)).await.unwrap();
        drop(t); // no answer: discovery must not stay blocked
        let t = l.acquire(&r, Duration::from_secs(5)).await.unwrap();
        t.answer(&ok("abc", 1, 0, 400));
        let start = Instant::now();
        let t = l.acquire(&r, Duration::from_secs(5)).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(400));
        t.answer(&ok("abc", 1, 0, 10_000));
        assert!(l.acquire(&r, Duration::from_secs(5)).await.is_err(), "a wait over the bound is refused");
    }

    #[tokio::test(start_paused = true)]
    async fn turns_keep_arrival_order_per_route() {
        let l = Arc::new(Limiter::default());
        let r = route("POST", "1");
        let first = l.turn(&r).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (l, r, order) = (l.clone(), r.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _t = l.turn(&r).await.unwrap();
                order.lock().unwrap().push(i);
            }));
            tokio::task::yield_now().await;
        }
        // Another channel's turn is not queued behind them.
        let _other = l.turn(&route("POST", "2")).await.unwrap();
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    }
}
