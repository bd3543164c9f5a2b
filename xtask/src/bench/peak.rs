//! The machine's f32 FMA peak, the yardstick of the GEMM rows: FMA units
//! per core × f32 lanes of the widest vector ISA present × 2 flops × the
//! clock × the bench's thread count.
//!
//! The FMA units are measured too: how many full-width FMAs a core retires
//! per cycle (independent chains, timed against the same clock). It is not
//! a property of the ISA: Intel's server cores issue two 512-bit FMAs per
//! cycle, AMD's Zen 4 one (two 256-bit pipes, a 512-bit op takes both), so
//! assuming two would halve every "% of peak" on Zen 4.
//!
//! The clock is measured, not read from `/proc/cpuinfo`: that field is the
//! nominal or last-sampled frequency (on a VM often the host's base clock),
//! while a chain of dependent register-to-register integer adds retires one
//! add per cycle on every x86 core since the P6, so adds per second is the
//! clock the cores run at while busy. (Adds of an immediate would not do:
//! Golden Cove and later fold chains of them at register renaming, several
//! per cycle.) All threads run the chain at once, so the number is
//! the all-core clock. It can still be above the clock under sustained
//! AVX-512 FMA load (licence-based down-clocking), which makes the peak an
//! upper bound.

use std::time::Instant;

/// The peak and how it was derived.
#[derive(Debug, Clone)]
pub struct FmaPeak {
    /// The vector ISA the lane count comes from.
    pub isa: &'static str,
    pub lanes: usize,
    /// Full-width FMAs a core retires per cycle, measured (1 or 2).
    pub fma_units: usize,
    pub ghz: f64,
    /// How `ghz` was obtained.
    pub clock_source: String,
    pub threads: usize,
}

impl FmaPeak {
    pub fn gflops(&self) -> f64 {
        (self.fma_units * self.lanes * 2 * self.threads) as f64 * self.ghz
    }

    pub fn line(&self) -> String {
        format!(
            "f32 FMA peak: {} {} FMA/cycle (measured) x {} f32 lanes x 2 flops x {:.2} GHz ({}) x {} threads = {:.1} GFLOP/s",
            self.isa,
            self.fma_units,
            self.lanes,
            self.ghz,
            self.clock_source,
            self.threads,
            self.gflops()
        )
    }
}

/// The vector ISA and its f32 lanes.
fn isa() -> (&'static str, usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return ("AVX-512", 16);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return ("AVX2+FMA", 8);
        }
        ("SSE2 (no FMA; a mul and an add counted as one FMA)", 4)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        ("unknown ISA, 128-bit vectors assumed", 4)
    }
}

/// The mean `cpu MHz` of `/proc/cpuinfo`, if there is one.
fn cpuinfo_mhz() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let v: Vec<f64> = s
        .lines()
        .filter(|l| l.starts_with("cpu MHz"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse().ok())
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Nanoseconds this thread has spent running, if the OS says.
fn on_cpu_ns() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `t` is a valid, writable timespec for the duration of the call.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        (rc == 0).then(|| t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Cycles of `iters` × 8 dependent adds, timed; returns adds per second.
#[cfg(target_arch = "x86_64")]
fn dependent_adds_per_s(iters: u64) -> f64 {
    let t = Instant::now();
    let cpu0 = on_cpu_ns();
    let mut x = 0u64;
    let mut n = iters.max(1);
    let y = std::hint::black_box(1u64);
    // SAFETY: register-only arithmetic and a local loop; no memory or stack use.
    unsafe {
        std::arch::asm!(
            "2:",
            "add {x}, {y}",
            "add {x}, {y}",
            "add {x}, {y}",
            "add {x}, {y}",
            "add {x}, {y}",
            "add {x}, {y}",
            "add {x}, {y}",
            "add {x}, {y}",
            "sub {n}, 1",
            "jnz 2b",
            x = inout(reg) x,
            n = inout(reg) n,
            y = in(reg) y,
            options(nomem, nostack),
        );
    }
    let wall = t.elapsed().as_secs_f64();
    // Time on the CPU, not wall time: on a shared machine the thread is
    // descheduled part of the time, and cycles only pass while it runs.
    let s = match (cpu0, on_cpu_ns()) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
        _ => wall,
    };
    std::hint::black_box((x, n));
    8.0 * iters.max(1) as f64 / s
}

/// Full-width f32 FMAs per second on this thread: twelve independent
/// chains (more than the FMA latency times the issue width), `iters`
/// rounds, timed on the CPU clock like the adds.
#[cfg(target_arch = "x86_64")]
fn fmas_per_s(iters: u64) -> f64 {
    use std::arch::x86_64::*;
    macro_rules! chains {
        ($n:expr, $zero:expr, $splat:expr, $fma:expr) => {{
            let mut acc = [$zero; 12];
            let (a, b) = ($splat(std::hint::black_box(0.999)), $splat(std::hint::black_box(1e-3)));
            for _ in 0..$n {
                for v in acc.iter_mut() {
                    *v = $fma(*v, a, b);
                }
            }
            std::hint::black_box(acc);
        }};
    }
    #[target_feature(enable = "avx512f")]
    unsafe fn wide512(iters: u64) {
        chains!(iters.max(1), _mm512_setzero_ps(), _mm512_set1_ps, _mm512_fmadd_ps);
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn wide256(iters: u64) {
        chains!(iters.max(1), _mm256_setzero_ps(), _mm256_set1_ps, _mm256_fmadd_ps);
    }
    let t = Instant::now();
    let cpu0 = on_cpu_ns();
    // SAFETY: each kernel runs only where its features were detected.
    unsafe {
        if std::arch::is_x86_feature_detected!("avx512f") {
            wide512(iters);
        } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            wide256(iters);
        } else {
            return 0.0;
        }
    }
    let wall = t.elapsed().as_secs_f64();
    let s = match (cpu0, on_cpu_ns()) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
        _ => wall,
    };
    12.0 * iters.max(1) as f64 / s
}

