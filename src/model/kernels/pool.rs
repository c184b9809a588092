//! A tiny fork-join pool for the CPU kernels.
//!
//! Why not rayon: a decode step runs ~200 small matrix products back to back, each a few tens of
//! microseconds. A pool whose workers go to sleep between jobs pays a futex wake-up (5–50 µs) per
//! job, which on this workload costs as much as the arithmetic. Our workers spin for a short
//! while after each job (as llama.cpp's do) and only then park, so consecutive jobs within a step
//! start in well under a microsecond, while an idle server still sleeps.
//!
//! Why work is *claimed*, not assigned: on a 2-core machine the kernel threads share the cores
//! with the HTTP runtime. A statically partitioned job waits for its slowest participant, and a
//! participant that the OS has just preempted can take a whole scheduler quantum (milliseconds)
//! to come back. Here a job is a number of chunks that participants claim one at a time from a
//! shared counter; a worker that arrives late finds nothing left, and the caller never waits for
//! a worker that has not started a chunk. Workers *join* a job explicitly, so the caller only
//! waits for those actually running part of it.
//!
//! The calling thread always takes part, so a pool of `n` threads has `n - 1` workers. Only one
//! job runs at a time: a caller that finds the pool busy (another engine, a test running in
//! parallel) runs its job alone on its own thread instead of waiting.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long a worker spins for the next job before parking. Long enough to bridge the gap
/// between two projections of a decode step, short enough not to burn a core when idle.
const SPIN: Duration = Duration::from_micros(300);

/// How long a caller spins for workers still inside its finished job before it starts
/// yielding its core (far longer than a chunk of a decode step takes).
const YIELD_AFTER: Duration = Duration::from_micros(50);

type Job = dyn Fn(usize) + Sync;

/// `state` layout: generation in the high 32 bits, an "open for joining" flag, and the number of
/// workers currently inside the job.
const OPEN: u64 = 1 << 31;
const ACTIVE: u64 = OPEN - 1;

struct Shared {
    state: AtomicU64,
    /// The current job, valid while the caller of `run_chunks` is blocked on it.
    job: UnsafeCell<Option<*const Job>>,
    next_chunk: AtomicUsize,
    n_chunks: AtomicUsize,
    shutdown: AtomicBool,
    threads: Mutex<Vec<Thread>>,
    sleeping: Vec<AtomicBool>,
    /// A panic raised in a worker's chunk, re-raised on the caller once the job is over.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    /// Tests: how long a worker dawdles before joining a job (a preempted worker, on demand).
    #[cfg(test)]
    join_delay_us: AtomicU64,
}

// SAFETY: `job` is written by the thread that set `ThreadPool::busy` before the state is published
// (Release) and read by workers only after joining the published generation (Acquire); the caller
// does not return (so the closure outlives every use) until no worker is inside the job.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    /// Whether sharing jobs with the workers currently pays (see [`Adaptive`]); only the caller
    /// that set `busy` touches it.
    adaptive: Mutex<Adaptive>,
    /// Set while a caller runs a job on the workers. An atomic flag rather than a mutex: a
    /// panicking job must not leave it poisoned (every later job would silently run on one
    /// thread); [`Busy`] clears it however the job ends.
    busy: AtomicBool,
    n_threads: usize,
}

