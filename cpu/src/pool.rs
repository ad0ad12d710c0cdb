//! A persistent thread pool whose workers spin between jobs.
//!
//! A decode step of a 30-layer model runs a few hundred short parallel operations (one GEMV, one
//! attention, one head chunk each, tens of microseconds apiece) with serial work between them. A
//! pool that parks its threads on a futex after each operation pays two context switches per
//! operation, which cost about a fifth of a 1-thread step here; this pool keeps its workers spinning
//! for a while after a job, so the next job starts within nanoseconds, and parks them only when no
//! job came for [`SPIN_BEFORE_PARKING`].
//!
//! Model: a pool of `threads` participants is the calling thread plus `threads − 1` workers. A job
//! ([`ThreadPool::for_each`]) hands the items of an iterator, one at a time, to whichever participant
//! asks next (so a slow or preempted thread takes fewer items), and returns once every item is
//! done. The iterator is behind a mutex; items are meant to be chunks of tens of microseconds, so
//! one lock per item is noise. A pool of one thread runs everything on the caller.
//!
//! Invariants: one job at a time (`for_each` takes the job lock; a job that calls the pool again runs
//! that inner job on its own thread only). A job is *open* from its publication until the caller
//! has run out of items; a worker only enters a job by incrementing the active count while the job
//! is open, and the caller waits, after closing it, until the active count is back to zero. So the
//! borrowed closure outlives every use, and a worker that was descheduled when the job was published
//! never delays it: the caller takes its items and closes the job without it.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Tasks per thread a job over long runs of data is split into ([`ThreadPool::chunk_len`]): each
/// thread streams a few long contiguous runs (which the hardware prefetchers follow) while a slow
/// thread still gets fewer runs.
pub const TASKS_PER_THREAD: usize = 4;

/// How long an idle worker spins before it parks.
const SPIN_BEFORE_PARKING: Duration = Duration::from_millis(2);

/// Busy-wait steps that only pause the core (about 10 µs here) before a waiting thread yields.
const PAUSES_BEFORE_YIELDING: u32 = 256;

/// A job as the workers see it: a type-erased pointer to the caller's `&dyn Fn()`.
type JobRef<'a> = &'a (dyn Fn() + Sync);

/// `Shared::state`: the job is open (workers may enter); the low bits count workers inside it.
const OPEN: u64 = 1 << 63;

struct Shared {
    /// Incremented to announce a job (or shutdown) to waiting workers.
    epoch: AtomicU64,
    /// [`OPEN`] and the number of workers running the current job.
    state: AtomicU64,
    /// Points at the current job's `JobRef` on the caller's stack while it is open.
    job: AtomicUsize,
    /// A worker's job panicked; the caller re-raises the panic.
    panicked: AtomicBool,
    shutdown: AtomicBool,
    /// Parking: workers wait on `wake` while `sleepers` counts them.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes jobs: held by the thread that runs one.
    running: Mutex<()>,
}

