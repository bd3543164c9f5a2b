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

/// Buffers at least this large are asked onto huge pages by [`huge_vec`]
/// and [`settle_on_huge_pages`].
pub const HUGE_PAGE_MIN: usize = 256 << 10;

/// An empty vector with room for `n` values, whose pages the kernel is
/// asked to back with transparent huge pages before anything is written
/// (`MADV_HUGEPAGE`; Linux, elsewhere a plain `Vec::with_capacity`): fresh
/// memory then faults in 2 MiB at a time. Fill it, then call
/// [`settle_on_huge_pages`].
///
/// Decode streams every weight once a token. On 4 KiB pages the hardware
/// prefetchers stop at every page boundary and each page costs a TLB walk;
/// with the weights on 2 MiB pages a bf16 LLM decode step at mid size
/// measured about 12% faster. The machine's default THP mode (`madvise`)
/// gives huge pages only to memory that asks for them.
pub fn huge_vec<T>(n: usize) -> Vec<T> {
    let v: Vec<T> = Vec::with_capacity(n);
    let bytes = n.saturating_mul(std::mem::size_of::<T>());
    if bytes >= HUGE_PAGE_MIN {
        advise(v.as_ptr() as usize, bytes, false);
    }
    v
}

/// Moves a filled weight buffer onto huge pages where the allocator handed
/// out memory that was already in use (and so already on small pages):
/// `MADV_COLLAPSE` copies its 2 MiB blocks onto huge pages now instead of
/// whenever the kernel's background scan gets there. The blocks are the
/// 2 MiB-aligned ones the buffer touches, so a neighbour's bytes in them
/// move too (unchanged: only the backing changes). Failures (no THP, no
/// free huge page, an older kernel) leave the buffer as it was.
pub fn settle_on_huge_pages<T>(v: &[T]) {
    let bytes = std::mem::size_of_val(v);
    if bytes >= HUGE_PAGE_MIN {
        advise(v.as_ptr() as usize, bytes, true);
    }
}

#[cfg(target_os = "linux")]
fn advise(addr: usize, len: usize, collapse: bool) {
    const HUGE: usize = 2 << 20;
    // Linux's MADV_COLLAPSE (6.1+); older kernels answer EINVAL.
    const MADV_COLLAPSE: libc::c_int = 25;
    let start = addr / HUGE * HUGE;
    let end = (addr + len).div_ceil(HUGE) * HUGE;
    // SAFETY: madvise with these flags changes only how the kernel backs
    // the pages of the range, never their contents or mappings; parts of
    // the range outside any mapping are reported (ENOMEM) and skipped.
    // Errors are ignored: the hint is an optimisation.
    unsafe {
        let p = start as *mut libc::c_void;
        libc::madvise(p, end - start, libc::MADV_HUGEPAGE);
        if collapse {
            libc::madvise(p, end - start, MADV_COLLAPSE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_addr: usize, _len: usize, _collapse: bool) {}

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

    /// Asking for huge pages and collapsing onto them moves the backing,
    /// never the bytes: the buffer and its neighbours read back the same.
    #[test]
    fn huge_page_hints_keep_every_byte() {
        let pattern = |n: u32| (0..n).map(|i| i.wrapping_mul(2_654_435_761)).collect::<Vec<u32>>();
        // A neighbour allocated just before: its 2 MiB blocks may be shared.
        let neighbour = pattern(300_000);
        let mut v: Vec<u32> = huge_vec(3 << 20);
        v.extend((0..3u32 << 20).map(|i| i ^ 0x5a5a_5a5a));
        settle_on_huge_pages(&v);
        assert!(v.iter().enumerate().all(|(i, &x)| x == (i as u32) ^ 0x5a5a_5a5a));
        assert_eq!(neighbour, pattern(300_000));
        let small: Vec<u8> = huge_vec(10);
        assert_eq!(small.capacity(), 10);
        settle_on_huge_pages(&small);
    }
}
