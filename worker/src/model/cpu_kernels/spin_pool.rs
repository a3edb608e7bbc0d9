//! The threads strata's CPU kernels split a matmul over. rayon parks idle workers, and on the 2-core
//! machines measured here waking one costs ~20 µs per matmul (BENCHMARKS.md, session 12): more than
//! a decode step's small projections take to compute. These workers spin for a while after each job
//! (a forward pass issues its matmuls microseconds apart), then sleep until the next.
//!
//! One job runs at a time per pool: `run` holds a lock for the job's duration, and the caller computes
//! tasks too, so a pool of `threads` keeps `threads - 1` workers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a worker spins for the next job before it sleeps.
const SPIN: Duration = Duration::from_millis(2);

/// A job: `tasks` calls of `f(task)`, the closure's lifetime erased (see [`SpinPool::run`]).
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    tasks: usize,
}

// SAFETY: the pointer is only dereferenced while `run` keeps the closure alive, and the closure is
// `Sync`.
unsafe impl Send for Job {}

struct Shared {
    /// The current job's generation in the high 32 bits and its next unclaimed task in the low 32:
    /// claiming a task is one compare-exchange, and a worker that still holds an older generation
    /// cannot claim a task of a newer job.
    cursor: AtomicU64,
    /// The current job, written before its generation is published.
    job: Mutex<Option<Job>>,
    /// Tasks of the current job not yet finished.
    pending: AtomicUsize,
    /// Workers sleep here once they have spun for [`SPIN`] without a job.
    wake: Condvar,
    sleepers: Mutex<usize>,
}

pub struct SpinPool {
    shared: Arc<Shared>,
    /// One job at a time.
    running: Mutex<()>,
    workers: usize,
}

impl SpinPool {
    /// The pool for `threads` threads, shared by every caller that asks for that many. Each calling
    /// thread remembers its last answer, so a matmul takes no lock to find its pool.
    pub fn for_threads(threads: usize) -> Arc<SpinPool> {
        thread_local! {
            static LAST: std::cell::RefCell<Option<Arc<SpinPool>>> = const { std::cell::RefCell::new(None) };
        }
        let threads = threads.max(1);
        LAST.with_borrow_mut(|last| match last {
            Some(pool) if pool.threads() == threads => pool.clone(),
            _ => {
                let pool = Self::shared(threads);
                *last = Some(pool.clone());
                pool
            }
        })
    }

    fn shared(threads: usize) -> Arc<SpinPool> {
        static POOLS: OnceLock<Mutex<HashMap<usize, Arc<SpinPool>>>> = OnceLock::new();
        let pools = POOLS.get_or_init(Default::default);
        let mut pools = pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry(threads)
            .or_insert_with(|| Arc::new(SpinPool::new(threads - 1)))
            .clone()
    }

    fn new(workers: usize) -> Self {
        let shared = Arc::new(Shared {
            cursor: AtomicU64::new(0),
            job: Mutex::new(None),
            pending: AtomicUsize::new(0),
            wake: Condvar::new(),
            sleepers: Mutex::new(0),
        });
        for i in 0..workers {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("strata-matmul-{i}"))
                .spawn(move || worker(&shared))
                .expect("spawning a matmul thread");
        }
        Self {
            shared,
            running: Mutex::new(()),
            workers,
        }
    }

    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Runs `f(0), …, f(tasks - 1)` over the pool's threads and the caller's, returning when all
    /// have finished. A panic in a task aborts the process (a kernel indexes only its own tasks'
    /// memory; a panic there is a bug, not an input error).
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        assert!(tasks < u32::MAX as usize, "too many tasks");
        if tasks == 0 {
            return;
        }
        if self.workers == 0 || tasks == 1 {
            (0..tasks).for_each(f);
            return;
        }
        let _one_job = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY (of the erased lifetime): `run` returns only after `pending` is 0, that is after
        // every claimed task has returned, and no task of this generation can be claimed later.
        let job = Job {
            f: unsafe {
                std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(f)
            },
            tasks,
        };
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job);
        s.pending.store(tasks, Ordering::Relaxed);
        let generation = (s.cursor.load(Ordering::Relaxed) >> 32) + 1;
        s.cursor.store(generation << 32, Ordering::Release);
        if *s.sleepers.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
            s.wake.notify_all();
        }
        work(s, generation, job);
        while s.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
    }
}

/// Claims and runs tasks of `generation` until none is left.
fn work(s: &Shared, generation: u64, job: Job) {
    let guard = AbortOnPanic;
    loop {
        let cursor = s.cursor.load(Ordering::Acquire);
        let task = (cursor & u32::MAX as u64) as usize;
        if cursor >> 32 != generation || task >= job.tasks {
            break;
        }
        if s.cursor
            .compare_exchange_weak(cursor, cursor + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            // SAFETY: a task of the live generation was claimed, so `run` is still waiting.
            unsafe { (*job.f)(task) };
            s.pending.fetch_sub(1, Ordering::Release);
        }
    }
    std::mem::forget(guard);
}

struct AbortOnPanic;

impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        eprintln!("strata: a CPU matmul task panicked");
        std::process::abort();
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        let started = Instant::now();
        let mut spins = 0u32;
        let generation = loop {
            let generation = s.cursor.load(Ordering::Acquire) >> 32;
            if generation != seen {
                break generation;
            }
            spins += 1;
            // After a short pure spin, yield between checks: the step's other work (candle's
            // attention, norms) runs on threads this one would otherwise keep off a core.
            if spins > 256 {
                std::thread::yield_now();
            }
            if spins.is_multiple_of(64) && started.elapsed() > SPIN {
                let mut sleepers = s.sleepers.lock().unwrap_or_else(|e| e.into_inner());
                *sleepers += 1;
                while s.cursor.load(Ordering::Acquire) >> 32 == seen {
                    sleepers = s.wake.wait(sleepers).unwrap_or_else(|e| e.into_inner());
                }
                *sleepers -= 1;
            } else {
                std::hint::spin_loop();
            }
        };
        seen = generation;
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = job {
            work(s, generation, job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_task_runs_once_per_job() {
        let pool = SpinPool::new(2);
        for tasks in [0, 1, 2, 3, 17, 1000] {
            let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..50 {
                pool.run(tasks, &|t| {
                    counts[t].fetch_add(1, Ordering::Relaxed);
                });
            }
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 50));
        }
        // After the workers have gone to sleep, a job still wakes and completes.
        std::thread::sleep(SPIN * 3);
        let done = AtomicUsize::new(0);
        pool.run(8, &|_| {
            done.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(done.load(Ordering::Relaxed), 8);
    }
}
