//! Refusing runs that cannot fit in memory before they start.
//!
//! An allocation that fails aborts a Rust process (`memory allocation of N
//! bytes failed`) with no way to report it. Computations whose size follows
//! from user input (an image side, a batch) estimate their largest buffers
//! first and are refused with the numbers when those exceed what the
//! machine has.

use crate::{Error, Result};

/// Memory the system can still give this process (Linux `MemAvailable`),
/// or `None` where that cannot be read.
pub fn available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
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
    let limit = available.unwrap_or(ABSURD);
    if needed <= limit {
        return Ok(());
    }
    let have = match available {
        Some(a) => format!("only {} is available", gib(a)),
        None => "that is more than any machine has".to_string(),
    };
    Err(Error::InvalidArgument(format!(
        "{what} needs about {} of memory at once, and {have}; {advice}",
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
