//! Refusing runs that cannot fit in memory before they start.
//!
//! An allocation that fails aborts a Rust process (`memory allocation of N
//! bytes failed`) with no way to report it. Computations whose size follows
//! from user input (an image side, a batch) estimate their largest buffers
//! first and are refused with the numbers when those exceed what the
//! machine has.

use crate::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set to `1` to skip every memory check (the escape hatch for when an
/// estimate is wrong; `emu --no-memory-check` does the same).
pub const NO_CHECK_ENV: &str = "EMU_NO_MEMORY_CHECK";

static DISABLED: AtomicBool = AtomicBool::new(false);

/// Turns the checks of [`check_fits`] (and of every caller that asks
/// [`enabled`]) off or on for the whole process.
pub fn set_enabled(on: bool) {
    DISABLED.store(!on, Ordering::Relaxed);
}

/// Whether memory checks run: not turned off by [`set_enabled`] nor by
/// `EMU_NO_MEMORY_CHECK=1`.
pub fn enabled() -> bool {
    !DISABLED.load(Ordering::Relaxed) && !std::env::var(NO_CHECK_ENV).is_ok_and(|v| v == "1")
}

/// Memory the system can still give this process (Linux `MemAvailable`,
/// lowered to what the process's cgroup v2 limit leaves, since a container
/// sees the whole machine's `MemAvailable`), or `None` where that cannot be read.
pub fn available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    let system = kib.checked_mul(1024)?;
    Some(cgroup_headroom().map_or(system, |c| c.min(system)))
}

/// `memory.max - memory.current` of a cgroup v2 limit (`None`: no limit or not readable).
fn cgroup_headroom() -> Option<u64> {
    let read = |f: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{f}")).ok();
    let max: u64 = read("memory.max")?.trim().parse().ok()?;
    let current: u64 = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// `bytes` in GiB with one decimal, for messages.
pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Checks that `needed` bytes (an estimate of the largest buffers a step
/// holds at once) fit in `available` (`None`: unknown, only absurd sizes
/// beyond any machine — 1 TiB and more — are refused). `what` says what
/// needs them, `advice` how to need less.
pub fn check_fits(what: &str, needed: u64, available: Option<u64>, advice: &str) -> Result<()> {
    const ABSURD: u64 = 1 << 40;
    if !enabled() {
        return Ok(());
    }
    let limit = available.unwrap_or(ABSURD);
    if needed <= limit {
        return Ok(());
    }
    let have = match available {
        Some(a) => format!("only {} is available", gib(a)),
        None => "that is more than any machine has".to_string(),
    };
    Err(Error::InvalidArgument(format!(
        "{what} needs about {} of memory at once, and {have}; {advice} \
         (or, if this estimate is wrong, --no-memory-check / {NO_CHECK_ENV}=1)",
        gib(needed)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_with_numbers() {
        assert!(check_fits("x", 10, Some(10), "").is_ok());
        let e = check_fits("the VAE's attention", 3 << 30, Some(1 << 30), "use a smaller size")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("3.0 GiB") && e.contains("1.0 GiB") && e.contains("smaller size"),
            "{e}"
        );
        assert!(check_fits("x", 1 << 41, None, "").is_err());
        if let Some(a) = available() {
            assert!(a > 0);
        }
    }
}
