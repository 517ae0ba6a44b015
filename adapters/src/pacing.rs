//! Send pacing shared by the chat adapters (Telegram, Slack): platforms limit how fast one
//! chat or channel may receive messages and how fast one bot or app may call them at all.
//!
//! A send first asks [`Pacer::turn`] for its key (a chat id, a channel id). Turns of one key are
//! granted one at a time in arrival order (tokio's `Mutex` is fair), so sends to one key leave
//! in the order they came. A *spaced* turn (a message, as opposed to a typing indicator) starts
//! at least `key_interval` after the previous spaced turn of the key ended with [`Turn::sent`].
//! Inside its turn a send calls [`Turn::call_slot`] before every API call, retries included;
//! slots are handed out `call_interval` apart across the whole sender. A platform's "retry
//! after" is slept inside the turn, so it holds back the later sends to that key as well.
//! Different keys are separate queues: only the sender-wide slot is shared between them.
//!
//! Bounds: at most `max_queued` turns wait or run at once (more are refused with
//! [`QueueFull`], nothing sent), and once `max_keys` keys are remembered the idle ones are
//! forgotten (a key is idle when no turn holds or waits for it and its last message is more
//! than `key_interval` old, so forgetting it loses no spacing). All waiting uses tokio's clock,
//! so tests drive it with `tokio::time::pause()`.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

/// What one [`Pacer`] allows; each adapter fills it from its platform's documented limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Least time between two spaced turns of one key (zero keeps only the order).
    pub key_interval: Duration,
    /// Least time between two API calls of the whole sender; `None` = no sender-wide rate.
    pub call_interval: Option<Duration>,
    /// Turns waiting or running at once before new ones are refused.
    pub max_queued: usize,
    /// Keys remembered before idle ones are pruned.
    pub max_keys: usize,
}

/// `rate` calls per second as the interval between two calls (a rate of 0 counts as 1).
pub fn per_second(rate: u32) -> Duration {
    Duration::from_secs(1) / rate.max(1)
}

/// A send refused because `limit` sends are already queued; nothing was sent, so a retry
/// later is safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueFull {
    /// The `max_queued` that was reached.
    pub limit: usize,
}

impl fmt::Display for QueueFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} sends are already queued; nothing sent, retry later", self.limit)
    }
}

impl std::error::Error for QueueFull {}

/// One key's queue: whoever holds the lock has the turn; it holds the instant the key's last
/// spaced turn was marked sent.
type KeyLock = Arc<tokio::sync::Mutex<Option<Instant>>>;

/// Paces one sender's (one bot's, one app's) calls; see the module documentation.
pub struct Pacer {
    limits: Limits,
    /// The earliest instant the sender's next call may start.
    next_call: Mutex<Instant>,
    keys: Mutex<HashMap<String, KeyLock>>,
    queued: AtomicUsize,
}

impl Pacer {
    /// A pacer with nothing queued.
    pub fn new(limits: Limits) -> Self {
        Pacer { limits, next_call: Mutex::new(Instant::now()), keys: Mutex::default(), queued: AtomicUsize::new(0) }
    }

    /// The limits this pacer applies.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Waits for `key`'s turn (behind every earlier turn of `key`) and, when `spaced`, for
    /// `key_interval` since the key's last message. Refused at once when the queue is full.
    pub async fn turn(&self, key: &str, spaced: bool) -> Result<Turn<'_>, QueueFull> {
        let queued = Queued::join(&self.queued, self.limits.max_queued)?;
        let last = self.key_lock(key).lock_owned().await;
        if spaced && let Some(t) = *last {
            tokio::time::sleep_until(t + self.limits.key_interval).await;
        }
        Ok(Turn { pacer: self, last, spaced, _queued: queued })
    }

    /// Turns waiting or running now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Keys remembered now (at most `max_keys`, plus keys busy or too recent to forget).
    pub fn keys(&self) -> usize {
        lock(&self.keys).len()
    }

    fn key_lock(&self, key: &str) -> KeyLock {
        let mut keys = lock(&self.keys);
        if keys.len() >= self.limits.max_keys && !keys.contains_key(key) {
            let interval = self.limits.key_interval;
            // An entry someone else holds a clone of is in use (a turn holds or awaits it).
            keys.retain(|_, l| {
                Arc::strong_count(l) > 1
                    || l.try_lock().map_or(true, |last| last.is_some_and(|t| t.elapsed() < interval))
            });
        }
        keys.entry(key.to_string()).or_default().clone()
    }

    async fn call_slot(&self) {
        let Some(interval) = self.limits.call_interval else { return };
        let at = {
            let mut next = lock(&self.next_call);
            let at = (*next).max(Instant::now());
            *next = at + interval;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

/// A std mutex whose data stays consistent even if a holder panicked (plain instants and a
/// map of locks), so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One send's turn at its key; the key's next turn waits until this one is dropped.
#[must_use = "the turn ends (and the key's next send may start) when it is dropped"]
pub struct Turn<'a> {
    pacer: &'a Pacer,
    last: OwnedMutexGuard<Option<Instant>>,
    spaced: bool,
    _queued: Queued<'a>,
}

impl Turn<'_> {
    /// Waits for the sender-wide call slot; call it before each API call, retries included.
    pub async fn call_slot(&self) {
        self.pacer.call_slot().await;
    }

    /// Ends a spaced turn with "a message went out now": the key's next spaced turn starts
    /// `key_interval` from here. A turn dropped without it (or not spaced) delays nothing.
    pub fn sent(mut self) {
        if self.spaced {
            *self.last = Some(Instant::now());
        }
    }
}

