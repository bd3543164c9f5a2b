//! A team of spinning threads for short parallel regions (decode).
//!
//! A decode step is about a hundred matrix-vector products of tens to
//! hundreds of microseconds each, with small sequential ops between them.
//! Rayon parks an idle worker after a few yields, and on this VM waking it
//! (a futex, an inter-processor interrupt) costs 15–50 µs; worse, the caller
//! meanwhile takes the tasks itself, so a product runs mostly on one core at
//! half the memory bandwidth. Measured on the 2-core VM: an empty fork-join
//! through rayon 14–18 µs, through this team about 1 µs.
//!
//! The team's workers spin on one atomic word for a while after each job
//! (then yield, then park), so the next job starts on all cores at once.
//! Tasks are claimed one at a time from a shared counter, so a slow or late
//! worker does not hold the others back. The caller works too and returns
//! only when every task has finished; a call made while the team is busy
//! (another thread, or a task calling back in) runs its tasks inline.

use std::cell::UnsafeCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// The state word: job epoch, task count and next unclaimed task, packed so
/// that a claim (a compare-and-swap) can only succeed for the job the
/// worker saw, never for a later one.
const FIELD: u32 = 22;
const MASK: u64 = (1 << FIELD) - 1;
/// Most tasks one job may have.
pub(crate) const MAX_TASKS: usize = MASK as usize;
/// Epochs wrap at this many bits (what is left of the word).
const EPOCH_MASK: u64 = (1 << (64 - 2 * FIELD)) - 1;

/// How long an idle worker spins, then yields, before it parks.
const SPIN: Duration = Duration::from_micros(100);
const YIELD: Duration = Duration::from_millis(2);

type Job<'a> = dyn Fn(usize) + Sync + 'a;

struct Team {
    /// Held by the caller for the whole job.
    busy: Mutex<()>,
    state: AtomicU64,
    /// The running job; written under `busy` before the state word
    /// publishes it, read only by a worker that has claimed one of its
    /// tasks (so the caller is still waiting and the closure is alive).
    job: UnsafeCell<Option<*const Job<'static>>>,
    completed: AtomicUsize,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    workers: OnceLock<Vec<Worker>>,
}

struct Worker {
    thread: Thread,
    parked: AtomicBool,
}

// SAFETY: `job` is only written under `busy` while no task of the previous
// job is outstanding, and only read after a successful claim (see above).
unsafe impl Sync for Team {}

fn pack(epoch: u64, n: usize, next: usize) -> u64 {
    (epoch << (2 * FIELD)) | ((n as u64) << FIELD) | next as u64
}

fn unpack(s: u64) -> (u64, usize, usize) {
    (s >> (2 * FIELD), ((s >> FIELD) & MASK) as usize, (s & MASK) as usize)
}

fn team() -> &'static Team {
    static TEAM: OnceLock<&'static Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let t: &'static Team = Box::leak(Box::new(Team {
            busy: Mutex::new(()),
            state: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            completed: AtomicUsize::new(0),
            panic: Mutex::new(None),
            workers: OnceLock::new(),
        }));
        let n = rayon::current_num_threads().saturating_sub(1);
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let spawned = std::thread::Builder::new()
                .name(format!("emu-cpu-team-{i}"))
                .spawn(move || worker(t, i));
            match spawned {
                Ok(h) => workers.push(Worker {
                    thread: h.thread().clone(),
                    parked: AtomicBool::new(false),
                }),
                // Fewer workers only means less parallelism.
                Err(_) => break,
            }
        }
        let _ = t.workers.set(workers);
        t
    })
}

impl Team {
    /// Claims the next task of job `epoch`, or `None` when it has none left
    /// or a later job has replaced it.
    fn claim(&self, epoch: u64) -> Option<usize> {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let (e, n, next) = unpack(s);
            if e != epoch || next >= n {
                return None;
            }
            match self
                .state
                .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(next),
                Err(now) => s = now,
            }
        }
    }

    /// Runs the claimed tasks of job `epoch` until none is left.
    fn work(&self, epoch: u64) {
        while let Some(i) = self.claim(epoch) {
            // SAFETY: a claimed task is not finished, so the caller is still
            // waiting and the job it published for `epoch` is alive.
            let job = unsafe { (*self.job.get()).map(|p| &*p) };
            if let Some(job) = job {
                if let Err(p) = panic::catch_unwind(AssertUnwindSafe(|| job(i))) {
                    if let Ok(mut slot) = self.panic.lock() {
                        slot.get_or_insert(p);
                    }
                }
            }
            self.completed.fetch_add(1, Ordering::AcqRel);
        }
    }
}

