//! A tiny fork-join pool for the CPU kernels.
//!
//! Why not rayon: a decode step runs ~200 small matrix-vector products back to back, each a few
//! tens of microseconds. A pool whose workers go to sleep between jobs pays a futex wake-up
//! (5–50 µs) per job, which on this workload costs as much as the arithmetic. Our workers spin
//! for a short while after each job (as llama.cpp's do) and only then park, so consecutive jobs
//! within a step start in well under a microsecond, while an idle server still sleeps.
//!
//! The calling thread always takes part as participant 0, so a pool of `n` threads has `n - 1`
//! workers. Only one job runs at a time: a caller that finds the pool busy (another engine, a
//! test running in parallel) runs its job alone on its own thread instead of waiting.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long a worker spins for the next job before parking. Long enough to bridge the gap
/// between two projections of a decode step, short enough not to burn a core when idle.
const SPIN: Duration = Duration::from_micros(300);

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    /// Bumped once per job; workers wait for it to change.
    generation: AtomicUsize,
    /// Workers that finished the current job.
    done: AtomicUsize,
    /// The current job, valid while `run` is blocked on it (lifetime erased).
    job: UnsafeCell<Option<*const Job>>,
    /// Number of participants in the current job (caller included).
    participants: AtomicUsize,
    shutdown: AtomicBool,
    /// Worker threads, for unparking.
    threads: Mutex<Vec<Thread>>,
    sleeping: Vec<AtomicBool>,
}

// SAFETY: `job` is written only by the thread holding `ThreadPool::busy` before the generation
// bump (Release) and read by workers after observing the bump (Acquire); `run` does not return
// (so the closure outlives every use) until all participants have incremented `done`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    busy: Mutex<()>,
    n_threads: usize,
}

impl ThreadPool {
    /// A pool with `n_threads` participants (the caller plus `n_threads - 1` workers).
    pub fn new(n_threads: usize) -> Self {
        let n_threads = n_threads.max(1);
        let n_workers = n_threads - 1;
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            participants: AtomicUsize::new(1),
            shutdown: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            sleeping: (0..n_workers).map(|_| AtomicBool::new(false)).collect(),
        });
        let mut handles = Vec::with_capacity(n_workers);
        for w in 0..n_workers {
            let s = shared.clone();
            let h = thread::Builder::new()
                .name(format!("lethe-kernel-{}", w + 1))
                .spawn(move || worker_loop(s, w))
                .expect("spawning a kernel worker thread");
            handles.push(h.thread().clone());
        }
        *shared.threads.lock().unwrap() = handles;
        Self {
            shared,
            busy: Mutex::new(()),
            n_threads,
        }
    }

    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Runs `f(participant, n_participants)` on up to `max_parallel` threads and returns when all
    /// are done. `f` must split its work by the participant index it is given.
    pub fn run<F: Fn(usize, usize) + Sync>(&self, max_parallel: usize, f: F) {
        let n = max_parallel.clamp(1, self.n_threads);
        if n == 1 {
            f(0, 1);
            return;
        }
        let Ok(_guard) = self.busy.try_lock() else {
            f(0, 1);
            return;
        };
        let s = &*self.shared;
        let job: &(dyn Fn(usize, usize) + Sync + '_) = &f;
        // SAFETY: we hold `busy`, no worker reads `job` until the generation bump below, and we
        // do not return (so `f` lives) until every worker has acknowledged the job.
        unsafe {
            *s.job.get() = Some(std::mem::transmute::<
                &(dyn Fn(usize, usize) + Sync + '_),
                *const Job,
            >(job));
        }
        s.participants.store(n, Ordering::Relaxed);
        s.done.store(0, Ordering::Relaxed);
        s.generation.fetch_add(1, Ordering::SeqCst);
        for (w, sleeping) in s.sleeping.iter().enumerate() {
            if sleeping.load(Ordering::SeqCst) {
                s.threads.lock().unwrap()[w].unpark();
            }
        }
        f(0, n);
        // Every worker acknowledges every job (even when not a participant), so that none can
        // still be about to read `job` after we return.
        let n_workers = self.n_threads - 1;
        while s.done.load(Ordering::Acquire) < n_workers {
            std::hint::spin_loop();
        }
        unsafe {
            *s.job.get() = None;
        }
    }
}

fn worker_loop(s: Arc<Shared>, w: usize) {
    let me = w + 1;
    // The pool is built with generation 0 and no job runs before `new` returns.
    let mut seen = 0;
    loop {
        // Wait for a new job: spin first, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            if s.shutdown.load(Ordering::Relaxed) {
                return;
            }
            spins += 1;
            if !spins.is_multiple_of(64) || start.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            s.sleeping[w].store(true, Ordering::SeqCst);
            if s.generation.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst) {
                thread::park();
            }
            s.sleeping[w].store(false, Ordering::SeqCst);
        }
        let n = s.participants.load(Ordering::Relaxed);
        if me < n {
            // SAFETY: see `Shared`; the job pointer is valid until we bump `done`.
            let job = unsafe { (*s.job.get()).expect("job published with the generation") };
            unsafe { (*job)(me, n) };
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for t in self.shared.threads.lock().unwrap().iter() {
            t.unpark();
        }
    }
}

