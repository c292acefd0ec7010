//! The parallel loops of the CPU kernels ([`crate::gemm`], [`crate::fastmath`]), on candle's
//! own worker pool.
//!
//! candle runs its element-wise ops on a barrier pool: the calling thread and `threads - 1`
//! workers that spin a while before they sleep. The kernels here ran on rayon's global pool,
//! whose workers spin too, so every switch between a candle op and a kernel left the other
//! pool's threads spinning on the cores the work needed (on 2 cores, four threads: the spinning
//! was 8 % of a prefill's samples). Running the kernels on candle's pool keeps one set of
//! threads, with the caller working as one of them.
//!
//! A task must not call candle's ops or another loop of the pool from the calling thread (the
//! pool takes one call at a time); a loop started inside a task runs serially instead.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    /// Set while this thread runs a loop's tasks.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Resets [`INSIDE`] when a task returns or unwinds.
struct Inside(bool);

impl Inside {
    fn enter() -> Inside {
        Inside(INSIDE.with(|c| c.replace(true)))
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        INSIDE.with(|c| c.set(self.0));
    }
}

/// Threads a loop runs on (the caller and candle's workers).
pub(crate) fn threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// Calls `f(i)` for every `i < n`, each once, spread over the pool's threads as they free up;
/// serially for one task, on a one-thread pool, or inside another loop's task.
pub(crate) fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    if n <= 1 || INSIDE.with(Cell::get) || threads() == 1 {
        let _inside = Inside::enter();
        (0..n).for_each(f);
        return;
    }
    let next = AtomicUsize::new(0);
    candle_core::utils::barrier_pool().execute(|_| {
        let _inside = Inside::enter();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            f(i);
        }
    });
}

/// A pointer handed to the tasks, which touch disjoint parts of what it points at.
struct Shared<T>(*mut T);

// SAFETY: the tasks use disjoint ranges of the buffer (see `for_each_chunk`).
#[allow(unsafe_code)]
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

/// Calls `f(i, part)` for each `chunk`-long part of `data` (the last may be shorter), as
/// [`for_each`].
pub(crate) fn for_each_chunk<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let (len, chunk) = (data.len(), chunk.max(1));
    let base = Shared(data.as_mut_ptr());
    for_each(len.div_ceil(chunk), |i| {
        let start = i * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: `for_each` gives out each `i` once, so the parts are disjoint, and they lie
        // within `data`, which this call borrows mutably until every task has returned.
        #[allow(unsafe_code)]
        let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        f(i, part);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_once_and_nested_loops_run() {
        let mut data = vec![0u32; 1001];
        for_each_chunk(&mut data, 10, |i, part| {
            // A loop inside a task runs serially on its thread.
            let inner = AtomicUsize::new(0);
            for_each(3, |_| {
                inner.fetch_add(1, Ordering::Relaxed);
            });
            part.iter_mut().for_each(|v| *v += i as u32 * 10 + inner.load(Ordering::Relaxed) as u32);
        });
        for (j, v) in data.iter().enumerate() {
            assert_eq!(*v, (j / 10) as u32 * 10 + 3, "at {j}");
        }
        assert_eq!(data.len(), 1001);
        let mut empty: Vec<u8> = Vec::new();
        for_each_chunk(&mut empty, 4, |_, _| panic!("no parts"));
    }
}
