//! `FrameRing`: a bounded ring of numbered frames between one producer (a source thread) and a
//! reader. The producer never waits: when the ring is full the oldest frame is overwritten and
//! counted. A reader that falls behind learns how many frames it missed.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use ringbuf::HeapRb;
use ringbuf::traits::{Consumer, Observer, RingBuffer};

use crate::Frame;

/// Why a ring was closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingEnd {
    /// The source ended normally (end of a clip without looping).
    EndOfStream,
    /// The source failed.
    Failed(String),
    /// The reader stopped the source.
    Stopped,
}

struct State {
    rb: HeapRb<(u64, Frame)>,
    next_seq: u64,
    overwritten: u64,
    arrived: u64,
    lost_upstream: u64,
    end: Option<RingEnd>,
}

/// A bounded, overwriting frame ring.
pub struct FrameRing {
    state: Mutex<State>,
    changed: Condvar,
    capacity: usize,
}

impl std::fmt::Debug for FrameRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameRing").field("capacity", &self.capacity).finish_non_exhaustive()
    }
}

/// What a read returns.
#[derive(Debug)]
pub enum Read {
    /// The next frame, and how many frames were lost just before it.
    Frame {
        /// The frame.
        frame: Frame,
        /// Frames overwritten before this reader saw them.
        missed: u64,
    },
    /// Nothing arrived within the timeout.
    Timeout,
    /// The ring is closed and drained.
    Closed(RingEnd),
}

impl FrameRing {
    /// A ring holding at most `capacity` frames (at least 1).
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(FrameRing {
            state: Mutex::new(State {
                rb: HeapRb::new(capacity.max(1)),
                next_seq: 0,
                overwritten: 0,
                arrived: 0,
                lost_upstream: 0,
                end: None,
            }),
            changed: Condvar::new(),
            capacity: capacity.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-push; the ring itself is sound.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a frame, overwriting the oldest when full. Returns false once the ring is closed
    /// (the producer should stop).
    pub fn push(&self, frame: Frame) -> bool {
        let mut s = self.lock();
        if s.end.is_some() {
            return false;
        }
        let seq = s.next_seq;
        s.next_seq += 1;
        if s.rb.push_overwrite((seq, frame)).is_some() {
            s.overwritten += 1;
        }
        drop(s);
        self.changed.notify_all();
        true
    }

    /// Closes the ring; readers drain what is left, then see `end`.
    pub fn close(&self, end: RingEnd) {
        let mut s = self.lock();
        if s.end.is_none() {
            s.end = Some(end);
        }
        drop(s);
        self.changed.notify_all();
    }

    /// Why the ring was closed, once it is.
    pub fn end(&self) -> Option<RingEnd> {
        self.lock().end.clone()
    }

    /// Whether the ring was closed.
    pub fn is_closed(&self) -> bool {
        self.lock().end.is_some()
    }

    /// Frames pushed so far.
    pub fn pushed(&self) -> u64 {
        self.lock().next_seq
    }

    /// Frames overwritten before anyone read them.
    pub fn overwritten(&self) -> u64 {
        self.lock().overwritten
    }

    /// Counts a frame that arrived from the source, whether or not it is pushed (sources admit
    /// only the frames their windows sample).
    pub fn count_arrival(&self) {
        self.lock().arrived += 1;
    }

    /// Frames that arrived from the source so far.
    pub fn arrived(&self) -> u64 {
        self.lock().arrived
    }

    /// Counts frames lost before they reached the ring (a live source's decoder fell behind and
    /// skipped to the next key frame).
    pub fn count_lost_upstream(&self, n: u64) {
        self.lock().lost_upstream += n;
    }

    /// Frames lost before reaching the ring.
    pub fn lost_upstream(&self) -> u64 {
        self.lock().lost_upstream
    }

    /// A reader starting at the oldest frame still held.
    pub fn reader(self: &Arc<Self>) -> RingReader {
        RingReader { ring: self.clone(), next: 0 }
    }
}

/// Pops the next frame a reader at `next` has not seen, with how many it missed before it.
fn take(s: &mut State, next: &mut u64) -> Option<(Frame, u64)> {
    while let Some((seq, _)) = s.rb.first() {
        if *seq < *next {
            s.rb.try_pop();
        } else {
            break;
        }
    }
    let (seq, frame) = s.rb.try_pop()?;
    let missed = seq - *next;
    *next = seq + 1;
    Some((frame, missed))
}

/// Reads a ring in order.
#[derive(Debug)]
pub struct RingReader {
    ring: Arc<FrameRing>,
    next: u64,
}

impl RingReader {
    /// The next frame, or the ring's end once it is closed and drained; waits as long as it
    /// takes (a closed ring wakes it).
    pub fn recv(&mut self) -> Result<(Frame, u64), RingEnd> {
        let mut s = self.ring.lock();
        loop {
            if let Some(read) = take(&mut s, &mut self.next) {
                return Ok(read);
            }
            if let Some(end) = &s.end {
                return Err(end.clone());
            }
            s = self.ring.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The next frame, waiting at most `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Read {
        let mut s = self.ring.lock();
        loop {
            if let Some((frame, missed)) = take(&mut s, &mut self.next) {
                return Read::Frame { frame, missed };
            }
            if let Some(end) = &s.end {
                return Read::Closed(end.clone());
            }
            let (guard, t) = self.ring.changed.wait_timeout(s, timeout).unwrap_or_else(|e| e.into_inner());
            s = guard;
            if t.timed_out() && s.rb.is_empty() && s.end.is_none() {
                return Read::Timeout;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64) -> Frame {
        Frame { seq, pts: Duration::from_millis(seq * 33), width: 1, height: 1, rgb: Arc::from(vec![0u8; 3]) }
    }

    #[test]
    fn overwrites_oldest_and_reports_missed() {
        let ring = FrameRing::new(3);
        let mut r = ring.reader();
        for i in 0..5 {
            assert!(ring.push(frame(i)));
        }
        assert_eq!(ring.overwritten(), 2);
        match r.next(Duration::from_millis(10)) {
            Read::Frame { frame, missed } => {
                assert_eq!(frame.seq, 2);
                assert_eq!(missed, 2);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(r.next(Duration::ZERO), Read::Frame { missed: 0, .. }));
        assert!(matches!(r.next(Duration::ZERO), Read::Frame { missed: 0, .. }));
        assert!(matches!(r.next(Duration::from_millis(5)), Read::Timeout));
        ring.close(RingEnd::EndOfStream);
        assert!(!ring.push(frame(9)));
        assert!(matches!(r.next(Duration::from_millis(5)), Read::Closed(RingEnd::EndOfStream)));
    }

    #[test]
    fn reader_wakes_on_push_from_another_thread() {
        let ring = FrameRing::new(2);
        let mut r = ring.reader();
        let producer = ring.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            producer.push(frame(0));
        });
        assert!(matches!(r.next(Duration::from_secs(5)), Read::Frame { .. }));
        t.join().unwrap();
        // `recv` waits without a timeout: a close from another thread wakes it.
        let closer = ring.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            closer.close(RingEnd::Stopped);
        });
        assert_eq!(r.recv().unwrap_err(), RingEnd::Stopped);
        t.join().unwrap();
    }
}