static GLOBAL: OnceLock<ThreadPool> = OnceLock::new();

/// Sets the number of kernel threads. Only the first call (before any kernel ran) has an effect;
/// returns the number actually in use.
pub fn init_global(n_threads: usize) -> usize {
    GLOBAL
        .get_or_init(|| ThreadPool::new(n_threads))
        .n_threads()
}

/// The process-wide kernel pool; defaults to one thread per available core.
pub fn global() -> &'static ThreadPool {
    GLOBAL.get_or_init(|| ThreadPool::new(default_threads()))
}

/// One thread per core the process may use (`LETHE_THREADS` overrides).
pub fn default_threads() -> usize {
    std::env::var("LETHE_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get()))
}

/// A raw pointer that may be shared with pool participants which write disjoint parts of the
/// buffer behind it (every use states why the parts are disjoint).
#[derive(Clone, Copy)]
pub struct SyncPtr<T>(*mut T);

// SAFETY: only used to hand disjoint output regions to pool participants.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    pub fn new(p: *mut T) -> Self {
        Self(p)
    }
    pub fn get(&self) -> *mut T {
        self.0
    }
}

/// Splits `0..len` into `n` nearly equal contiguous parts and returns part `i`.
pub fn split_range(len: usize, i: usize, n: usize) -> std::ops::Range<usize> {
    let base = len / n;
    let extra = len % n;
    let start = i * base + i.min(extra);
    let end = start + base + usize::from(i < extra);
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_index_is_covered_once() {
        let pool = ThreadPool::new(3);
        for round in 0..2000 {
            let len = round % 97 + 1;
            let hits: Vec<AtomicU64> = (0..len).map(|_| AtomicU64::new(0)).collect();
            pool.run(3, |i, n| {
                for j in split_range(len, i, n) {
                    hits[j].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn wakes_after_parking() {
        let pool = ThreadPool::new(2);
        let total = AtomicU64::new(0);
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(5)); // workers park
            pool.run(2, |i, _| {
                total.fetch_add(i as u64 + 1, Ordering::Relaxed);
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 9);
    }

    #[test]
    fn concurrent_callers_do_not_deadlock() {
        let pool = Arc::new(ThreadPool::new(2));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let p = pool.clone();
                std::thread::spawn(move || {
                    let sum = AtomicU64::new(0);
                    for _ in 0..500 {
                        p.run(2, |i, n| {
                            for j in split_range(100, i, n) {
                                sum.fetch_add(j as u64, Ordering::Relaxed);
                            }
                        });
                    }
                    sum.load(Ordering::Relaxed)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 500 * 4950);
        }
    }

    #[test]
    fn split_range_partitions() {
        for len in 0..50 {
            for n in 1..7 {
                let mut next = 0;
                for i in 0..n {
                    let r = split_range(len, i, n);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }
}
