//! One shutdown mechanism for the threads and tasks of a pipeline: a signal to stop, and a way
//! to wait until every one of them has stopped.
//!
//! [`channel`] returns a [`Sender`] and a [`Receiver`]. Every thread and task of the pipeline
//! holds a clone of the receiver for as long as it runs and drops it when it exits:
//! - [`Sender::shutdown`] (or dropping the sender) is the signal. Receivers can check it
//!   ([`Receiver::is_shutdown`]), await it from async code ([`Receiver::cancelled`]) or wait on it
//!   from a plain thread with a deadline ([`Receiver::wait_until`]), which doubles as an
//!   interruptible sleep (a paced replay sleeps in it and wakes at once on shutdown).
//! - [`Sender::join`] gives the signal and resolves once every receiver is gone, that is once
//!   every stage holding one has exited: the owner of a pipeline joins all of its threads and
//!   tasks with one call, whoever spawned them.
//!
//! Nothing polls: async waiters are woken by a [`tokio::sync::Notify`], blocked threads by a
//! condition variable, and the join by the last receiver's drop.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{Notify, mpsc};

#[derive(Debug, Default)]
struct Inner {
    down: Mutex<bool>,
    threads: Condvar,
    tasks: Notify,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, bool> {
        // The flag is a plain bool: a panic elsewhere cannot leave it half-written.
        self.down.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn signal(&self) {
        let mut down = self.lock();
        if *down {
            return;
        }
        *down = true;
        drop(down);
        self.threads.notify_all();
        self.tasks.notify_waiters();
    }
}

/// The owner's side: gives the signal and joins the stages.
#[derive(Debug)]
pub struct Sender {
    inner: Arc<Inner>,
    /// Cloned into each receiver; the join waits until no clone is left.
    alive: Option<mpsc::Sender<()>>,
    exited: mpsc::Receiver<()>,
}

/// A stage's side: the signal, and (by being held) the proof that the stage still runs.
#[derive(Debug, Clone)]
pub struct Receiver {
    inner: Arc<Inner>,
    _alive: Option<mpsc::Sender<()>>,
}

/// A new, not yet signalled, shutdown channel.
pub fn channel() -> (Sender, Receiver) {
    let inner = Arc::new(Inner::default());
    let (alive, exited) = mpsc::channel(1);
    let rx = Receiver { inner: inner.clone(), _alive: Some(alive.clone()) };
    (Sender { inner, alive: Some(alive), exited }, rx)
}

impl Sender {
    /// Signals now (dropping the sender does the same).
    pub fn shutdown(&self) {
        self.inner.signal();
    }

    /// Whether the signal was given.
    pub fn is_shutdown(&self) -> bool {
        *self.inner.lock()
    }

    /// A receiver for one more stage.
    pub fn subscribe(&self) -> Receiver {
        Receiver { inner: self.inner.clone(), _alive: self.alive.clone() }
    }

    /// Signals, then waits until every receiver has been dropped (every stage has exited).
    pub async fn join(mut self) {
        self.inner.signal();
        self.alive = None;
        // `recv` yields `None` once the last receiver's sender clone is dropped.
        while self.exited.recv().await.is_some() {}
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.inner.signal();
    }
}

impl Receiver {
    /// Whether the signal was given.
    pub fn is_shutdown(&self) -> bool {
        *self.inner.lock()
    }

    /// Resolves once the signal is given (at once if it was).
    pub async fn cancelled(&self) {
        loop {
            let notified = self.inner.tasks.notified();
            tokio::pin!(notified);
            // Register before checking, so a signal between the check and the await is not lost.
            notified.as_mut().enable();
            if self.is_shutdown() {
                return;
            }
            notified.await;
        }
    }

    /// Blocks this thread until `deadline` or the signal, whichever comes first. Returns `true`
    /// when the deadline passed without a shutdown, `false` on shutdown.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        let mut down = self.inner.lock();
        loop {
            if *down {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            down = self.inner.threads.wait_timeout(down, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// A receiver that is never signalled and joins nothing (for a source started outside any
    /// pipeline, such as a benchmark's).
    pub fn never() -> Receiver {
        // Only a sender signals; this one has none.
        Receiver { inner: Arc::new(Inner::default()), _alive: None }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_signal_wakes_a_blocked_thread_at_once() {
        let (tx, rx) = channel();
        let t = std::thread::spawn(move || {
            let started = Instant::now();
            let slept = rx.wait_until(Instant::now() + Duration::from_secs(60));
            (slept, started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(20));
        drop(tx);
        let (slept, took) = t.join().unwrap();
        assert!(!slept);
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[test]
    fn a_deadline_passes_without_a_signal() {
        let (_tx, rx) = channel();
        assert!(rx.wait_until(Instant::now() + Duration::from_millis(5)));
        assert!(!rx.is_shutdown());
        assert!(Receiver::never().wait_until(Instant::now() + Duration::from_millis(1)));
    }

    #[tokio::test]
    async fn tasks_wake_and_late_waiters_return_at_once() {
        let (tx, rx) = channel();
        let waiter = tokio::spawn({
            let rx = rx.clone();
            async move { rx.cancelled().await }
        });
        tokio::task::yield_now().await;
        tx.shutdown();
        tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert!(rx.is_shutdown());
        // After the signal, waiting returns immediately.
        tokio::time::timeout(Duration::from_millis(100), rx.cancelled()).await.unwrap();
    }

    #[tokio::test]
    async fn join_waits_for_every_stage_thread_or_task() {
        let (tx, rx) = channel();
        let exited = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for _ in 0..3 {
            let (rx, exited) = (tx.subscribe(), exited.clone());
            std::thread::spawn(move || {
                while rx.wait_until(Instant::now() + Duration::from_secs(60)) {}
                std::thread::sleep(Duration::from_millis(30)); // cleaning up
                exited.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        let task_exited = exited.clone();
        tokio::spawn(async move {
            rx.cancelled().await;
            task_exited.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        tokio::time::timeout(Duration::from_secs(5), tx.join()).await.unwrap();
        assert_eq!(exited.load(std::sync::atomic::Ordering::SeqCst), 4);
    }
}
