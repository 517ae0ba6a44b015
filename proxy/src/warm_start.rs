//! A woken agent's session start, prepared while the agent boots.
//!
//! When the proxy wakes an agent it reads the agent's log position and first pending events
//! from the store at once, while the agent's process or machine is still starting. The agent's
//! Hello is then answered from memory: `Welcome` and the first `Deliver` go out without a store
//! round trip, which under load is the slowest step of a session's start (it waits for the
//! store's thread and for Redis, each busy with every other request).
//!
//! A prepared start can go stale before the agent connects: an operator may rewind or drop
//! events (the admin API discards it), and another replica sharing the store may move the
//! cursor. So a session that starts warm still asks the store for the position, alongside
//! delivery, and ends with "reconnect" if the answer differs; the reconnect starts cold from
//! the store's position. At worst the agent sees the prepared events once more than it needed
//! to (at-least-once), never a gap.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use concierge_protocol::EventRecord;
use concierge_store::{Position, Store};

use crate::fleet::AgentRuntime;

/// Most events a prepared start holds.
const MAX_EVENTS: usize = 64;
/// Most record bytes a prepared start holds: bounds the memory of a storm of wakes (10,000
/// waking agents hold at most 160 MiB). A first event larger than this is read at Hello.
const MAX_BYTES: usize = 16 * 1024;
/// An early wake starts before its event is stored: how long preparing waits for it.
const WAIT_FOR_EVENT: Duration = Duration::from_secs(10);

/// What a warm session start states and delivers first.
#[derive(Clone, Debug)]
pub struct WarmStart {
    /// The store's position when the wake began.
    pub position: Position,
    /// Pending events from the cursor on, in offset order (possibly none).
    pub events: Vec<EventRecord>,
    prepared_at: Instant,
}

/// One agent's prepared start, if any.
#[derive(Debug, Default)]
pub struct Slot(Mutex<State>);

#[derive(Debug, Default)]
enum State {
    #[default]
    Empty,
    Preparing,
    Ready(WarmStart),
}

impl Slot {
    /// Claims the slot for a preparation; false when one is underway or ready.
    fn begin(&self) -> bool {
        let mut state = lock(&self.0);
        if matches!(*state, State::Empty) {
            *state = State::Preparing;
            true
        } else {
            false
        }
    }

    /// Stores a finished preparation, unless a session started (or it was discarded) meanwhile:
    /// that session already read the log itself, and a later one must not replay this.
    fn finish(&self, warm: Option<WarmStart>) {
        let mut state = lock(&self.0);
        if matches!(*state, State::Preparing) {
            *state = warm.map_or(State::Empty, State::Ready);
        }
    }

    /// Takes the prepared start for a session, if it still starts at `cursor` (what this
    /// process knows: an ack or rewind since the wake began makes it stale).
    pub fn take(&self, cursor: u64) -> Option<WarmStart> {
        match std::mem::take(&mut *lock(&self.0)) {
            State::Ready(warm) if warm.position.cursor == cursor => Some(warm),
            _ => None,
        }
    }

    /// Forgets any prepared start (an operator moved the agent's position).
    pub fn discard(&self) {
        *lock(&self.0) = State::Empty;
    }

    /// Forgets the start prepared at `at` if nobody took it: the agent never connected.
    fn expire(&self, at: Instant) {
        let mut state = lock(&self.0);
        if matches!(&*state, State::Ready(w) if w.prepared_at == at) {
            *state = State::Empty;
        }
    }
}

/// Prepares `agent`'s next session start, then holds it for `hold` (the wake's connect
/// timeout) at most. Does nothing when a preparation is underway or ready.
pub async fn prepare(agent: Arc<AgentRuntime>, store: Arc<dyn Store>, hold: Duration) {
    if !agent.warm_start.begin() {
        return;
    }
    let warm = read(&agent, &*store).await;
    let prepared_at = warm.as_ref().map(|w| w.prepared_at);
    agent.warm_start.finish(warm);
    if let Some(at) = prepared_at {
        tokio::time::sleep(hold).await;
        agent.warm_start.expire(at);
    }
}