/// Holds [`ThreadPool::busy`]; clears it on drop, unwinding included.
struct Busy<'a>(&'a AtomicBool);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl ThreadPool {
    /// A pool with `n_threads` participants (the caller plus `n_threads - 1` workers).
    pub fn new(n_threads: usize) -> Self {
        let n_threads = n_threads.max(1);
        let n_workers = n_threads - 1;
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            next_chunk: AtomicUsize::new(0),
            n_chunks: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            sleeping: (0..n_workers).map(|_| AtomicBool::new(false)).collect(),
            panic: Mutex::new(None),
            #[cfg(test)]
            join_delay_us: AtomicU64::new(0),
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
        *shared.threads.lock().unwrap_or_else(|e| e.into_inner()) = handles;
        let adapt = std::env::var("LETHE_POOL_ADAPT").map_or(true, |v| v != "0");
        Self { shared, adaptive: Mutex::new(Adaptive::new(adapt)), busy: AtomicBool::new(false), n_threads }
    }

    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Runs `f(chunk)` for every chunk in `0..n_chunks`, spread over the pool's threads, and
    /// returns when all are done. Chunks must be independent (disjoint outputs).
    pub fn run_chunks<F: Fn(usize) + Sync>(&self, n_chunks: usize, f: F) {
        self.run_chunks_as(n_chunks, f, true)
    }

    /// [`Self::run_chunks`]; `may_run_alone`: whether the caller may run the whole job itself
    /// while sharing has not been paying (see [`Adaptive`]).
    fn run_chunks_as<F: Fn(usize) + Sync>(&self, n_chunks: usize, f: F, may_run_alone: bool) {
        if n_chunks <= 1 || self.n_threads == 1 {
            (0..n_chunks).for_each(&f);
            return;
        }
        if self.busy.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            (0..n_chunks).for_each(&f);
            return;
        }
        let _busy = Busy(&self.busy);
        let mut adaptive = self.adaptive.lock().unwrap_or_else(|e| e.into_inner());
        if may_run_alone && adaptive.run_alone() {
            drop(adaptive);
            (0..n_chunks).for_each(&f);
            return;
        }
        let started = Instant::now();
        let s = &*self.shared;
        let job: &(dyn Fn(usize) + Sync + '_) = &f;
        // SAFETY: we set `busy`, and no worker reads `job` before the state below is published.
        unsafe {
            *s.job.get() = Some(std::mem::transmute::<&(dyn Fn(usize) + Sync + '_), *const Job>(job));
        }
        s.next_chunk.store(0, Ordering::Relaxed);
        s.n_chunks.store(n_chunks, Ordering::Relaxed);
        let generation = (s.state.load(Ordering::Relaxed) >> 32) + 1;
        s.state.store((generation << 32) | OPEN, Ordering::SeqCst);
        for (w, sleeping) in s.sleeping.iter().enumerate() {
            if sleeping.load(Ordering::SeqCst) {
                s.threads.lock().unwrap_or_else(|e| e.into_inner())[w].unpark();
            }
        }
        // Ends the job even if our own chunk panics: the closure must outlive every worker
        // inside it, and no latecomer may join a job whose closure is gone.
        let end = EndJob(s);
        let own = claim_chunks(s, job);
        let own_time = started.elapsed();
        drop(end);
        adaptive.record(n_chunks, own, own_time, started.elapsed());
        drop(adaptive);
        if let Some(payload) = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
            std::panic::resume_unwind(payload);
        }
    }

    /// Runs `f(participant, n_participants)` on every thread of the pool. For jobs that split
    /// their work themselves; prefer [`Self::run_chunks`], which tolerates preempted workers.
    pub fn run<F: Fn(usize, usize) + Sync>(&self, max_parallel: usize, f: F) {
        let n = max_parallel.clamp(1, self.n_threads);
        self.run_chunks(n, |i| f(i, n));
    }
}

/// Closes the current job to latecomers, waits for the workers still inside it, and clears it
/// (on drop, so that it also happens while a panic unwinds the caller).
struct EndJob<'a>(&'a Shared);

