//! Events this process has just stored for an agent whose session is live, handed to that
//! session from memory instead of being read back from the store.
//!
//! Why: for an awake agent the store read between "stored" and "delivered" was a round trip
//! through the store's thread and Redis on every event's critical path, and under load each
//! thread hop is one more chance to wait for a CPU. The store stays authoritative: a session
//! takes from here only the events that continue exactly where it has read to; anything else
//! (an event another replica stored, one evicted from here, an operator's drop or rewind)
//! leaves a gap, and the session reads the store as before. So this can save a read, never
//! skip or reorder an event.

use std::collections::VecDeque;

use concierge_protocol::EventRecord;

/// Most events held per agent: enough for bursts between two session wake-ups.
const MAX_EVENTS: usize = 64;
/// Most record bytes held per agent (`bounded everything`): a slow session's backlog is read
/// from the store, not piled up here.
const MAX_BYTES: usize = 256 * 1024;

/// Just-stored events in offset order, at most [`MAX_EVENTS`] and [`MAX_BYTES`].
#[derive(Debug, Default)]
pub struct Fresh {
    events: VecDeque<EventRecord>,
    bytes: usize,
}

impl Fresh {
    /// Keeps `event`, in offset order (concurrent ingests may finish out of order), evicting
    /// the oldest beyond the bounds. A record larger than the byte bound is not kept.
    pub fn push(&mut self, event: EventRecord) {
        if event.record.len() > MAX_BYTES {
            return;
        }
        let at = self.events.iter().rposition(|e| e.offset < event.offset).map_or(0, |i| i + 1);
        if self.events.get(at).is_some_and(|e| e.offset == event.offset) {
            return;
        }
        self.bytes += event.record.len();
        self.events.insert(at, event);
        while self.events.len() > MAX_EVENTS || self.bytes > MAX_BYTES {
            self.evict_front();
        }
    }

    /// The events that follow `after` without a gap, at most `room`; forgets everything up to
    /// the last one returned (or up to `after`, when nothing follows it directly).
    pub fn take_after(&mut self, after: u64, room: usize) -> Vec<EventRecord> {
        while self.events.front().is_some_and(|e| e.offset <= after) {
            self.evict_front();
        }
        let count = self.events.iter().take(room).zip(after + 1..).take_while(|(e, next)| e.offset == *next).count();
        let taken: Vec<EventRecord> = self.events.drain(..count).collect();
        self.bytes -= taken.iter().map(|e| e.record.len()).sum::<usize>();
        taken
    }

    /// Forgets everything (the session ended, or an operator moved the position).
    pub fn clear(&mut self) {
        self.events.clear();
        self.bytes = 0;
    }

    fn evict_front(&mut self) {
        if let Some(e) = self.events.pop_front() {
            self.bytes -= e.record.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: u64, bytes: usize) -> EventRecord {
        EventRecord { offset, received_at_ms: offset, record: vec![0; bytes] }
    }

    fn offsets(events: &[EventRecord]) -> Vec<u64> {
        events.iter().map(|e| e.offset).collect()
    }

    #[test]
    fn only_events_continuing_where_the_session_read_to_are_taken() {
        let mut f = Fresh::default();
        for o in [5, 3, 4, 7] {
            f.push(record(o, 10));
        }
        assert_eq!(offsets(&f.take_after(2, 10)), vec![3, 4, 5], "in offset order, stopping at the gap before 7");
        assert!(f.take_after(5, 10).is_empty(), "6 is missing (another replica stored it): read the store");
        assert_eq!(offsets(&f.take_after(6, 10)), vec![7], "after the store read of 6, 7 continues");
        assert_eq!(f.bytes, 0);
    }

    #[test]
    fn what_the_session_already_has_is_forgotten_and_room_is_respected() {
        let mut f = Fresh::default();
        for o in 1..=6 {
            f.push(record(o, 10));
        }
        f.push(record(4, 10));
        assert_eq!(offsets(&f.take_after(2, 2)), vec![3, 4], "1 and 2 forgotten, the duplicate 4 not kept twice");
        assert_eq!(offsets(&f.take_after(4, 10)), vec![5, 6]);
        assert_eq!(f.bytes, 0);
    }

    #[test]
    fn bounded_by_count_and_bytes_evicting_the_oldest() {
        let mut f = Fresh::default();
        for o in 1..=(MAX_EVENTS as u64 + 3) {
            f.push(record(o, 10));
        }
        assert_eq!(f.events.len(), MAX_EVENTS);
        assert!(f.take_after(0, usize::MAX).is_empty(), "1-3 were evicted: a gap, so the store is read");
        let mut f = Fresh::default();
        for o in 1..=5 {
            f.push(record(o, MAX_BYTES / 4));
        }
        assert!(f.bytes <= MAX_BYTES);
        assert_eq!(offsets(&f.take_after(1, 10)), vec![2, 3, 4, 5]);
        f.push(record(9, MAX_BYTES + 1));
        assert!(f.events.is_empty(), "a record over the bound is not kept");
    }
}