fn worker(t: &'static Team, index: usize) {
    let mut seen = unpack(t.state.load(Ordering::Acquire)).0;
    loop {
        let started = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = unpack(t.state.load(Ordering::Acquire)).0;
            if e != seen {
                break e;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            let idle = started.elapsed();
            if idle < SPIN {
                std::hint::spin_loop();
            } else if idle < YIELD {
                std::thread::yield_now();
            } else if let Some(w) = t.workers.get().and_then(|w| w.get(index)) {
                w.parked.store(true, Ordering::SeqCst);
                // Re-check after announcing: a job published before the flag
                // was visible would otherwise never unpark this thread.
                if unpack(t.state.load(Ordering::SeqCst)).0 == seen {
                    std::thread::park();
                }
                w.parked.store(false, Ordering::SeqCst);
            } else {
                std::thread::park_timeout(Duration::from_millis(1));
            }
        };
        seen = epoch;
        t.work(epoch);
    }
}

/// Runs `f(0) .. f(n - 1)` on the team and the calling thread, returning
/// when all have finished. A panic in a task resumes here once every task
/// is done.
pub(crate) fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    if n == 0 {
        return;
    }
    let t = team();
    let workers = t.workers.get().map_or(0, |w| w.len());
    let guard = if n > 1 && n <= MAX_TASKS && workers > 0 {
        t.busy.try_lock().ok()
    } else {
        None
    };
    let Some(guard) = guard else {
        (0..n).for_each(f);
        return;
    };
    let f: &Job<'_> = &f;
    // SAFETY: the lifetime is erased only for the duration of this call:
    // `wait` below does not return before every task has finished, and no
    // worker reads the pointer without a claimed, unfinished task.
    let f: &'static Job<'static> = unsafe { std::mem::transmute::<&Job<'_>, &'static Job<'static>>(f) };
    let epoch = (unpack(t.state.load(Ordering::Acquire)).0 + 1) & EPOCH_MASK;
    // SAFETY: under `busy`; every task of the previous job has finished, so
    // no worker is reading `job`.
    unsafe { *t.job.get() = Some(f as *const Job<'static>) };
    t.completed.store(0, Ordering::Relaxed);
    t.state.store(pack(epoch, n, 0), Ordering::SeqCst);
    if let Some(ws) = t.workers.get() {
        for w in ws {
            if w.parked.load(Ordering::SeqCst) {
                w.thread.unpark();
            }
        }
    }
    t.work(epoch);
    let mut spins = 0u32;
    while t.completed.load(Ordering::Acquire) < n {
        spins = spins.wrapping_add(1);
        if spins < 1 << 16 {
            std::hint::spin_loop();
        } else {
            // A worker was preempted mid-task; let it run.
            std::thread::yield_now();
        }
    }
    // SAFETY: all tasks are done; clear the erased pointer before returning.
    unsafe { *t.job.get() = None };
    let payload = t.panic.lock().ok().and_then(|mut p| p.take());
    // Released before unwinding, so the lock is not poisoned.
    drop(guard);
    if let Some(p) = payload {
        panic::resume_unwind(p);
    }
}

/// Splits `out` into chunks of `chunk` elements (the last may be shorter)
/// and runs `f(index, chunk)` for each on the team.
pub(crate) fn chunks_mut<T: Send>(out: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunk = chunk.max(1);
    let len = out.len();
    let n = len.div_ceil(chunk);
    let base = SendPtr(out.as_mut_ptr());
    for_each(n, |i| {
        let start = i * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: each index is run once, and the chunks are disjoint
        // ranges of `out`, which outlives this call.
        let c = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        f(i, c);
    });
}

struct SendPtr<T>(*mut T);
impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}
// SAFETY: used only to hand disjoint chunks to the team's threads.
unsafe impl<T: Send> Sync for SendPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_once() {
        for n in [0, 1, 2, 3, 7, 64, 1000] {
            let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            for_each(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n = {n}");
        }
    }

    #[test]
    fn chunks_cover_the_slice() {
        let mut v = vec![0usize; 1003];
        chunks_mut(&mut v, 10, |i, c| c.iter_mut().for_each(|x| *x += i + 1));
        for (j, x) in v.iter().enumerate() {
            assert_eq!(*x, j / 10 + 1);
        }
    }

    #[test]
    fn nested_and_concurrent_calls_finish() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        for_each(4, |_| {
                            for_each(3, |_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 200 * 12);
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_team_recovers() {
        let r = panic::catch_unwind(|| for_each(8, |i| assert!(i != 5, "task five")));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        for_each(8, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 8);
    }
}
