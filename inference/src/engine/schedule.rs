//! Who the engine admits next: interactive requests first, then background ones in turn across
//! their sources (the source admitted longest ago goes first, first come first served within a
//! source), each only when its KV cache fits beside the running requests'.

use std::collections::{HashMap, VecDeque};

use super::Priority;

/// A request waiting for admission, with what it will take of the KV budget.
pub(super) struct Pending<T> {
    pub(super) item: T,
    pub(super) source: String,
    pub(super) priority: Priority,
    /// Bytes of KV cache it reserves: its prompt plus `max_tokens`.
    pub(super) kv_bytes: usize,
}

/// The waiting requests, in arrival order.
pub(super) struct Waiting<T> {
    items: VecDeque<Pending<T>>,
    /// The admission count at each source's last admission.
    last: HashMap<String, u64>,
    admitted: u64,
}

impl<T> Waiting<T> {
    pub(super) fn new() -> Self {
        Waiting { items: VecDeque::new(), last: HashMap::new(), admitted: 0 }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.items.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(super) fn push(&mut self, p: Pending<T>) {
        self.items.push_back(p);
    }

    /// Drops the requests `gone` says are gone (cancelled while waiting); returns them.
    pub(super) fn remove_where(&mut self, mut gone: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        let mut kept = VecDeque::with_capacity(self.items.len());
        for p in self.items.drain(..) {
            if gone(&p.item) { out.push(p.item) } else { kept.push_back(p) }
        }
        self.items = kept;
        out
    }

    /// The next request to admit, with the KV bytes it reserves, if `free` bytes take it, and
    /// `None` otherwise: when the next in turn does not fit, nobody behind it goes ahead (a large
    /// request is never starved by small ones).
    pub(super) fn admit(&mut self, free: usize) -> Option<(T, usize)> {
        let at = self.next()?;
        if self.items[at].kv_bytes > free {
            return None;
        }
        let p = self.items.remove(at)?;
        self.admitted += 1;
        self.last.insert(p.source, self.admitted);
        Some((p.item, p.kv_bytes))
    }

    /// Index of the next in turn.
    fn next(&self) -> Option<usize> {
        self.items
            .iter()
            .enumerate()
            .min_by_key(|(i, p)| (p.priority, self.last.get(&p.source).copied().unwrap_or(0), *i))
            .map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(item: u32, source: &str, priority: Priority, kv_bytes: usize) -> Pending<u32> {
        Pending { item, source: source.into(), priority, kv_bytes }
    }

    #[test]
    fn sources_take_turns_and_interactive_goes_first() {
        let mut w = Waiting::new();
        // Camera a queued three windows before camera b's first.
        for (i, s) in [(1, "a"), (2, "a"), (3, "a"), (4, "b"), (5, "c")] {
            w.push(pending(i, s, Priority::Background, 1));
        }
        let mut order = vec![w.admit(10).unwrap().0];
        w.push(pending(6, "chat", Priority::Interactive, 1));
        while let Some((i, _)) = w.admit(10) {
            order.push(i);
        }
        // a, then the chat at once, then b and c before a's second and third.
        assert_eq!(order, [1, 6, 4, 5, 2, 3]);
        assert!(w.is_empty());
    }

    #[test]
    fn the_next_in_turn_waits_for_room_and_nobody_jumps_it() {
        let mut w = Waiting::new();
        w.push(pending(1, "a", Priority::Background, 100));
        w.push(pending(2, "b", Priority::Background, 1));
        assert_eq!(w.admit(50), None, "a does not fit: b waits behind it");
        assert_eq!(w.len(), 2);
        assert_eq!(w.admit(100), Some((1, 100)));
        assert_eq!(w.admit(1), Some((2, 1)));
    }

    #[test]
    fn cancelled_requests_leave_the_queue() {
        let mut w = Waiting::new();
        for i in 0..4 {
            w.push(pending(i, "a", Priority::Background, 1));
        }
        assert_eq!(w.remove_where(|i| i % 2 == 1), [1, 3]);
        assert_eq!(w.admit(1), Some((0, 1)));
        assert_eq!(w.admit(1), Some((2, 1)));
        assert_eq!(w.admit(1), None);
    }
}