impl Drop for EndJob<'_> {
    fn drop(&mut self) {
        let s = self.0;
        s.state.fetch_and(!OPEN, Ordering::SeqCst);
        // Spin for the workers still inside (they are normally a chunk away), but yield the
        // core after a while: a worker that takes long has usually been preempted, and may be
        // waiting for exactly this core.
        let start = Instant::now();
        let mut spins = 0u32;
        while s.state.load(Ordering::Acquire) & ACTIVE != 0 {
            spins += 1;
            if spins.is_multiple_of(64) && start.elapsed() > YIELD_AFTER {
                thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        // SAFETY: the caller set `busy` and no worker is inside the job any more.
        unsafe {
            *s.job.get() = None;
        }
        if thread::panicking() {
            // The caller's own panic wins; a worker's must not leak into the next job.
            s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }
}

/// Runs chunks until none is left; returns how many this participant ran.
fn claim_chunks(s: &Shared, job: &(dyn Fn(usize) + Sync + '_)) -> usize {
    let n = s.n_chunks.load(Ordering::Relaxed);
    let mut ran = 0;
    loop {
        let c = s.next_chunk.fetch_add(1, Ordering::Relaxed);
        if c >= n {
            return ran;
        }
        job(c);
        ran += 1;
    }
}

/// Decides whether jobs are worth sharing with the workers, from what sharing has been
/// costing.
///
/// On a machine where another busy process (or anything else) takes one of our cores, a worker
/// is preempted in the middle of its chunk and the caller waits a whole scheduler time slice
/// (milliseconds) for it, at every one of the ~150 jobs of a decode step: measured 55 tok/s with
/// the default two threads against 108 with one. The caller can see this at the end of each
/// job: it ran `own` of the `n` chunks in `own_time`, so alone the job would have taken about
/// `own_time · n / own`; the job actually took `total`. Over a window of jobs, if sharing lost
/// time overall, the caller runs jobs alone for a while (the workers park), then tries sharing
/// again; each further losing window doubles the time alone (up to a cap).
struct Adaptive {
    enabled: bool,
    /// Jobs run since the pool started.
    jobs: u64,
    /// Run jobs alone until `jobs` reaches this.
    alone_until: u64,
    /// Length of the next period alone.
    alone_len: u64,
    /// Seconds saved by sharing (negative: lost) over the current window.
    gain: f64,
    window: u32,
}

impl Adaptive {
    /// Jobs per decision (a decode step is ~150 jobs).
    const WINDOW: u32 = 256;
    const ALONE_MIN: u64 = 2048;
    const ALONE_MAX: u64 = 65536;

    fn new(enabled: bool) -> Self {
        Self { enabled, jobs: 0, alone_until: 0, alone_len: Self::ALONE_MIN, gain: 0.0, window: 0 }
    }

    /// Whether the next job runs on the caller alone.
    fn run_alone(&mut self) -> bool {
        self.jobs += 1;
        self.jobs < self.alone_until
    }

    fn record(&mut self, n: usize, own: usize, own_time: Duration, total: Duration) {
        if !self.enabled || own == 0 {
            return;
        }
        let alone = own_time.as_secs_f64() * n as f64 / own as f64;
        self.gain += alone - total.as_secs_f64();
        self.window += 1;
        if self.window < Self::WINDOW {
            return;
        }
        if self.gain < 0.0 {
            self.alone_until = self.jobs + self.alone_len;
            self.alone_len = (self.alone_len * 2).min(Self::ALONE_MAX);
        } else {
            self.alone_len = Self::ALONE_MIN;
        }
        self.gain = 0.0;
        self.window = 0;
    }
}

fn worker_loop(s: Arc<Shared>, w: usize) {
    let mut seen_generation = 0;
    loop {
        // Wait for a new job: spin first, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        let state = loop {
            let st = s.state.load(Ordering::Acquire);
            if st >> 32 != seen_generation {
                break st;
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
            if s.state.load(Ordering::SeqCst) >> 32 == seen_generation && !s.shutdown.load(Ordering::SeqCst) {
                thread::park();
            }
            s.sleeping[w].store(false, Ordering::SeqCst);
        };
        seen_generation = state >> 32;
        #[cfg(test)]
        {
            let delay = s.join_delay_us.load(Ordering::Relaxed);
            if delay > 0 {
                thread::sleep(Duration::from_micros(delay));
            }
        }
        // Join, if the job is still open (the caller may have finished it already).
        let mut st = s.state.load(Ordering::Acquire);
        let joined = loop {
            if st >> 32 != seen_generation || st & OPEN == 0 {
                break false;
            }
            match s.state.compare_exchange_weak(st, st + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break true,
                Err(now) => st = now,
            }
        };
        if joined {
            // SAFETY: joined while open: the caller waits for us before invalidating the job.
            let job = unsafe { (*s.job.get()).expect("an open job has a closure") };
            // A panicking chunk must not kill the worker without leaving the job (the caller
            // would wait forever): catch it, leave, and let the caller re-raise it.
            let run = std::panic::AssertUnwindSafe(|| {
                claim_chunks(&s, unsafe { &*job });
            });
            if let Err(payload) = std::panic::catch_unwind(run) {
                s.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(payload);
            }
            s.state.fetch_sub(1, Ordering::Release);
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for t in self.shared.threads.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            t.unpark();
        }
    }
}

static GLOBAL: OnceLock<ThreadPool> = OnceLock::new();

/// Sets the number of kernel threads. Only the first call (before any kernel ran) has an effect;
/// returns the number actually in use.
pub fn init_global(n_threads: usize) -> usize {
    GLOBAL.get_or_init(|| ThreadPool::new(n_threads)).n_threads()
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

/// Chunks to cut `len` items into for `threads` participants: a few per thread, so that a late
/// or preempted participant costs little, but not so many that claiming dominates.
pub fn n_chunks(len: usize, threads: usize) -> usize {
    len.min(threads * 4).max(1)
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
impl ThreadPool {
    /// Whether a job of `n_threads` chunks really runs on `n_threads` threads at once: each
    /// chunk waits (up to 5 s) until every thread of the pool has entered one.
    pub(crate) fn all_threads_join(&self) -> bool {
        let arrived = Mutex::new(std::collections::HashSet::new());
        let ok = AtomicUsize::new(0);
        self.run_chunks_as(
            self.n_threads,
            |_| {
                arrived.lock().unwrap().insert(thread::current().id());
                let deadline = Instant::now() + Duration::from_secs(5);
                while arrived.lock().unwrap().len() < self.n_threads {
                    if Instant::now() > deadline {
                        return;
                    }
                    thread::yield_now();
                }
                ok.fetch_add(1, Ordering::SeqCst);
            },
            false,
        );
        ok.load(Ordering::SeqCst) == self.n_threads
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_chunk_runs_once() {
        let pool = ThreadPool::new(3);
        for round in 0..3000 {
            let n = round % 97 + 1;
            let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
            pool.run_chunks(n, |c| {
                hits[c].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
        assert!(pool.all_threads_join());
    }

    /// A panic in any chunk reaches the caller only after every participant has left the job
    /// (whose closure borrows the caller's stack), and the pool keeps all its threads afterwards.
    #[test]
    fn panics_end_the_job_cleanly_on_any_thread() {
        let pool = ThreadPool::new(2);
        let caller = thread::current().id();
        for panic_on_caller in [true, false] {
            for _ in 0..5 {
                // Participants currently inside a chunk (left on return or on panic).
                let inside = AtomicU64::new(0);
                struct Leave<'a>(&'a AtomicU64);
                impl Drop for Leave<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                // Every chunk first waits until both threads are in the job, so each of them
                // takes one of the first chunks (< 4) and the chosen one surely panics.
                let arrived = Mutex::new(std::collections::HashSet::new());
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    pool.run_chunks(8, |c| {
                        inside.fetch_add(1, Ordering::SeqCst);
                        let _leave = Leave(&inside);
                        arrived.lock().unwrap().insert(thread::current().id());
                        let deadline = Instant::now() + Duration::from_secs(5);
                        while arrived.lock().unwrap().len() < 2 {
                            assert!(Instant::now() < deadline, "the worker never joined");
                            thread::yield_now();
                        }
                        let on_caller = thread::current().id() == caller;
                        if on_caller == panic_on_caller && c < 4 {
                            panic!("chunk failed");
                        }
                        // Long enough that a participant is surely still inside when a panic
                        // on another one has finished unwinding (a backtrace takes a while).
                        thread::sleep(Duration::from_millis(20));
                    });
                }));
                let payload = r.expect_err("the chunk's panic did not reach the caller");
                assert_eq!(payload.downcast_ref::<&str>(), Some(&"chunk failed"));
                assert_eq!(inside.load(Ordering::SeqCst), 0, "a participant outlived run_chunks");
            }
        }
        let hits = AtomicU64::new(0);
        pool.run_chunks(16, |_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 16);
        // A panicking job must not leave the pool running everything on the caller.
        assert!(pool.all_threads_join(), "after panicking jobs the pool no longer uses its workers");
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
        assert!(pool.all_threads_join());
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
                        p.run_chunks(10, |c| {
                            sum.fetch_add(c as u64, Ordering::Relaxed);
                        });
                    }
                    sum.load(Ordering::Relaxed)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 500 * 45);
        }
        assert!(pool.all_threads_join());
    }

    /// A worker that is slow to show up (preempted, descheduled) must not hold up the caller:
    /// the caller runs every chunk itself, the latecomer finds the job closed, and the next
    /// job does not wait for it either.
    #[test]
    fn a_stalled_worker_does_not_stall_the_caller() {
        let pool = ThreadPool::new(2);
        assert!(pool.all_threads_join());
        pool.shared.join_delay_us.store(300_000, Ordering::Relaxed);
        let caller = thread::current().id();
        for _ in 0..2 {
            let on_caller = AtomicU64::new(0);
            let t = Instant::now();
            pool.run_chunks(8, |_| {
                std::thread::sleep(Duration::from_millis(1));
                if thread::current().id() == caller {
                    on_caller.fetch_add(1, Ordering::Relaxed);
                }
            });
            let took = t.elapsed();
            assert_eq!(on_caller.load(Ordering::Relaxed), 8, "a stalled worker ran a chunk");
            assert!(took < Duration::from_millis(150), "the caller waited {took:?} for a stalled worker");
        }
        pool.shared.join_delay_us.store(0, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(400)); // the latecomer catches up
        assert!(pool.all_threads_join(), "the worker did not come back after stalling");
    }

    /// A worker that is preempted in every chunk it takes (simulated: it sleeps 1 ms where
    /// the caller needs 20 µs) makes sharing lose time: after a window the caller runs jobs
    /// alone; after the period alone it shares again, and keeps sharing while that pays.
    #[test]
    fn jobs_run_alone_while_sharing_loses_time_then_sharing_is_tried_again() {
        let pool = ThreadPool::new(2);
        let caller = thread::current().id();
        let on_worker = AtomicU64::new(0);
        let busy = |d: Duration| {
            let t = Instant::now();
            while t.elapsed() < d {
                std::hint::spin_loop();
            }
        };
        let job = |preempted: bool| {
            pool.run_chunks(4, |_| {
                if thread::current().id() != caller {
                    on_worker.fetch_add(1, Ordering::Relaxed);
                    if preempted {
                        thread::sleep(Duration::from_millis(1));
                        return;
                    }
                }
                busy(Duration::from_micros(20));
            })
        };
        for _ in 0..Adaptive::WINDOW {
            job(true);
        }
        on_worker.store(0, Ordering::Relaxed);
        for _ in 0..100 {
            job(true);
        }
        assert_eq!(on_worker.load(Ordering::Relaxed), 0, "jobs were still shared while sharing lost time");
        for _ in 0..Adaptive::ALONE_MIN {
            job(false);
        }
        on_worker.store(0, Ordering::Relaxed);
        for _ in 0..2 * Adaptive::WINDOW {
            job(false);
        }
        assert!(on_worker.load(Ordering::Relaxed) > 0, "sharing did not resume once it paid again");
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