/// One place in the sender's queue count, given back when the send leaves, however it leaves.
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn join(count: &'a AtomicUsize, max: usize) -> Result<Self, QueueFull> {
        if count.fetch_add(1, Ordering::SeqCst) >= max {
            count.fetch_sub(1, Ordering::SeqCst);
            return Err(QueueFull { limit: max });
        }
        Ok(Queued(count))
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn limits(key_ms: u64, call_ms: Option<u64>) -> Limits {
        Limits {
            key_interval: Duration::from_millis(key_ms),
            call_interval: call_ms.map(Duration::from_millis),
            max_queued: 100,
            max_keys: 100,
        }
    }

    /// Runs one spaced send per `(key, label)` concurrently, each started 1 ms after the
    /// previous, each holding its turn for `hold`; returns `(label, key, start ms)` in the
    /// order the sends got their call slot.
    async fn burst(pacer: Arc<Pacer>, sends: &[(&str, &str)], hold: Duration) -> Vec<(String, String, u64)> {
        let t0 = Instant::now();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (key, label) in sends {
            let (pacer, log, key, label) = (pacer.clone(), log.clone(), key.to_string(), label.to_string());
            tasks.push(tokio::spawn(async move {
                let turn = pacer.turn(&key, true).await.expect("queue has room");
                turn.call_slot().await;
                lock(&log).push((label, key, (Instant::now() - t0).as_millis() as u64));
                tokio::time::sleep(hold).await;
                turn.sent();
            }));
            tokio::time::sleep(MS).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(log).unwrap().into_inner().unwrap()
    }

    fn starts(log: &[(String, String, u64)], key: &str) -> Vec<(String, u64)> {
        log.iter().filter(|(_, k, _)| k == key).map(|(l, _, t)| (l.clone(), *t)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn one_key_keeps_arrival_order_and_spacing() {
        let pacer = Arc::new(Pacer::new(limits(1000, None)));
        let sends: Vec<(&str, &str)> = vec![("c", "m0"), ("c", "m1"), ("c", "m2"), ("c", "m3")];
        let log = burst(pacer.clone(), &sends, 10 * MS).await;
        let got = starts(&log, "c");
        let labels: Vec<&str> = got.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["m0", "m1", "m2", "m3"], "order kept");
        // Each message starts 1 s after the previous one was marked sent (10 ms after it started).
        let times: Vec<u64> = got.iter().map(|(_, t)| *t).collect();
        assert_eq!(times, [0, 1010, 2020, 3030]);
        assert_eq!(pacer.queued(), 0, "every turn left the queue");
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_not_serialized_behind_each_other() {
        let pacer = Arc::new(Pacer::new(limits(200, None)));
        let sends = [("a", "a0"), ("b", "b0"), ("a", "a1"), ("b", "b1"), ("a", "a2"), ("b", "b2")];
        let log = burst(pacer, &sends, Duration::ZERO).await;
        let a: Vec<u64> = starts(&log, "a").iter().map(|(_, t)| *t).collect();
        let b: Vec<u64> = starts(&log, "b").iter().map(|(_, t)| *t).collect();
        assert_eq!(a, [0, 200, 400]);
        assert_eq!(b, [1, 201, 401], "b waits only for b");
    }

    #[tokio::test(start_paused = true)]
    async fn unspaced_turns_keep_order_but_do_not_wait_or_delay() {
        let pacer = Pacer::new(limits(1000, None));
        let t0 = Instant::now();
        pacer.turn("c", true).await.unwrap().sent();
        // A typing indicator: no wait for the interval, and it does not count as a message.
        pacer.turn("c", false).await.unwrap().sent();
        assert_eq!(Instant::now() - t0, Duration::ZERO);
        pacer.turn("c", true).await.unwrap().sent();
        assert_eq!(Instant::now() - t0, 1000 * MS, "spaced from the first message, not the indicator");
        // A turn dropped without `sent` (nothing went out) delays nothing.
        drop(pacer.turn("c", true).await.unwrap());
        assert_eq!(Instant::now() - t0, 2000 * MS);
        pacer.turn("c", true).await.unwrap().sent();
        assert_eq!(Instant::now() - t0, 2000 * MS, "the dropped turn sent nothing, so no wait");
    }

    #[tokio::test(start_paused = true)]
    async fn sender_wide_rate_spaces_calls_across_keys() {
        let pacer = Arc::new(Pacer::new(limits(0, Some(100))));
        let sends = [("a", "a0"), ("b", "b0"), ("c", "c0"), ("d", "d0")];
        let log = burst(pacer.clone(), &sends, Duration::ZERO).await;
        let times: Vec<u64> = log.iter().map(|(_, _, t)| *t).collect();
        assert_eq!(times, [0, 100, 200, 300]);
        // Every call of a turn takes a slot, so retries inside a turn are rate limited too.
        let turn = pacer.turn("a", true).await.unwrap();
        let before = Instant::now();
        turn.call_slot().await;
        turn.call_slot().await;
        assert_eq!(Instant::now() - before, 200 * MS, "slot 400 ms after t0 is 100 ms away, then another 100");
        turn.sent();
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_at_once_and_frees_up() {
        let pacer = Arc::new(Pacer::new(Limits { max_queued: 2, ..limits(1000, None) }));
        pacer.turn("c", true).await.unwrap().sent();
        // Two sends wait on "c" (1 s spacing); a third is refused without waiting.
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let p = pacer.clone();
                tokio::spawn(async move { p.turn("c", true).await.map(Turn::sent) })
            })
            .collect();
        tokio::time::sleep(MS).await;
        assert_eq!(pacer.queued(), 2);
        let t = Instant::now();
        let refused = pacer.turn("other", true).await.err();
        assert_eq!(refused, Some(QueueFull { limit: 2 }));
        assert_eq!(Instant::now(), t, "refused without waiting");
        assert!(refused.unwrap().to_string().contains("2 sends are already queued"));
        for w in waiting {
            w.await.unwrap().unwrap();
        }
        assert_eq!(pacer.queued(), 0);
        assert!(pacer.turn("other", true).await.is_ok(), "room again once the queue drained");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_send_gives_its_place_back() {
        let pacer = Pacer::new(Limits { max_queued: 2, ..limits(1000, None) });
        let held = pacer.turn("c", true).await.unwrap();
        // Gives up while waiting behind `held`.
        assert!(tokio::time::timeout(10 * MS, pacer.turn("c", true)).await.is_err());
        assert_eq!(pacer.queued(), 1);
        drop(held);
        // Gives up while holding its turn.
        let t = pacer.turn("c", true).await.unwrap();
        assert_eq!(pacer.queued(), 1);
        drop(t);
        assert_eq!(pacer.queued(), 0);
        let t0 = Instant::now();
        pacer.turn("c", true).await.unwrap().sent();
        assert_eq!(Instant::now(), t0, "nobody was sent, so nothing to wait for");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keys_are_pruned_but_recent_ones_kept() {
        let pacer = Pacer::new(Limits { max_keys: 4, ..limits(1000, None) });
        for i in 0..4 {
            pacer.turn(&format!("k{i}"), true).await.unwrap().sent();
        }
        // All four sent within the interval: forgetting them would lose their spacing.
        pacer.turn("k4", true).await.unwrap().sent();
        assert_eq!(pacer.keys(), 5);
        tokio::time::advance(Duration::from_secs(2)).await;
        for i in 5..50 {
            drop(pacer.turn(&format!("k{i}"), false).await.unwrap());
            assert!(pacer.keys() <= 4, "{} keys remembered after k{i}", pacer.keys());
        }
        // A key still within its interval survives pruning and keeps its spacing.
        pacer.turn("hot", true).await.unwrap().sent();
        for i in 50..60 {
            drop(pacer.turn(&format!("k{i}"), false).await.unwrap());
        }
        let before = Instant::now();
        pacer.turn("hot", true).await.unwrap().sent();
        assert_eq!(Instant::now() - before, 1000 * MS, "the recent key's spacing was kept");
    }
}