/// The best of ten runs of `rate` on `threads` threads at once (after one
/// warm-up run that lets the clock ramp up), the mean over threads.
#[cfg(target_arch = "x86_64")]
fn all_threads(threads: usize, iters: u64, rate: fn(u64) -> f64) -> f64 {
    let run = || {
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads.max(1)).map(|_| s.spawn(move || rate(iters))).collect();
            let v: Vec<f64> = hs.into_iter().filter_map(|h| h.join().ok()).collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        })
    };
    run();
    (0..10).map(|_| run()).fold(0.0, f64::max)
}

/// The all-core clock in GHz: `threads` threads run the dependent-add chain
/// at once.
#[cfg(target_arch = "x86_64")]
fn measured_ghz(threads: usize, iters: u64) -> f64 {
    all_threads(threads, iters, dependent_adds_per_s) / 1e9
}

/// FMAs per cycle per core, rounded to a whole number of units (1 or 2).
#[cfg(target_arch = "x86_64")]
fn measured_fma_units(threads: usize, iters: u64, ghz: f64) -> usize {
    let per_cycle = all_threads(threads, iters, fmas_per_s) / (ghz * 1e9);
    (per_cycle.round() as usize).clamp(1, 2)
}

/// Measures the peak for `threads` threads; `iters` sets the length of the
/// clock measurement (1e7 is about 25 ms per run at 3 GHz: short runs are
/// less likely to be cut by other processes on a busy machine).
pub fn fma_peak(threads: usize, iters: u64) -> FmaPeak {
    let (isa, lanes) = isa();
    let cpuinfo = cpuinfo_mhz().map_or("no cpu MHz in /proc/cpuinfo".to_string(), |m| {
        format!("/proc/cpuinfo says {m:.0} MHz")
    });
    #[cfg(target_arch = "x86_64")]
    let (ghz, clock_source) = (
        measured_ghz(threads, iters),
        format!("measured: dependent adds on {threads} threads at once, per second on the CPU; {cpuinfo}"),
    );
    #[cfg(target_arch = "x86_64")]
    let fma_units = measured_fma_units(threads, iters / 4, ghz);
    #[cfg(not(target_arch = "x86_64"))]
    let (ghz, clock_source, fma_units) = {
        let _ = iters;
        (
            cpuinfo_mhz().unwrap_or(0.0) / 1e3,
            format!("not measured on this arch; {cpuinfo}"),
            2,
        )
    };
    FmaPeak {
        isa,
        lanes,
        fma_units,
        ghz,
        clock_source,
        threads,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_is_units_times_lanes_times_clock_times_threads() {
        let p = FmaPeak {
            isa: "AVX-512",
            lanes: 16,
            fma_units: 2,
            ghz: 2.5,
            clock_source: String::new(),
            threads: 2,
        };
        assert_eq!(p.gflops(), 2.0 * 16.0 * 2.0 * 2.5 * 2.0);
        let m = fma_peak(1, 100_000);
        assert!(m.ghz.is_finite() && m.ghz > 0.0 && m.lanes >= 4, "{m:?}");
        assert!((1..=2).contains(&m.fma_units), "{m:?}");
    }
}