impl ThreadPool {
    /// A pool of `threads` participants (the caller and `threads − 1` workers; at least one).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            state: AtomicU64::new(0),
            job: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..threads.max(1))
            .map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("tern-cpu-{i}"))
                    .spawn(move || worker(&shared))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            shared,
            workers,
            running: Mutex::new(()),
        })
    }

    /// Participants, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Items per task for a job over `total` items: [`TASKS_PER_THREAD`] tasks per thread, a
    /// multiple of `multiple`, at least `min`.
    pub fn chunk_len(&self, total: usize, min: usize, multiple: usize) -> usize {
        (total / (TASKS_PER_THREAD * self.threads()))
            .next_multiple_of(multiple)
            .max(min)
    }

    /// Calls `f` on every item of `items`, spread over the pool's threads; returns when all are
    /// done. A panic in `f` is re-raised here after every thread has stopped using `f`.
    pub fn for_each<I, F>(&self, items: I, f: F)
    where
        I: Iterator + Send,
        F: Fn(I::Item) + Sync,
    {
        let items = Mutex::new(items);
        let next = || items.lock().unwrap_or_else(|e| e.into_inner()).next();
        let drain = || {
            while let Some(item) = next() {
                f(item);
            }
        };
        let single_item = matches!(items.lock().map(|i| i.size_hint().1), Ok(Some(0 | 1)));
        let _running = match self.running.try_lock() {
            Ok(guard) if !self.workers.is_empty() && !single_item => guard,
            // One thread, one item, or a job inside a job: run it here.
            Ok(_) | Err(TryLockError::WouldBlock) => return drain(),
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
        };
        self.run(&drain);
    }

    /// [`Self::for_each`] for fallible work: stops handing out items after the first error and
    /// returns it.
    pub fn try_for_each<I, E, F>(&self, items: I, f: F) -> Result<(), E>
    where
        I: Iterator + Send,
        E: Send,
        F: Fn(I::Item) -> Result<(), E> + Sync,
    {
        let first_error = Mutex::new(None);
        let failed = AtomicBool::new(false);
        self.for_each(
            items.take_while(|_| !failed.load(Ordering::Relaxed)),
            |item| {
                if let Err(e) = f(item) {
                    failed.store(true, Ordering::Relaxed);
                    first_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(e);
                }
            },
        );
        match first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Publishes `job` to the workers, runs it on this thread too, closes it and waits for the
    /// workers that entered it.
    fn run(&self, job: JobRef<'_>) {
        let shared = &*self.shared;
        shared.job.store(&raw const job as usize, Ordering::Relaxed);
        shared.state.store(OPEN, Ordering::Release);
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(job));
        shared.state.fetch_and(!OPEN, Ordering::AcqRel);
        let mut spins = 0u32;
        while shared.state.load(Ordering::Acquire) != 0 {
            spins = spin_or_yield(spins);
        }
        shared.job.store(0, Ordering::Relaxed);
        if let Err(payload) = mine {
            resume_unwind(payload);
        }
        if shared.panicked.swap(false, Ordering::Relaxed) {
            panic!("a CPU pool thread panicked");
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        let shared = &*self.shared;
        shared.shutdown.store(true, Ordering::SeqCst);
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        {
            let _guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

fn worker(shared: &Shared) {
    let mut seen = 0u64;
    loop {
        seen = wait_for_epoch(shared, seen);
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let state = shared.state.load(Ordering::Acquire);
        let entered = state & OPEN != 0
            && shared
                .state
                .compare_exchange(state, state + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        if !entered {
            continue; // closed already (or just reopened: then the next epoch brings it back)
        }
        let job = shared.job.load(Ordering::Relaxed) as *const JobRef<'_>;
        // SAFETY: this worker entered an open job, and `run` stored the pointer to its live
        // `JobRef` before opening it (Release/Acquire on `state`); `run` does not return, so the
        // reference and the closure behind it stay alive, until the active count drops to zero.
        let job: JobRef<'_> = unsafe { *job };
        if catch_unwind(AssertUnwindSafe(job)).is_err() {
            shared.panicked.store(true, Ordering::Relaxed);
        }
        shared.state.fetch_sub(1, Ordering::Release);
    }
}

/// One step of a busy wait: a pause instruction for the first [`PAUSES_BEFORE_YIELDING`] steps
/// (the wait is usually over within microseconds), then yielding the core, so that on a machine
/// with more runnable threads than cores the thread being waited for gets to run.
fn spin_or_yield(spins: u32) -> u32 {
    if spins < PAUSES_BEFORE_YIELDING {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
    spins.saturating_add(1)
}

/// Spins, then parks, until the epoch moves past `seen`; returns the new epoch.
fn wait_for_epoch(shared: &Shared, seen: u64) -> u64 {
    let started = Instant::now();
    let mut spins = 0u32;
    loop {
        let epoch = shared.epoch.load(Ordering::SeqCst);
        if epoch != seen {
            return epoch;
        }
        if spins < PAUSES_BEFORE_YIELDING || started.elapsed() < SPIN_BEFORE_PARKING {
            spins = spin_or_yield(spins);
            continue;
        }
        let guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
        shared.sleepers.fetch_add(1, Ordering::SeqCst);
        // Re-checked under the lock after registering as a sleeper: `run` notifies under the same
        // lock whenever it sees a sleeper after publishing, so no wake-up is lost.
        let mut guard = guard;
        while shared.epoch.load(Ordering::SeqCst) == seen {
            guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
        shared.sleepers.fetch_sub(1, Ordering::SeqCst);
        drop(guard);
        spins = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once_at_every_thread_count() {
        for threads in [1, 2, 3, 8] {
            let pool = ThreadPool::new(threads).unwrap();
            assert_eq!(pool.threads(), threads);
            for round in 0..200 {
                let mut out = vec![0u64; 1000 + round];
                pool.for_each(out.chunks_mut(7).enumerate(), |(i, chunk)| {
                    for (j, v) in chunk.iter_mut().enumerate() {
                        *v += (i * 7 + j) as u64 + 1;
                    }
                });
                assert!(out.iter().enumerate().all(|(i, &v)| v == i as u64 + 1));
            }
        }
    }

    #[test]
    fn workers_wake_after_parking() {
        let pool = ThreadPool::new(2).unwrap();
        let ran_on = Mutex::new(std::collections::HashSet::new());
        std::thread::sleep(SPIN_BEFORE_PARKING * 5);
        // Enough slow items that the woken worker takes some.
        pool.for_each(0..64, |_| {
            std::thread::sleep(Duration::from_millis(1));
            ran_on.lock().unwrap().insert(std::thread::current().id());
        });
        assert_eq!(ran_on.into_inner().unwrap().len(), 2);
    }

    #[test]
    fn first_error_is_returned_and_stops_the_job() {
        let pool = ThreadPool::new(2).unwrap();
        let done = AtomicUsize::new(0);
        let result = pool.try_for_each(0..10_000, |i| {
            done.fetch_add(1, Ordering::Relaxed);
            if i == 10 { Err(i) } else { Ok(()) }
        });
        assert_eq!(result, Err(10));
        assert!(done.load(Ordering::Relaxed) < 10_000);
        assert_eq!(pool.try_for_each(0..100, |_| Ok::<(), ()>(())), Ok(()));
    }

    #[test]
    fn a_panic_reaches_the_caller_and_the_pool_keeps_working() {
        let pool = ThreadPool::new(2).unwrap();
        let caught = catch_unwind(AssertUnwindSafe(|| {
            pool.for_each(0..100, |i| {
                std::thread::sleep(Duration::from_micros(50));
                assert!(i != 50, "item 50");
            })
        }));
        assert!(caught.is_err());
        let count = AtomicUsize::new(0);
        pool.for_each(0..100, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn a_job_inside_a_job_runs_on_its_own_thread() {
        let pool = ThreadPool::new(2).unwrap();
        let count = AtomicUsize::new(0);
        pool.for_each(0..4, |_| {
            pool.for_each(0..3, |_| {
                count.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(count.load(Ordering::Relaxed), 12);
    }
}