/// The position and first events, once this process has stored an event the agent has not
/// acked; `None` on a store error or when no event comes (the session then starts cold).
async fn read(agent: &AgentRuntime, store: &dyn Store) -> Option<WarmStart> {
    let mut head = agent.watch_head();
    // One statement, so the borrow of the head ends before the next await.
    let stored =
        matches!(tokio::time::timeout(WAIT_FOR_EVENT, head.wait_for(|h| *h > agent.cursor())).await, Ok(Ok(_)));
    if !stored {
        return None;
    }
    let position = store.position(agent.id()).await.ok()?;
    let mut events = store.read_records(agent.id(), position.cursor, MAX_EVENTS).await.ok()?;
    events.truncate(within(&events, MAX_BYTES));
    Some(WarmStart { position, events, prepared_at: Instant::now() })
}

/// How many of `events`, from the front, hold at most `budget` record bytes (possibly none:
/// unlike a delivery batch, a prepared start never exceeds its bound).
fn within(events: &[EventRecord], budget: usize) -> usize {
    let mut bytes = 0;
    events
        .iter()
        .take_while(|e| {
            bytes += e.record.len();
            bytes <= budget
        })
        .count()
}

/// Poisoning only follows a panic elsewhere; the slot is still consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: u64, bytes: usize) -> EventRecord {
        EventRecord { offset, received_at_ms: 0, record: vec![0; bytes] }
    }

    #[test]
    fn a_prepared_start_never_holds_more_than_its_byte_bound() {
        let kib = |n: usize| (1..=n as u64).map(|o| record(o, 1024)).collect::<Vec<_>>();
        assert_eq!(within(&kib(64), MAX_BYTES), 16, "16 KiB of 1 KiB records");
        assert_eq!(within(&kib(3), MAX_BYTES), 3);
        assert_eq!(
            within(&[record(1, MAX_BYTES + 1), record(2, 10)], MAX_BYTES),
            0,
            "a first event over the bound: none"
        );
        assert_eq!(within(&[], MAX_BYTES), 0);
    }

    fn warm(cursor: u64) -> WarmStart {
        WarmStart {
            position: Position { epoch: 7, cursor, head: cursor + 1 },
            events: Vec::new(),
            prepared_at: Instant::now(),
        }
    }

    #[test]
    fn a_prepared_start_is_taken_once_and_only_at_its_cursor() {
        let slot = Slot::default();
        assert!(slot.begin());
        assert!(!slot.begin(), "one preparation at a time");
        slot.finish(Some(warm(3)));
        assert!(!slot.begin(), "a ready start is not prepared again");
        assert_eq!(slot.take(3).map(|w| w.position.cursor), Some(3));
        assert!(slot.take(3).is_none(), "taken once");

        assert!(slot.begin());
        slot.finish(Some(warm(3)));
        assert!(slot.take(4).is_none(), "the agent acked since: stale");
        assert!(slot.take(3).is_none(), "a stale start is dropped, not kept for later");
    }

    #[test]
    fn a_session_that_starts_while_preparing_wins_and_the_preparation_is_dropped() {
        let slot = Slot::default();
        assert!(slot.begin());
        assert!(slot.take(0).is_none(), "nothing ready yet: the session starts cold");
        slot.finish(Some(warm(0)));
        assert!(slot.take(0).is_none(), "the late preparation must not replay for a later session");
        assert!(slot.begin(), "the slot is free again");
    }

    #[test]
    fn discarded_and_expired_starts_are_gone() {
        let slot = Slot::default();
        assert!(slot.begin());
        slot.finish(Some(warm(0)));
        slot.discard();
        assert!(slot.take(0).is_none());

        assert!(slot.begin());
        let w = warm(0);
        let at = w.prepared_at;
        slot.finish(Some(w));
        slot.expire(at + Duration::from_millis(1));
        assert!(slot.take(0).is_some(), "only the start prepared at that instant expires");
        assert!(slot.begin());
        slot.finish(Some(WarmStart { prepared_at: at, ..warm(0) }));
        slot.expire(at);
        assert!(slot.take(0).is_none());
        assert!(slot.begin(), "an expired slot can be prepared again");
        slot.finish(None);
        assert!(slot.begin(), "a failed preparation frees the slot");
    }
}
